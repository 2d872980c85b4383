"""Trust boundaries, part 2: bounded loaders, provenance that cannot be bypassed, and what seeded fuzzing found
(one test per finding of the hostile-neighbour review; each says which finding it covers).

"Re-signed" files have their digest recomputed after an edit, as a careless tool (or anyone who knows the format)
would: a digest proves nothing about who wrote a file, so these edits must be caught by what the fields mean.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import struct
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch

from olss_fast import GramStats, OLSSSchedule, OLSSScheduler, search_schedule
from olss_fast.core import files
from olss_fast.core.fingerprint import fingerprint
from olss_fast.core.stats import DIGEST_KEY
from olss_fast.fit.recording import record_trajectories
from olss_fast.models.gmm import make_gmm
from olss_fast.serve.scheduler_config import CONFIG_DIGEST_KEY, config_digest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from helpers import peak_rss_growth, perturbed, resign_schedule_dict, rewrite_stats_file  # noqa: E402
from test_hostile_inputs import PROMPTS, REC, edit_info, gmm, resume  # noqa: E402

MiB = 2**20
#: another noise schedule than the GMM pipeline's (scaled_linear 0.00085 … 0.012)
OTHER = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


@pytest.fixture(scope="module")
def recording() -> Any:
    pipe = make_gmm((2, 3, 3), num_components=3, seed=0)
    stats = record_trajectories(pipe, [0, 1, 2, 1, 0, 2], teacher_steps=12, batch_size=2, progress=False)
    return pipe, stats


def _write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _gmm_config(pipe: Any, **changes: Any) -> dict:
    return {k: v for k, v in dict(pipe.scheduler.config, **changes).items() if not k.startswith("_")}


# ================================================================================================ 3. bounded loaders
def test_item_ranges_are_never_expanded(tmp_path: Path, recording: Any) -> None:
    """Regression (statistics items expanded into a set): a re-signed file claiming 3 million work items in one range
    loads, merges and is checked for shared items without building anything per item."""
    _, stats = recording
    n = 3_000_000
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    stats.save(a)
    stats.save(b)
    rewrite_stats_file(a, header=lambda h: dict(h, items=[[0, n]], num_samples=n))
    rewrite_stats_file(b, header=lambda h: dict(h, items=[[n, 2 * n]], num_samples=n))
    tracemalloc.start()
    try:
        sa, sb = GramStats.load(a), GramStats.load(b)
        both = sa + sb
        with pytest.raises(ValueError, match=f"share {n} work item"):
            both + sa
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert both.items == [[0, 2 * n]] and both.num_samples == 2 * n
    assert peak < 16 * MiB, f"{peak / MiB:.0f} MiB of Python objects"


def test_updating_costs_the_same_whatever_was_recorded(recording: Any) -> None:
    """Regression (``update(items=...)`` rebuilds the item set on every call: quadratic): one more sample added to
    statistics that hold 3 million costs no memory per held item; 300 single-sample updates leave one range (the
    time of 5k–20k updates is in benchmarks/trust_costs.py)."""
    _, stats = recording
    x = torch.randn(13, 1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    e = torch.randn(12, 1, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    big = stats.copy()
    big.items, big.num_samples = [[0, 3_000_000]], 3_000_000
    tracemalloc.start()
    try:
        big.update(x, e, items=[3_000_000])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert big.items == [[0, 3_000_001]] and peak < 4 * MiB, f"{peak / MiB:.1f} MiB"
    small = GramStats(stats.timesteps, prediction_type="epsilon")
    for i in range(300):
        small.update(x, e, items=[i])
    assert small.items == [[0, 300]] and small.num_samples == 300


def _sparse_stats_file(path: Path, teacher_steps: int, channels: int, digest: str) -> int:
    """A statistics file whose header claims a [C, 2T+1, 2T+1] float64 Gram matrix, the data a hole (sparse)."""
    m = 2 * teacher_steps + 1
    header = {"format": "olss_fast.gram_stats", "version": 2, "timesteps": list(range(teacher_steps - 1, -1, -1)),
              "teacher": "t", "model": "m", "prediction_type": "epsilon", "context": {}, "num_samples": 1,
              "sample_shape": [channels, 8, 8], "dtype": "float32", "items": [[0, 1]], "meta": {}}
    nbytes = channels * m * m * 8
    outer = json.dumps({"__metadata__": {"olss_fast": json.dumps(header), DIGEST_KEY: digest},
                        "gram": {"dtype": "F64", "shape": [channels, m, m], "data_offsets": [0, nbytes]}}).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(outer)) + outer)
        fh.truncate(8 + len(outer) + nbytes)
    return nbytes


def test_a_huge_claimed_gram_costs_nothing_before_its_digest(tmp_path: Path) -> None:
    """Regression (a sparse file whose header claims a large Gram reached twice its size in memory before the digest
    refused it): the sizes are checked against the file's real size and the digest is verified, in chunks, before
    the matrix is allocated."""
    path = tmp_path / "sparse.safetensors"
    nbytes = _sparse_stats_file(path, teacher_steps=1000, channels=4, digest="0" * 64)
    assert nbytes > 120 * MiB and os.stat(path).st_blocks * 512 < MiB  # a 128 MB claim, almost nothing on disk

    def load() -> None:
        with pytest.raises(ValueError, match="digest"):
            GramStats.load(path)

    _, grew = peak_rss_growth(load)
    assert grew < 48 * MiB, f"peak memory grew by {grew / MiB:.0f} MiB"
    with open(path, "r+b") as fh:  # the same claim in a file that is really short
        fh.truncate(36 * 1024)
    with pytest.raises(ValueError, match="size"):
        GramStats.load(path)


@pytest.mark.parametrize("kind", ["schedule", "scheduler config"])
def test_hostile_json_is_refused_before_it_is_built(tmp_path: Path, kind: str) -> None:
    """Regression (a 64 MiB schedule or scheduler config of empty objects took GBs before its ValueError): what a file
    may hold is bounded by what the format needs and counted before anything is parsed."""
    body = ",".join(["{}"] * (4 * 2**20))  # 12 MB of empty objects
    if kind == "schedule":
        path = tmp_path / "s.json"
        path.write_text('{"format": "olss_fast.schedule", "version": 2, "coeffs": [' + body + "]}")
        load: Any = lambda: OLSSSchedule.load(path)  # noqa: E731
    else:
        path = tmp_path / "sched"
        path.mkdir()
        (path / "scheduler_config.json").write_text('{"_class_name": "OLSSScheduler", "schedules": [' + body + "]}")
        load = lambda: OLSSScheduler.from_pretrained(path)  # noqa: E731

    def refused() -> None:
        with pytest.raises(ValueError, match="more values"):
            load()

    _, grew = peak_rss_growth(refused)
    assert grew < 64 * MiB, f"peak memory grew by {grew / MiB:.0f} MiB"


def test_a_file_swapped_for_a_fifo_cannot_hang_a_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       recording: Any) -> None:
    """Regression (a regular file swapped for a FIFO between the check and the open blocked forever): files are
    opened once, non-blocking, and the opened descriptor is checked; whenever the swap happens, the outcome is the
    file's content or a ValueError, never a hang."""
    _, stats = recording
    sched = search_schedule(stats, 3)
    path = tmp_path / "s.json"
    real_stat = os.stat

    def swapping_stat(p: Any, *args: Any, **kwargs: Any) -> Any:
        out = real_stat(p, *args, **kwargs)
        if isinstance(p, (str, os.PathLike)) and os.fspath(p) == str(path) and not hasattr(swapping_stat, "done"):
            swapping_stat.done = True  # type: ignore[attr-defined]
            os.unlink(path)
            os.mkfifo(path)  # no writer will ever open it
        return out

    class Hung(Exception):
        """Not an OSError: a loader that wraps OSErrors must not turn the hang into a refusal."""

    def alarm(*_: Any) -> None:
        raise Hung("the loader hung on a FIFO")

    old = signal.signal(signal.SIGALRM, alarm)
    try:
        for swap in (False, True):
            if path.exists():
                path.unlink()
            sched.save(path)
            if swap:
                monkeypatch.setattr(os, "stat", swapping_stat)
            else:
                path.unlink()
                os.mkfifo(path)
            signal.alarm(5)
            try:
                got = OLSSSchedule.load(path)
                assert got.to_dict() == sched.to_dict()
            except ValueError as exc:
                assert "not a regular file" in str(exc)
            finally:
                signal.alarm(0)
                monkeypatch.setattr(os, "stat", real_stat)
    finally:
        signal.signal(signal.SIGALRM, old)


