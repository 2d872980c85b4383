import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_one_time_warnings():
    """Every test sees olss_fast's one-time warnings afresh (they are once per process, so without this a test's
    warning would depend on which tests ran before it)."""
    from olss_fast.core import checks

    checks._warned.clear()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models gain nothing from intra-op threads, on a shared 2-core machine OpenMP spin-waiting makes them
    10-15x slower, and the multi-process tests' workers run with one thread (bitwise-identical kernels need the
    same). The setting is restored for the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def unfinished(tmp_path, monkeypatch):
    """A recording checkpoint of 2 of 4 work items (the recording crashed in its third batch; tests/test_hostile_inputs
    has the crashing pipeline)."""
    from olss_fast import GramStats
    from olss_fast.fit.recording import record_trajectories
    from test_hostile_inputs import PROMPTS, REC, CrashingGMM, gmm

    monkeypatch.setattr(CrashingGMM, "calls", 0)
    monkeypatch.setattr(CrashingGMM, "crash_at", 2)
    path = tmp_path / "ck.safetensors"
    with pytest.raises(RuntimeError, match="simulated crash"):
        record_trajectories(gmm(), PROMPTS, checkpoint=path, checkpoint_every=1, **REC)
    monkeypatch.setattr(CrashingGMM, "crash_at", 10**9)
    assert GramStats.load(path).meta["record_checkpoint"]["done"] == [[0, 2]]
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run by benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
