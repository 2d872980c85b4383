"""Every loader is strict, bounded and tamper-evident; every writer is atomic and exclusive.

One test per finding of the hostile-user review: corrupted or mismatched input gives a clear ``ValueError`` naming the
problem (never another exception type, never a silently different result), nothing is half-written when a writer is
killed, and two writers of one output do not both succeed.
"""
from __future__ import annotations

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from olss_fast import GramStats, OLSSSchedule, OLSSScheduler, fit_olss_scheduler
from olss_fast.models.gmm import GMMPipeline, make_gmm
from olss_fast.fit.recording import record_trajectories
from helpers import resign_schedule_dict, rewrite_stats_file
from olss_fast.core.files import temporary_name

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


# ================================================================================================ statistics, checkpoints
class CrashingGMM(GMMPipeline):
    crash_at = 10**9
    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls > type(self).crash_at:
            raise RuntimeError("simulated crash")
        return super().__call__(*args, **kwargs)


def gmm():
    pipe = make_gmm((2, 3, 3), num_components=3, seed=0)
    pipe.__class__ = CrashingGMM
    return pipe


REC = dict(teacher_steps=12, batch_size=1, progress=False)
PROMPTS = [0, 1, 2, 0]


def resume(path):
    return record_trajectories(gmm(), PROMPTS, checkpoint=path, checkpoint_every=1, resume=True, **REC)


def edit_info(**changes):
    def edit(h):
        h["meta"]["record_checkpoint"].update(changes)
        return h
    return edit


def test_checkpoint_headers_are_not_trusted_blindly(unfinished):
    import shutil

    def variant(name, header=None, gram=None, resign=True):
        p = unfinished.with_name(f"{name}.safetensors")
        shutil.copy(unfinished, p)
        rewrite_stats_file(p, header, gram, resign)
        return p

    # "complete" on a checkpoint holding 2 of 4 samples: refused (and refused to be searched as if finished)
    p = variant("complete", edit_info(complete=True))
    with pytest.raises(ValueError, match="marked complete but holds 2 of 4"):
        resume(p)
    with pytest.raises(ValueError, match="marked complete but holds 2 of 4"):
        GramStats.load(p) and importlib.import_module("olss_fast.fit.checkpoint").read_checkpoint(p)
    for bad in ("no", 1, None):
        with pytest.raises(ValueError, match="complete must be true or false"):
            resume(variant(f"complete_{bad}", edit_info(complete=bad)))
    # finished items that are not the first batches: refused (resuming would record 0-1 twice and 2-3 never)
    with pytest.raises(ValueError, match="finished work items differ from the items its statistics hold"):
        resume(variant("done_only", edit_info(done=[[2, 4]])))
    def shifted(h):
        h["meta"]["record_checkpoint"]["done"] = [[2, 4]]
        h["items"] = [[2, 4]]
        return h
    with pytest.raises(ValueError, match="not the first batches"):
        resume(variant("shifted", shifted))
    # an unbounded range is refused before anything is expanded
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="'done'"):
        resume(variant("huge", edit_info(done=[[0, 10**12]])))
    assert time.perf_counter() - t0 < 5
    # header fields that change the result are part of the job's identity
    def other_timesteps(h):
        h["timesteps"] = [t - 1 for t in h["timesteps"]]
        return h
    with pytest.raises(ValueError, match="statistics header .* does not match its fingerprint"):
        resume(variant("timesteps", other_timesteps))
    def other_pt(h):
        h["prediction_type"] = "v_prediction"
        return h
    with pytest.raises(ValueError, match="does not match its fingerprint"):
        resume(variant("ptype", other_pt))
    # the same edits without a matching digest are caught by the digest
    with pytest.raises(ValueError, match="sha256 digest"):
        resume(variant("unsigned", other_timesteps, resign=False))
    # and a genuine resume still works, bit for bit
    full = resume(unfinished)
    ref = record_trajectories(gmm(), PROMPTS, **REC)
    assert torch.equal(full.gram, ref.gram) and full.items == [[0, 4]]