# ================================================================================================ 4. provenance
def test_every_file_without_provenance_says_so(tmp_path: Path, recording: Any,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Regression (downgrade to version 1: the warning fired once per process, so a second downgraded file passed in
    silence): every such file warns when it is read and when it runs on a scheduler it cannot be checked against."""
    pipe, stats = recording
    other = _gmm_config(pipe, **OTHER)
    for seed in (101, 102):
        d = perturbed(search_schedule(stats, 3), seed=seed).to_dict()
        d["version"] = 1
        del d["sha256"], d["fitted_for"]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="olss_fast"):
            s = OLSSSchedule.load(_write(tmp_path / f"v1_{seed}.json", d))
            OLSSScheduler.from_schedules([s], config=other)
        assert "version-1" in caplog.text and "records no noise schedule" in caplog.text, seed


def test_partial_provenance_cannot_hide_a_mismatch(tmp_path: Path, recording: Any,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Regression (``fitted_for`` emptied or partial on another noise schedule: no refusal, no warning): a schedule
    that does not record its noise schedule says so wherever it runs; one that records it is refused there."""
    pipe, stats = recording
    other = _gmm_config(pipe, **OTHER)
    base = search_schedule(stats, 3)
    for i, fitted_for in enumerate(({}, {"guidance_scale": 1.0}, {"noise_schedule": None, "latent_shape": [2, 3, 3]})):
        d = perturbed(base, seed=200 + i).to_dict()
        d["fitted_for"] = fitted_for
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="olss_fast"):
            s = OLSSSchedule.load(_write(tmp_path / f"p{i}.json", resign_schedule_dict(d)))
            OLSSScheduler.from_schedules([s], config=other)
        assert "records no noise schedule" in caplog.text, fitted_for
    with pytest.raises(ValueError, match="noise schedule"):
        OLSSScheduler.from_schedules([base], config=other)


