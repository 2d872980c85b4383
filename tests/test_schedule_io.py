"""OLSSSchedule JSON and GramStats safetensors: round trips, strict validation, atomic writes."""
import json
import os

import pytest
import torch

from olss_fast import GramStats, OLSSSchedule


def make_schedule(n=3, channels=None):
    c = torch.randn(n, n + 1, dtype=torch.float64).tril(1)
    if channels:
        c = torch.randn(channels, n, n + 1, dtype=torch.float64).tril(1)
    return OLSSSchedule(timesteps=[999 - 333 * j for j in range(n)], indices=[10 * j for j in range(n)], coeffs=c,
                        errors=[0.1] * n, teacher_steps=10 * n, teacher="DDIM-30")


@pytest.mark.parametrize("channels", [None, 4])
def test_schedule_round_trip_is_exact(tmp_path, channels):
    s = make_schedule(4, channels)
    s.save(tmp_path / "s.json")
    t = OLSSSchedule.load(tmp_path / "s.json")
    assert torch.equal(t.coeffs, s.coeffs) and t.timesteps == s.timesteps and t.indices == s.indices
    assert t.granularity == ("channel" if channels else "global") and t.errors == s.errors
    assert json.loads((tmp_path / "s.json").read_text())["version"] == 2


def test_float_timesteps_round_trip(tmp_path):
    s = OLSSSchedule(timesteps=[1000.0, 500.5], indices=[0, 3], coeffs=torch.tensor([[1.0, 0.5, 0], [1, 0.2, 0.3]]))
    s.save(tmp_path / "f.json")
    assert OLSSSchedule.load(tmp_path / "f.json").timesteps == [1000.0, 500.5]


def resign(d):
    """Re-compute a schedule dict's digest after an edit (so that the semantic checks, not the digest, are tested)."""
    import hashlib

    from olss_fast.core.files import canonical_json

    d = {k: v for k, v in d.items() if k != "sha256"}
    try:
        d["sha256"] = hashlib.sha256(canonical_json(d).encode()).hexdigest()
    except ValueError:  # NaN cannot be canonicalised: the reader refuses the literal before the digest
        d["sha256"] = "0" * 64
    return d


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(coeffs=[[1.0, float("nan"), 0, 0]] * 3), "NaN"),
        (lambda d: d.update(coeffs=[[1.0, 2.0]]), "rows"),
        (lambda d: d.update(timesteps=[1, 500, 999]), "descending"),
        (lambda d: d.update(indices=[1, 10, 20]), "index 0"),
        (lambda d: d.update(version=99), "version"),
        (lambda d: d.pop("coeffs"), "lacks"),
        (lambda d: d.update(timesteps=["a", "b", "c"]), "numbers"),
        (lambda d: d.update(coeffs=[[1, 1, 1, 1]] * 3), "right of column"),
        (lambda d: d.update(indices=[0, 1]), "indices"),
        (lambda d: d.update(granularity="channel"), "granularity"),
        (lambda d: d.update(indices=[0, 3.5, 7]), "integer"),
        (lambda d: d.update(refined="false"), "true or false"),
        (lambda d: d.update(timesteps=[1e308, 500.0, 1.0]), "overflows float32"),
        (lambda d: d.update(timesteps=[5000000, 500, 1]), "in \\[0"),
        (lambda d: d.update(timesteps=[999, 500, -7]), "in \\[0"),
        (lambda d: d["coeffs"][0].__setitem__(0, 1e39), "a coefficient must be a finite number in"),
        (lambda d: d["coeffs"][0].__setitem__(0, 10**400), "too large"),
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d.update(teacher_steps=True), "integer"),
        (lambda d: d.update(fitted_for={"guidance_scale": "7.5"}), "fitted_for.guidance_scale"),
    ],
)
def test_invalid_schedule_files_are_refused(tmp_path, mutate, match):
    d = make_schedule(3).to_dict()
    mutate(d)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(resign(d)))  # json.dumps writes NaN literally, as a careless writer would
    with pytest.raises(ValueError, match=match):
        OLSSSchedule.load(p)


def test_truncated_and_missing_schedule_files(tmp_path):
    p = tmp_path / "s.json"
    make_schedule(3).save(p)
    p.write_text(p.read_text()[:50])
    with pytest.raises(ValueError, match="not valid JSON"):
        OLSSSchedule.load(p)
    with pytest.raises(ValueError, match="does not exist"):
        OLSSSchedule.load(tmp_path / "nope.json")
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError):
        OLSSSchedule.load(p)