def non_psd(g):
    """|G01| > sqrt(G00 G11): no two vectors have these inner products (Cauchy-Schwarz); diagonal unchanged."""
    g = g.clone()
    v = 3 * (g[:, 0, 0] * g[:, 1, 1]).sqrt()
    g[:, 0, 1] = v
    g[:, 1, 0] = v
    return g


def test_statistics_bit_flips_and_impossible_gram_matrices_are_refused(tmp_path):
    stats = record_trajectories(gmm(), PROMPTS, **REC)
    path = tmp_path / "s.safetensors"
    stats.save(path)
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    for trial in range(32):  # flips anywhere in the file: header JSON or Gram data
        blob = bytearray(data)
        pos = rng.randrange(8, len(blob))
        blob[pos] ^= 1 << rng.randrange(8)
        p = tmp_path / f"flip{trial}.safetensors"
        p.write_bytes(bytes(blob))
        with pytest.raises(ValueError):
            GramStats.load(p)
    assert header_len > 0
    import shutil

    for name, fn, match in (
        ("zeros", lambda g: torch.zeros_like(g), "zero squared norm"),
        ("negdiag", lambda g: g - 2 * torch.diag_embed(torch.diagonal(g, dim1=1, dim2=2)), "negative diagonal"),
        ("nonpsd", non_psd, "semi-definite|product of the two norms"),
        ("asym", lambda g: g + torch.triu(torch.ones_like(g), 1) * g.abs().max(), "symmetric"),
    ):
        p = tmp_path / f"{name}.safetensors"
        shutil.copy(path, p)
        rewrite_stats_file(p, gram=fn)
        with pytest.raises(ValueError, match=match):
            GramStats.load(p)
    for name, edit, match in (
        ("no_timesteps", lambda h: {k: v for k, v in h.items() if k != "timesteps"}, "lacks"),
        ("str_samples", lambda h: dict(h, num_samples="4"), "num_samples must be an integer"),
        ("float_ts", lambda h: dict(h, timesteps=[1e308] * len(h["timesteps"])), "timesteps"),
        ("items", lambda h: dict(h, items=[[0, 3]]), "lists 3 work items but holds 4"),
    ):
        p = tmp_path / f"{name}.safetensors"
        shutil.copy(path, p)
        rewrite_stats_file(p, header=edit)
        with pytest.raises(ValueError, match=match):
            GramStats.load(p)


def test_merging_never_counts_a_sample_twice():
    a = record_trajectories(gmm(), PROMPTS, **REC)
    with pytest.raises(ValueError, match="with themselves"):
        a + a
    with pytest.raises(ValueError, match="share 4 work item"):
        a + a.copy()
    # two halves of one job merge into the whole
    from olss_fast.fit.work import make_work_items

    items = make_work_items(PROMPTS)
    h1 = record_trajectories(gmm(), PROMPTS, items=items[:2], **REC)
    h2 = record_trajectories(gmm(), PROMPTS, items=items[2:], **REC)
    both = h1 + h2
    assert both.num_samples == 4 and both.items == [[0, 4]]
    torch.testing.assert_close(both.gram, a.gram, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="already in the statistics"):
        h1.update(torch.zeros(13, 1, 2, 3, 3), torch.zeros(12, 1, 2, 3, 3), items=[1])