def test_an_acceptance_names_what_it_accepted(tmp_path: Path, recording: Any) -> None:
    """Regression (``accepted_mismatch`` in a file accepted any later mismatch): a schedule accepted on noise schedule
    B runs on B, and is refused on C, also when the acceptance is carried over by a saved and edited folder; the old
    list form, which names no setting, is refused."""
    pipe, stats = recording
    sched = search_schedule(stats, 3)
    b = _gmm_config(pipe, **OTHER)
    c = _gmm_config(pipe, beta_schedule="linear", beta_start=1e-4, beta_end=0.03)
    folder = tmp_path / "sched_b"
    OLSSScheduler.from_schedules([sched], config=b, allow_mismatch=("noise_schedule",)).save_pretrained(folder)
    accepted = OLSSScheduler.from_pretrained(folder).schedules[3]
    OLSSScheduler.from_schedules([accepted], config=b)  # what was accepted
    with pytest.raises(ValueError, match="noise schedule"):
        OLSSScheduler.from_schedules([accepted], config=c)
    cfg = json.loads((folder / "scheduler_config.json").read_text())
    cfg.update(beta_end=0.03)
    cfg[CONFIG_DIGEST_KEY] = config_digest(cfg)
    (folder / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="noise schedule"):
        OLSSScheduler.from_pretrained(folder)
    d = sched.to_dict()
    d["fitted_for"]["accepted_mismatch"] = ["noise_schedule", "prediction_type"]
    with pytest.raises(ValueError, match="must name the setting"):
        OLSSSchedule.from_dict(resign_schedule_dict(d))