def test_constructing_invalid_schedule_raises():
    with pytest.raises(ValueError, match="NaN"):
        OLSSSchedule([9, 5], [0, 1], torch.tensor([[1.0, float("inf"), 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="at least one step"):
        OLSSSchedule([], [], torch.zeros(0, 1))


def _stats(seed=0, teacher="DDIM-5"):
    g = torch.Generator().manual_seed(seed)
    s = GramStats([900, 700, 500, 300, 100], teacher=teacher, model="m", prediction_type="epsilon")
    s.update(torch.randn(6, 3, 2, 4, generator=g), torch.randn(5, 3, 2, 4, generator=g))
    return s


def test_stats_round_trip(tmp_path):
    s = _stats()
    s.meta["note"] = "x"
    s.save(tmp_path / "st.safetensors")
    t = GramStats.load(tmp_path / "st.safetensors")
    assert torch.equal(t.gram, s.gram) and t.num_samples == 3 and t.sample_shape == (2, 4)
    assert t.timesteps == s.timesteps and t.teacher == "DDIM-5" and t.dtype == "float32" and t.meta == {"note": "x"}


def test_corrupted_stats_files_are_refused(tmp_path):
    p = tmp_path / "st.safetensors"
    _stats().save(p)
    data = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated|not a readable"):
        GramStats.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError):
        GramStats.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"gram": torch.zeros(1, 3, 3, dtype=torch.float64)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not an olss_fast statistics file"):
        GramStats.load(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        GramStats.load(tmp_path / "missing.safetensors")


def test_merging_different_teachers_is_refused():
    with pytest.raises(ValueError, match="different teachers"):
        _stats(teacher="DDIM-5") + _stats(teacher="DPM-5")
    other = GramStats([901, 700, 500, 300, 100], teacher="DDIM-5", model="m", prediction_type="epsilon")
    with pytest.raises(ValueError, match="timesteps"):
        _stats() + other


def test_saves_are_atomic(tmp_path, monkeypatch):
    import safetensors.torch as st

    p = tmp_path / "st.safetensors"
    _stats(seed=1).save(p)
    before = p.read_bytes()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        _stats(seed=2).save(p)
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["st.safetensors"]  # no temporary left behind

    s = tmp_path / "s.json"
    make_schedule(3).save(s)
    with pytest.raises(ValueError, match="does not exist"):
        make_schedule(3).save(tmp_path / "no" / "dir" / "s.json")


def test_version_1_schedule_files_are_read_without_provenance(tmp_path):
    d = make_schedule(3).to_dict()
    d["version"] = 1
    d.pop("fitted_for")
    d.pop("sha256")
    (tmp_path / "v1.json").write_text(json.dumps(d))
    s = OLSSSchedule.load(tmp_path / "v1.json")
    assert s.fitted_for == {} and s.num_steps == 3


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_written_files_follow_the_umask(tmp_path, mask):
    from olss_fast import OLSSScheduler

    old = os.umask(mask)
    try:
        make_schedule(3).save(tmp_path / "s.json")
        _stats().save(tmp_path / "g.safetensors")
        OLSSScheduler.from_schedules([make_schedule(3)]).save_pretrained(tmp_path / "sched")
    finally:
        os.umask(old)
    for p in (tmp_path / "s.json", tmp_path / "g.safetensors", tmp_path / "sched" / "scheduler_config.json"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


def test_edited_schedule_files_fail_their_digest(tmp_path):
    p = tmp_path / "s.json"
    make_schedule(3).save(p)
    d = json.loads(p.read_text())
    d["coeffs"][1][1] += 1e-9  # a valid value, but not the one written
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="does not match its sha256"):
        OLSSSchedule.load(p)


@pytest.mark.parametrize("kind", ["folder", "fifo", "huge", "deep"])
def test_schedule_reader_is_bounded(tmp_path, kind):
    p = tmp_path / "s.json"
    if kind == "folder":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "huge":
        with open(p, "wb") as fh:
            fh.truncate(2**31)  # a sparse 2 GiB file: refused by its size, never read
    else:
        p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError):
        OLSSSchedule.load(p)