# ================================================================================================ schedules, configs
def write_raw(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def sched_dict():
    return OLSSSchedule([900, 500], [0, 5], torch.tensor([[1.0, 0.5, 0.0], [0.9, 0.1, 0.2]]),
                        teacher_steps=10).to_dict()


@pytest.mark.parametrize("mutation", ["coeff_1e400", "index_neg_inf", "deep", "ts_5000_as_float32", "bool_index"])
def test_schedule_numbers_never_escape_as_other_exceptions(tmp_path, mutation):
    d = sched_dict()
    text = json.dumps(resign_schedule_dict(d))
    if mutation == "coeff_1e400":
        text = text.replace('"coeffs": [[1.0', '"coeffs": [[1' + "0" * 400)
    elif mutation == "index_neg_inf":
        text = text.replace('"indices": [0, 5]', '"indices": [0, -Infinity]')
    elif mutation == "deep":
        text = text.replace('"meta": {}', '"meta": ' + "[" * 50_000 + "]" * 50_000)
    elif mutation == "ts_5000_as_float32":
        text = json.dumps(resign_schedule_dict(dict(d, timesteps=[3.5e38 * 10, 1.0])))
    else:
        text = json.dumps(resign_schedule_dict(dict(d, indices=[False, 5])))
    with pytest.raises(ValueError):
        OLSSSchedule.load(write_raw(tmp_path / "s.json", text))


def test_files_that_are_not_files_are_refused_cheaply(tmp_path):
    (tmp_path / "dir.json").mkdir()
    os.symlink("/dev/zero", tmp_path / "zero.json")
    with open(tmp_path / "big.json", "wb") as fh:
        fh.truncate(2**31)
    for name in ("dir.json", "zero.json", "big.json"):
        t0 = time.perf_counter()
        with pytest.raises(ValueError):
            OLSSSchedule.load(tmp_path / name)
        with pytest.raises(ValueError):
            GramStats.load(tmp_path / name)
        with pytest.raises(ValueError):
            OLSSScheduler.from_pretrained(tmp_path / name)
        assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("content, match", [
    ("", "not valid JSON"), ('{"_class_name": "OLSSScheduler", "num_train', "not valid JSON"),
    ('{"_class_name": "DDIMScheduler"}', "not an OLSSScheduler"), ("[1, 2]", "JSON object"),
    ('{"_class_name": "OLSSScheduler", "num_train_timesteps": 1000000000}', "num_train_timesteps"),
    ('{"_class_name": "OLSSScheduler", "beta_start": "0.1"}', "beta_start"),
    ('{"_class_name": "OLSSScheduler", "schedules": {"a": 1}}', "schedules"),
    ('{"_class_name": "OLSSScheduler", "surprise": 1}', "unknown field"),
])
def test_scheduler_configs_are_read_strictly(tmp_path, content, match):
    (tmp_path / "scheduler_config.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        OLSSScheduler.from_pretrained(tmp_path)


def test_edited_scheduler_configs_fail_their_digest(tmp_path):
    OLSSScheduler.from_schedules([OLSSSchedule.from_dict(sched_dict())]).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    cfg["clip_sample"] = not cfg["clip_sample"]  # valid, but not what was written
    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match its digest"):
        OLSSScheduler.from_pretrained(tmp_path)


def test_values_are_never_coerced():
    from olss_fast.fit.config import RecordConfig
    from olss_fast.core.refine import refine_schedule

    s = OLSSSchedule.from_dict(sched_dict())
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        refine_schedule(s, lambda x, t: x, torch.zeros(2, 1), torch.zeros(11, 2, 1), batch_size=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        RecordConfig(guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="positive integer"):
        OLSSScheduler().set_timesteps(3.9)
    with pytest.raises(ValueError, match="integers"):
        OLSSSchedule([900, 500, 100], [0, 3.5, 7], torch.eye(3, 4, dtype=torch.float64))


# ================================================================================================ ONNX export folders
@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from test_runtime import make_digits_pipe

    from olss_fast.export.onnx_export import export_onnx

    pipe = make_digits_pipe()
    sched = OLSSScheduler.from_config(pipe.scheduler.config).ddim_schedule(2)
    return export_onnx(pipe, sched, tmp_path_factory.mktemp("ex") / "export", guidance_scale=2.0)


def broken_copy(export, tmp_path, edit, resign=True):
    import shutil

    from olss_fast.export.onnx_runner import manifest_digest

    out = tmp_path / "broken"
    shutil.copytree(export.path, out)
    m = json.loads((out / "manifest.json").read_text())
    edit(m, out)
    if resign:
        m["manifest_sha256"] = manifest_digest(m)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


@pytest.mark.parametrize("case, match", [
    ("steps_guidance", "disagree on the schedule"),
    ("guidance", "disagree on the guidance scale"),
    ("image_range", "disagree on the image range"),
    ("dotdot", "plain file name"),
    ("absolute", "plain file name"),
    ("no_sha", "component decoder has fields"),
    ("huge_bytes", "bytes must be a positive integer"),
    ("runner", "olss_onnx_runner.py does not match"),
    ("unsigned", "manifest_sha256"),
    # fields nothing checked (re-signed): they changed the images or lied
    ("uncond_ids", "disagree on the inputs"),
    ("uncond_zero", "disagree on the inputs"),
    ("id_limit", "disagree on the inputs"),
    ("batched", "disagree on the inputs"),
    ("image_shape", "image_shape"),
    ("external_data", "external_data"),
    ("exporter", "exporter must be"),
    ("olss_fast", "olss_fast must be"),
    ("version_float", "version"),
    # the runner copy: missing, a folder, /dev/zero, a FIFO, a huge sparse file
    ("runner_missing", "runner copy"),
    ("runner_folder", "runner copy"),
    ("runner_devzero", "runner copy"),
    ("runner_fifo", "runner copy"),
    ("runner_huge", "runner copy"),
])
def test_export_folders_are_checked_against_their_models(digits_export, tmp_path, case, match):
    """Every manifest field is checked (type, range, and against the models' own metadata), re-signed or not; the
    runner copy must be a small regular file."""
    from olss_fast.export.onnx_runner import OnnxOLSSRunner

    def edit(m, out):
        if case == "steps_guidance":  # a manifest describing another program than the graph holds
            other = OLSSSchedule([999, 799, 599, 399, 199], [0, 2, 4, 6, 8], torch.eye(5, 6, dtype=torch.float64),
                                 teacher_steps=10)
            m.update(schedule=other.to_dict(), num_inference_steps=5)
        elif case == "guidance":
            m.update(guidance_scale=7.5)
        elif case == "image_range":
            m.update(image_range="[-1,1]")
        elif case == "dotdot":
            m["components"]["decoder"]["file"] = "../decoder.onnx"
        elif case == "absolute":
            m["components"]["decoder"]["file"] = str(out / "decoder.onnx")
        elif case == "no_sha":
            del m["components"]["decoder"]["sha256"]
        elif case == "huge_bytes":
            m["components"]["decoder"]["bytes"] = 10**400
        elif case == "runner":
            with open(out / "olss_onnx_runner.py", "a") as fh:
                fh.write("\n# edited\n")
        elif case == "unsigned":
            m.update(guidance_scale=3.0)
        elif case in ("uncond_ids", "uncond_zero"):
            m.update(uncond_ids=5 if case == "uncond_ids" else 0)
        elif case == "id_limit":
            m.update(id_limit=12)
        elif case == "batched":
            m["cond_inputs"][0]["batched"] = False
        elif case == "image_shape":
            m.update(image_shape=[1, 1, 16, 16])
        elif case == "external_data":
            m["components"]["decoder"]["external_data"] = "ab"
        elif case == "exporter":
            m.update(exporter=5)
        elif case == "olss_fast":
            m.update(olss_fast=1)
        elif case == "version_float":
            m.update(version=float(m["version"]))
        elif case.startswith("runner_"):
            runner = out / "olss_onnx_runner.py"
            runner.unlink()
            if case == "runner_folder":
                runner.mkdir()
            elif case == "runner_devzero":
                runner.symlink_to("/dev/zero")
            elif case == "runner_fifo":
                os.mkfifo(runner)
            elif case == "runner_huge":
                with open(runner, "wb") as fh:
                    fh.truncate(8 * 2**30)

    with pytest.raises(ValueError, match=match):
        OnnxOLSSRunner(broken_copy(digits_export, tmp_path, edit, resign=case != "unsigned"))


# ================================================================================================ writers
def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".partial")))