def test_timesteps_must_lie_on_the_noise_schedule(tmp_path: Path, recording: Any) -> None:
    """Regression (timesteps not checked against the noise schedule): 5000…2000 on a 1000-step schedule, fractional
    timesteps on a VP model, statistics with timesteps ×10, and a scheduler config whose schedules step at or above
    its num_train_timesteps are refused."""
    pipe, stats = recording
    cfg = _gmm_config(pipe)
    coeffs = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.1, 0.1]], dtype=torch.float64)
    for ts, match in (([5000, 2000], "timestep 5000"), ([999.5, 500.5], "timestep 999.5")):
        with pytest.raises(ValueError, match=match):
            OLSSScheduler.from_schedules([OLSSSchedule(ts, [0, 5], coeffs, teacher_steps=10)], config=cfg)
    path = tmp_path / "x10.safetensors"
    stats.save(path)
    rewrite_stats_file(path, header=lambda h: dict(h, timesteps=[10 * t for t in h["timesteps"]]))
    with pytest.raises(ValueError, match="not one of the VP noise schedule's"):
        GramStats.load(path)
    found = search_schedule(stats, 3)
    unrecorded = OLSSSchedule(found.timesteps, found.indices, found.coeffs, teacher_steps=found.teacher_steps)
    with pytest.raises(ValueError, match="timestep"):
        OLSSScheduler.from_schedules([unrecorded], config=dict(cfg, num_train_timesteps=500))
    folder = tmp_path / "sched"
    OLSSScheduler.from_schedules([found], config=cfg).save_pretrained(folder)
    doc = json.loads((folder / "scheduler_config.json").read_text())
    doc["num_train_timesteps"] = 500
    doc[CONFIG_DIGEST_KEY] = config_digest(doc)
    (folder / "scheduler_config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="timestep"):
        OLSSScheduler.from_pretrained(folder)


def test_the_weights_fingerprint_sees_every_weight() -> None:
    """Regression (fingerprints sampled 16 values per tensor): editing a value the sampled digest never looks at
    changes the fingerprint (already fixed by the restructuring; kept as a regression test)."""
    module = torch.nn.Linear(64, 64)
    before, sampled = fingerprint(module), fingerprint(module, samples=16)
    with torch.no_grad():
        module.weight.view(-1)[1] += 1e-3  # between the 16 evenly spaced samples
    assert fingerprint(module, samples=16) == sampled  # what the old digest saw: nothing
    assert fingerprint(module) != before


def test_a_checkpoint_of_one_model_is_not_resumed_with_another(unfinished: Path) -> None:
    """Regression (a recording checkpoint of model A resumed with model B that differs only where the sampled digest
    does not look silently mixed both models' statistics): refused, naming the model weights (already fixed by the
    restructuring; kept as a regression test)."""
    other = gmm()
    with torch.no_grad():
        other.unet.means.view(-1)[1] += 0.25  # index 1: not among the 16 evenly spaced samples of 54 values
    with pytest.raises(ValueError, match="model weights"):
        record_trajectories(other, PROMPTS, checkpoint=unfinished, checkpoint_every=1, resume=True, **REC)


def test_statistics_without_items_do_not_merge_with_themselves(tmp_path: Path, recording: Any) -> None:
    """Regression (statistics without item ranges merged with themselves: ``a + a`` counted 60 duplicates): merging
    statistics that record no work items needs the caller's statement that they are disjoint."""
    _, stats = recording
    path = tmp_path / "noitems.safetensors"
    stats.save(path)
    rewrite_stats_file(path, header=lambda h: dict(h, items=None))
    a, b = GramStats.load(path), GramStats.load(path)
    with pytest.raises(ValueError, match="disjoint=True"):
        a + b
    with pytest.raises(ValueError, match="disjoint=True"):
        a.copy().merge_(b)
    assert a.merge_(b, disjoint=True).num_samples == 2 * stats.num_samples  # the caller's explicit statement


def test_coefficients_are_bounded_and_a_non_finite_step_is_refused(tmp_path: Path, recording: Any) -> None:
    """Regression (coefficients ×1e30, or one of 3e38, loaded and produced NaN images): refused at load; a step that
    produces NaN or Inf latents is a ValueError naming the step."""
    pipe, stats = recording
    sched = search_schedule(stats, 3)
    for name, edit in (("x1e30", lambda c: [[v * 1e30 for v in row] for row in c]),
                       ("3e38", lambda c: [[3e38] + row[1:] for row in c])):
        d = sched.to_dict()
        d["coeffs"] = edit(d["coeffs"])
        with pytest.raises(ValueError, match="coefficient"):
            OLSSSchedule.load(_write(tmp_path / f"{name}.json", resign_schedule_dict(d)))
    scheduler = OLSSScheduler.from_schedules([sched], config=pipe.scheduler.config)
    scheduler.set_timesteps(3)
    x = torch.zeros(1, 2, 3, 3)
    x1 = scheduler.step(torch.ones_like(x), scheduler.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match="step 1 .* NaN or Inf"):
        scheduler.step(torch.full_like(x, float("inf")), scheduler.timesteps[1], x1)


def test_duplicate_keys_and_out_of_range_numbers_are_refused(tmp_path: Path, recording: Any) -> None:
    """Regression (duplicate JSON keys accepted: the file shows one coefficient, the loader uses another; ``1e400``
    parsed to inf in v1 ``meta`` and signed statistics headers and failed later): refused at load, saying why."""
    _, stats = recording
    sched = search_schedule(stats, 3)
    used = sched.to_dict()
    shown = [[round(v, 3) for v in row] for row in used["coeffs"]]
    text = '{"coeffs": ' + json.dumps(shown) + ", " + json.dumps(used)[1:]  # a viewer shows the first one
    (tmp_path / "dup.json").write_text(text)
    with pytest.raises(ValueError, match="appears twice"):
        OLSSSchedule.load(tmp_path / "dup.json")
    v1 = {k: v for k, v in used.items() if k not in ("sha256", "fitted_for")}
    v1.update(version=1, meta={"x": "HUGE"})
    (tmp_path / "v1.json").write_text(json.dumps(v1).replace('"HUGE"', "1e400"))
    with pytest.raises(ValueError, match="beyond the float range"):
        OLSSSchedule.load(tmp_path / "v1.json")
    path = tmp_path / "s.safetensors"
    stats.save(path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    from olss_fast.core.stats import stats_digest

    with safe_open(str(path), framework="pt") as fh:
        meta, gram = dict(fh.metadata()), fh.get_tensor("gram").clone()
    header = json.loads(meta["olss_fast"])
    header["meta"] = {"x": "HUGE"}
    meta["olss_fast"] = json.dumps(header).replace('"HUGE"', "1e400")
    meta[DIGEST_KEY] = stats_digest(meta["olss_fast"], gram)
    save_file({"gram": gram}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="beyond the float range"):
        GramStats.load(path)


def test_long_file_names_get_short_temporaries(tmp_path: Path, recording: Any) -> None:
    """Regression (legal 236–255-character names failed with ENAMETOOLONG: the temporary adds ~20 characters): such
    names are written and read back."""
    pipe, stats = recording
    sched = search_schedule(stats, 3)
    s_path = tmp_path / ("s" * 250 + ".json")
    g_path = tmp_path / ("g" * 243 + ".safetensors")
    folder = tmp_path / ("f" * 255)
    sched.save(s_path)
    stats.save(g_path)
    OLSSScheduler.from_schedules([sched], config=pipe.scheduler.config).save_pretrained(folder)
    assert OLSSSchedule.load(s_path).to_dict() == sched.to_dict()
    assert torch.equal(GramStats.load(g_path).gram, stats.gram)
    assert OLSSScheduler.from_pretrained(folder).schedules[3].to_dict() == sched.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([s_path.name, g_path.name, folder.name])


# ================================================================================================ 5. fuzzing findings
def test_reading_never_reserves_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (``read_limited`` asked ``read()`` for its 8 GiB limit, which CPython reserves up front: a 700-byte
    entry raised MemoryError under an address-space limit): reads go in chunks up to the file's real size, so a
    limit of a petabyte costs nothing."""
    from helpers import artifact_payload

    from olss_fast.serve import compile_cache

    path = tmp_path / "small.json"
    path.write_text('{"a": 1}' * 80)
    assert files.read_limited(path, 2**50, "a file") == path.read_bytes()
    payload = artifact_payload([("inductor", "fabc", b"code")])
    loaded: list = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (payload, None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loaded.append(data))
    monkeypatch.setattr(compile_cache, "MAX_ENTRY_BYTES", 2**50)
    cache = compile_cache.CompileCache(tmp_path / "cache")
    cache.save("k", {"a": 1})
    assert cache.load("k", {"a": 1}) is True and loaded == [payload]


def test_loaded_statistics_do_not_depend_on_the_file(tmp_path: Path, recording: Any) -> None:
    """Regression (a loaded Gram matrix stayed mapped to its file: truncating the file killed the process with
    SIGBUS): the matrix is read into memory of its own; rewriting the file in place changes nothing."""
    _, stats = recording
    path = tmp_path / "s.safetensors"
    stats.save(path)
    loaded = GramStats.load(path)
    before = loaded.gram.clone()
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(size - 512)
        fh.write(b"\x7f" * 512)
    assert torch.equal(loaded.gram, before)


def test_export_refuses_a_tokenizer_beyond_the_text_encoders_vocabulary(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (the export wrote manifests its own runner then called corrupted: a tokenizer whose ids exceed the
    text encoder's vocabulary): refused when the export is planned, before anything is exported."""
    pytest.importorskip("onnx")
    from olss_fast.export import onnx_export
    from olss_fast.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.text_encoder.config.vocab_size = len(pipe.tokenizer) - 10
    sched = OLSSScheduler.from_config(pipe.scheduler.config).ddim_schedule(2)
    monkeypatch.setattr(onnx_export, "_write_export", lambda *a, **k: pytest.fail("exported before refusing"))
    with pytest.raises(ValueError, match="vocabulary"):
        onnx_export.export_onnx(pipe, sched, tmp_path / "export")


def test_scheduler_configs_whose_noise_schedule_reaches_zero_alpha(tmp_path: Path) -> None:
    """Regression (noise schedules that reach ᾱ = 0 loaded, and the DDIM fallback sampled NaN): refused for an
    epsilon-predicting model, in a constructor and in a (re-signed) file; zero terminal SNR with v-prediction, what
    it is made for, works."""
    bad = [dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.99), dict(trained_betas=[0.5] * 1000),
           dict(trained_betas=[1.0] * 1000), dict(rescale_betas_zero_snr=True),
           dict(trained_betas=[0.01] * 999 + [1.0])]
    for cfg in bad:
        with pytest.raises(ValueError, match="ᾱ = 0"):
            OLSSScheduler(**cfg)
    ok = OLSSScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ok.set_timesteps(4)
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ok.step(torch.zeros_like(x), ok.timesteps[0], x).prev_sample).all()
    folder = tmp_path / "s"
    OLSSScheduler().save_pretrained(folder)
    doc = json.loads((folder / "scheduler_config.json").read_text())
    doc.update(beta_end=0.99)
    doc[CONFIG_DIGEST_KEY] = config_digest(doc)
    (folder / "scheduler_config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="ᾱ = 0"):
        OLSSScheduler.from_pretrained(folder)


def test_scheduler_config_private_fields_and_digests(tmp_path: Path, recording: Any) -> None:
    """Regression (``_use_default_values`` never checked: ``["schedules"]`` or ``"schedules"`` silently dropped every
    searched schedule; ``_olss_sha256: null`` meant "no digest"; ``""`` plus a private key holding 1e400 passed):
    unknown private fields, a null or malformed digest and out-of-range numbers are refused."""
    pipe, stats = recording
    folder = tmp_path / "s"
    OLSSScheduler.from_schedules([search_schedule(stats, 3)], config=pipe.scheduler.config).save_pretrained(folder)
    original = json.loads((folder / "scheduler_config.json").read_text())

    def variant(edit: Any, resign: bool = True, raw: Any = None) -> Path:
        out = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folder, out)
        doc = json.loads(json.dumps(original))
        edit(doc)
        if resign:
            doc[CONFIG_DIGEST_KEY] = config_digest(doc)
        text = json.dumps(doc)
        (out / "scheduler_config.json").write_text(raw(text) if raw else text)
        return out

    cases = [
        (lambda d: d.update(_use_default_values=["schedules"]), True, None, "unknown private field"),
        (lambda d: d.update(_use_default_values="schedules"), True, None, "unknown private field"),
        (lambda d: d.update({CONFIG_DIGEST_KEY: None, "beta_end": 0.013}), False, None, "SHA-256"),
        (lambda d: d.update({CONFIG_DIGEST_KEY: "", "_x": "HUGE"}), False, lambda t: t.replace('"HUGE"', "1e400"),
         "float range|unknown private|SHA-256"),
    ]
    for edit, resign, raw, match in cases:
        with pytest.raises(ValueError, match=match):
            OLSSScheduler.from_pretrained(variant(edit, resign, raw))
    assert OLSSScheduler.from_pretrained(folder).available_steps == [3]


