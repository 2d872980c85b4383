"""Resumable recording: a SIGKILLed recording resumes to bitwise the statistics of an uninterrupted run;
corrupted or foreign checkpoints are refused; finished statistics are re-searched without running the pipeline."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from olss_fast import GramStats, OLSSSchedule, cli, fit_olss_scheduler, search_schedule
from olss_fast.core.ranges import to_ranges
from olss_fast.fit.checkpoint import from_ranges
from olss_fast.fit.recording import record_trajectories

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from resume_worker import HangingGMM, gmm_pipeline, load_hanging  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [0, 1, 2, 1, 0, 2]
# 6 prompts x 2 seeds = 12 work items in 6 batches of 2
ARGS = ["--teacher-steps", "20", "--steps", "3", "5", "--batch-size", "2", "--seeds-per-prompt", "2",
        "--guidance-scale", "2.0", "--checkpoint-every", "1", "--quiet"]
REC = dict(teacher_steps=20, batch_size=2, seeds_per_prompt=2, guidance_scale=2.0)


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def reference():
    """Uninterrupted run: statistics and refined schedules (no checkpoint)."""
    return fit_olss_scheduler(gmm_pipeline(), PROMPTS, num_steps=(3, 5), progress=False, **REC)


def crashed_checkpoint(path: Path, after_batches: int = 2, **overrides):
    """Record until an exception after ``after_batches`` batches (checkpoint every batch)."""
    seen = []

    def on_batch(items, x, e):
        seen.append(items)
        if len(seen) == after_batches + 1:
            raise Crash()

    kw = dict(REC, **overrides)
    with pytest.raises(Crash):
        record_trajectories(gmm_pipeline(), PROMPTS, progress=False, checkpoint=path, checkpoint_every=1,
                            on_batch=on_batch, **kw)
    return path


def test_sigkilled_cli_recording_resumes_to_identical_statistics(tmp_path, reference, monkeypatch):
    out = tmp_path / "out"
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    common = ["search", "--pipeline", "gmm", "--prompts", str(tmp_path / "prompts.json"), "--out", str(out), *ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, str(HERE / "resume_worker.py"), "3", *common], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:  # the 4th pipeline call starts after 3 batches were checkpointed
            if line.strip() == "CALL 3":
                break
        else:
            pytest.fail("worker ended early: " + proc.stderr.read()[-3000:])
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpt = out / "stats.safetensors"
    partial = GramStats.load(ckpt)
    info = partial.meta["record_checkpoint"]
    assert not info["complete"] and info["done"] == [[0, 6]] and partial.num_samples == 6
    # no temporary or result files; the killed writer's lock file stays behind unlocked (the OS released the lock)
    assert sorted(p.name for p in out.iterdir()) == [".stats.safetensors.lock", "stats.safetensors"]
    # an unfinished checkpoint is not searched as if it were finished
    assert cli.main(["search", "--stats", str(ckpt), "--steps", "3", "--no-refine", "--out", str(tmp_path / "x")]) == 2

    # resume (here, in-process; the same pipeline class, which no longer hangs) with --resume: the same statistics
    # bit for bit, the same refined schedules
    monkeypatch.setattr(HangingGMM, "hang_at", 10**9)
    monkeypatch.setattr(cli, "load_pipeline", load_hanging)
    assert cli.main([*common, "--resume"]) == 0
    assert not (out / ".stats.safetensors.lock").exists()  # taken over and removed by the resumed writer
    final = GramStats.load(ckpt)
    assert final.num_samples == 12 and final.meta["record_checkpoint"]["complete"]
    assert torch.equal(final.gram, reference.stats.gram)
    for n in (3, 5):
        sched = OLSSSchedule.load(out / f"schedule_{n}.json")
        assert sched.indices == reference.schedules[n].indices
        torch.testing.assert_close(sched.coeffs, reference.schedules[n].coeffs, rtol=1e-12, atol=1e-14)


def test_api_resume_after_crash_is_bitwise_and_progress_counts_restored_items(tmp_path, reference, capsys):
    ckpt = crashed_checkpoint(tmp_path / "ck.safetensors", after_batches=4)
    assert GramStats.load(ckpt).num_samples == 8
    stats = record_trajectories(gmm_pipeline(), PROMPTS, progress=True, checkpoint=ckpt, checkpoint_every=1,
                                resume=True, **REC)
    assert torch.equal(stats.gram, reference.stats.gram) and stats.num_samples == 12
    assert "8/12" in capsys.readouterr().err  # the bar starts at the restored items
    # resuming a finished checkpoint records nothing
    again = record_trajectories(gmm_pipeline(), PROMPTS, progress=False, checkpoint=ckpt, resume=True,
                                on_batch=lambda *a: pytest.fail("recorded again"), **REC)
    assert torch.equal(again.gram, reference.stats.gram)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(teacher_steps=25), "teacher steps: 20 in the checkpoint vs 25 now"),
        (dict(model_seed=1), "model weights"),
        (dict(prompts=[0, 1, 2, 1, 0, 1]), "prompt list"),
        (dict(seeds_per_prompt=3), "seeds per prompt: 2 in the checkpoint vs 3 now"),
        (dict(guidance_scale=3.0), "guidance scale"),
        (dict(batch_size=3), "batch size: 2 in the checkpoint vs 3 now"),
    ],
)
def test_mismatched_checkpoint_is_refused(tmp_path, change, message):
    ckpt = crashed_checkpoint(tmp_path / "ck.safetensors")
    before = ckpt.read_bytes()
    kw, change = dict(REC), dict(change)
    prompts = change.pop("prompts", PROMPTS)
    pipe = gmm_pipeline()
    if "model_seed" in change:
        from olss_fast.models.gmm import make_gmm

        pipe = make_gmm((2, 4, 4), num_components=3, seed=change.pop("model_seed"))
    kw.update(change)
    with pytest.raises(ValueError, match="different job|same batch size") as err:
        record_trajectories(pipe, prompts, progress=False, checkpoint=ckpt, resume=True, **kw)
    assert message in str(err.value)
    assert ckpt.read_bytes() == before  # never merged into or overwritten


def test_corrupted_or_existing_checkpoint_is_refused(tmp_path):
    ckpt = crashed_checkpoint(tmp_path / "ck.safetensors")
    with pytest.raises(ValueError, match="exists: pass resume=True"):
        record_trajectories(gmm_pipeline(), PROMPTS, progress=False, checkpoint=ckpt, **REC)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupted or unreadable"):
        record_trajectories(gmm_pipeline(), PROMPTS, progress=False, checkpoint=ckpt, resume=True, **REC)
    # plain statistics (no checkpoint header) cannot be resumed
    plain = record_trajectories(gmm_pipeline(), PROMPTS, progress=False, **REC)
    plain.meta.pop("record_checkpoint", None)
    plain.save(ckpt)
    with pytest.raises(ValueError, match="without checkpoint information"):
        record_trajectories(gmm_pipeline(), PROMPTS, progress=False, checkpoint=ckpt, resume=True, **REC)


class RefusingPipeline:
    """Has the scheduler config a fit needs, and fails if it is ever run."""

    def __init__(self):
        self.scheduler = DDIMScheduler.from_config(gmm_pipeline().scheduler.config)  # the recorded noise schedule

    def __call__(self, *args, **kwargs):
        raise AssertionError("the pipeline must not be called when re-searching statistics")


def test_finished_checkpoint_is_re_searched_without_recording(tmp_path, reference, monkeypatch):
    ckpt = tmp_path / "ck.safetensors"
    record_trajectories(gmm_pipeline(), PROMPTS, progress=False, checkpoint=ckpt, checkpoint_every=2, **REC)
    stats = GramStats.load(ckpt)
    assert stats.meta["record_checkpoint"]["complete"] and torch.equal(stats.gram, reference.stats.gram)
    res = fit_olss_scheduler(RefusingPipeline(), PROMPTS, stats=stats, num_steps=(4, 7), refine=False,
                             progress=False)
    for n in (4, 7):  # other step counts than recorded for, equal to a direct search of the reference statistics
        direct = search_schedule(reference.stats, n)
        assert res.schedules[n].indices == direct.indices
        torch.testing.assert_close(res.schedules[n].coeffs, direct.coeffs, rtol=0, atol=0)
    # the CLI: no pipeline is even loaded
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("pipeline loaded"))
    out = tmp_path / "re"
    assert cli.main(["search", "--stats", str(ckpt), "--steps", "4", "--no-refine", "--out", str(out)]) == 0
    torch.testing.assert_close(OLSSSchedule.load(out / "schedule_4.json").coeffs, res.schedules[4].coeffs,
                               rtol=0, atol=0)
    assert (out / "scheduler" / "scheduler_config.json").is_file()


def test_done_ranges_roundtrip():
    idx = {0, 1, 2, 5, 7, 8}
    assert to_ranges(idx) == [[0, 3], [5, 6], [7, 9]] and from_ranges(to_ranges(idx)) == idx
    for bad in ([[3, 1]], [[0, 2], [1, 3]], [[0, 2.5]], [[0, True]], [[0, 10**12]], "0-5", [[-1, 2]]):
        with pytest.raises(ValueError, match="'done'"):
            from_ranges(bad, limit=100)