@pytest.mark.parametrize("kind", ["schedule", "stats", "scheduler", "export"])
def test_killed_writers_leave_a_whole_old_or_new_file(tmp_path, kind):
    """SIGKILL a process that rewrites one output in a loop, at pseudo-random moments (seeded per kind): the output is
    always a complete version A or B, and the temporaries the kills left behind are removed by the next write.

    Regression: the stale-temporaries clean-up removed. Whether a kill lands mid-write is timing, so the test does not
    rely on it: a temporary named for a process that was killed guarantees at least one leftover, and the next write
    must remove it."""
    if kind == "export":
        pytest.importorskip("onnxruntime")
    from writer_worker import objects, write

    target = tmp_path / {"schedule": "s.json", "stats": "g.safetensors", "scheduler": "sched",
                         "export": "export"}[kind]
    a, b = objects(kind)
    rng = random.Random(f"killed-writer-{kind}")  # (not hash(): salted per process)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for _ in range(2 if kind != "export" else 1):
        proc = subprocess.Popen([sys.executable, str(HERE / "writer_worker.py"), kind, str(target)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            line = proc.stdout.readline()
            assert line.strip() == "READY", proc.stderr.read()[-3000:]
            time.sleep(rng.uniform(0.05, 1.5 if kind == "export" else 0.4))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=60)
        # the output is one whole version
        if kind == "schedule":
            got = OLSSSchedule.load(target)
            assert any(torch.equal(got.coeffs, o.coeffs) for o in (a, b))
        elif kind == "stats":
            got = GramStats.load(target)
            assert any(torch.equal(got.gram, o.gram) for o in (a, b))
        elif kind == "scheduler":
            got = OLSSScheduler.from_pretrained(target)
            assert any(torch.equal(got.schedules[6].coeffs, o.schedules[6].coeffs) for o in (a, b))
        else:
            from olss_fast.export.onnx_runner import OnnxOLSSRunner

            got = OnnxOLSSRunner(target)  # verifies every digest
            assert got.schedule in (a[1].to_dict(), b[1].to_dict())
    # a writer killed while it certainly holds a temporary (its name carries the killed process's pid)
    holder = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
    holder.kill()
    holder.wait(timeout=60)
    folder = target if kind == "scheduler" else target.parent  # (a scheduler writes the files inside its folder)
    final = folder / ("scheduler_config.json" if kind == "scheduler" else target.name)
    planted = temporary_name(final).name.replace(f".{os.getpid()}.", f".{holder.pid}.", 1)
    (folder / planted).write_bytes(b"half")
    assert planted in _temps(folder)
    # the next write removes what the killed writers left behind
    write(kind, a, target)
    assert _temps(target.parent) == [] and _temps(folder) == []


def test_two_writers_of_one_output_do_not_both_succeed(tmp_path, capsys):
    from olss_fast import cli
    from olss_fast.core.files import exclusive_lock

    out = tmp_path / "out"
    code = ("import sys, time; from olss_fast.core.files import exclusive_lock\n"
            f"with exclusive_lock({str(out)!r}, 'output folder'):\n    print('LOCKED', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        (tmp_path / "p.json").write_text("[0, 1]")
        rc = cli.main(["search", "--pipeline", "gmm", "--prompts", str(tmp_path / "p.json"), "--out", str(out),
                       "--teacher-steps", "6", "--steps", "2", "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and f"is being written by process {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    # in one process too: an export folder, a scheduler folder, a checkpoint
    sched = OLSSSchedule.from_dict(sched_dict())
    with exclusive_lock(tmp_path / "sched"):
        with pytest.raises(ValueError, match="being written"):
            OLSSScheduler.from_schedules([sched]).save_pretrained(tmp_path / "sched")
    with exclusive_lock(tmp_path / "ck.safetensors"):
        with pytest.raises(ValueError, match="being written"):
            record_trajectories(gmm(), PROMPTS, checkpoint=tmp_path / "ck.safetensors", **REC)
    assert not (tmp_path / "ck.safetensors").exists()


def test_fit_refuses_a_teacher_on_another_noise_schedule_before_any_work():
    from diffusers import DDIMScheduler

    pipe = gmm()
    CrashingGMM.calls = 0
    other = DDIMScheduler(beta_schedule="linear", beta_start=1e-3, beta_end=0.03, timestep_spacing="trailing",
                          clip_sample=False)
    with pytest.raises(ValueError, match="the teacher use another noise schedule"):
        fit_olss_scheduler(pipe, PROMPTS, teacher=other, num_steps=2, **REC)
    assert CrashingGMM.calls == 0