def test_versions_are_exact_integers(tmp_path: Path, recording: Any, unfinished: Path) -> None:
    """Regression (versions given as floats or bools, ``1.0``, ``2.0``, ``true``, were accepted in every format)."""
    _, stats = recording
    d = search_schedule(stats, 3).to_dict()
    for v in (2.0, True):
        with pytest.raises(ValueError, match="version"):
            OLSSSchedule.from_dict(resign_schedule_dict(dict(d, version=v)))
    path = tmp_path / "s.safetensors"
    stats.save(path)
    rewrite_stats_file(path, header=lambda h: dict(h, version=2.0))
    with pytest.raises(ValueError, match="version"):
        GramStats.load(path)
    rewrite_stats_file(unfinished, header=edit_info(version=1.0))
    with pytest.raises(ValueError, match="checkpoint version"):
        resume(unfinished)


@pytest.mark.parametrize("case, match", [
    ("seeds_per_prompt", "differs in seeds per prompt"), ("num_prompts", "differs in number of prompts"),
    ("sample_shape", "shape"), ("scheduler_config", "does not match its fingerprint"),
    ("dtype", "recorded in float16"), ("items", "differ from the items"),
])
def test_checkpoint_identity_is_type_exact_and_complete(unfinished: Path, case: str, match: str) -> None:
    """Regression (the job fingerprint compared with Python ``==``: ``true`` for 1, ``4.0`` for 4, ``[2.0, 3, 3]``
    resumed; edits outside the fingerprint — ``meta.scheduler_config``, the header ``dtype``, ``items: null`` —
    resumed to a result that differs from an uninterrupted run): all refused."""
    def edit(h: dict) -> dict:
        fp = h["meta"]["record_checkpoint"]["fingerprint"]
        if case == "seeds_per_prompt":
            fp["seeds_per_prompt"] = True
        elif case == "num_prompts":
            fp["num_prompts"] = float(fp["num_prompts"])
        elif case == "sample_shape":
            fp["sample_shape"] = [float(fp["sample_shape"][0])] + fp["sample_shape"][1:]
        elif case == "scheduler_config":
            h["meta"]["scheduler_config"]["beta_end"] = 0.02
        elif case == "dtype":
            h["dtype"] = "float16"
        else:
            h["items"] = None
        return h

    rewrite_stats_file(unfinished, header=edit)
    with pytest.raises(ValueError, match=match):
        resume(unfinished)


def test_impossible_gram_matrices_and_dtypes_are_refused(tmp_path: Path, recording: Any) -> None:
    """Regression (an indefinite Gram passed ``check_gram``: G[5,5] = 0 with row 5 non-zero; statistics ``dtype``
    ``"junk"``, ``"int64"`` or ``null`` accepted)."""
    _, stats = recording
    path = tmp_path / "s.safetensors"

    def zero_norm(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[:, 5, 5] = 0
        return g

    stats.save(path)
    rewrite_stats_file(path, gram=zero_norm)
    with pytest.raises(ValueError, match="product of the two norms"):
        GramStats.load(path)
    for dtype in ("junk", "int64", None):
        stats.save(path)
        rewrite_stats_file(path, header=lambda h: dict(h, dtype=dtype))
        with pytest.raises(ValueError, match="dtype"):
            GramStats.load(path)
