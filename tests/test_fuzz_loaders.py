"""A seeded mutation fuzz test of every loader: schedule JSON, scheduler folders, GramStats files, recording
checkpoints, ONNX export folders and compile-cache entries.

Each mutation (of the JSON values: deleted keys, other types, extreme and non-finite numbers, huge ranges, deep
nesting, unknown keys, tiny changes of valid numbers; of the bytes: bit flips, truncation, appended garbage; of the
file itself: empty, a folder, a link to /dev/zero) is loaded and then used (a search, a scheduler step, a resumed
recording, an ONNX run). Every outcome must be a ``ValueError`` or a result equal to the unmutated one: no other
exception type, no silently different result, no hang (a per-case alarm), and memory stays bounded (the process's
peak RSS may not grow by more than 512 MiB over the whole run).

Re-signed files (digests recomputed after the edit, as a careless tool or anyone who knows the format would) reach
the checks behind the digest: random re-signed mutations must give a ValueError or a usable result, and a table of
targeted semantic edits of every file kind (values that are well-typed but mean something no writer of ours
produces) must be refused. Hostile files near each format's size limit must be refused in bounded time and memory
(per load: under 2 s and under 256 MiB of peak memory growth).
"""
from __future__ import annotations

import copy
import json
import os
import random
import resource
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from olss_fast import GramStats, OLSSSchedule, OLSSScheduler, search_schedule
from olss_fast.models.gmm import make_gmm
from olss_fast.fit.recording import record_trajectories

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SEED = 20261127
DEEP = "\u0000DEEP\u0000"  # placeholder replaced by 60 000 nested brackets in the serialised text
NAN = "\u0000NAN\u0000"
REPLACEMENTS = [None, True, False, 0, -1, 1, 2, 3.5, -7, 5000, 1e308, -1e308, 3.5e38 * 10, 10**400, -(10**30), "x",
                "", "false", [], {}, [0], [[0, 10**12]], [[2, 4]], {"a": 1}, DEEP, NAN]


# ---------------------------------------------------------------------------------------------- mutations
def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):  # long arrays: the first 50 entries are representative
            out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def mutate_json(obj: Any, rng: random.Random) -> str:
    """One random mutation of a JSON document, as text."""
    obj = copy.deepcopy(obj)
    paths = [p for p in _paths(obj) if p]
    path = rng.choice(paths)
    parent, key = _get(obj, path[:-1]), path[-1]
    value = parent[key]
    op = rng.randrange(6)
    if op == 0 and isinstance(parent, dict):
        del parent[key]
    elif op == 1 and isinstance(parent, dict):
        parent[f"unknown_{rng.randrange(100)}"] = rng.choice(REPLACEMENTS)
    elif op == 2 and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = value * (1 + rng.choice([1e-9, -1e-6, 0.5, 2.0])) + rng.choice([0, 1, -1])
    elif op == 3 and isinstance(value, list) and value:
        if rng.random() < 0.5:
            value.pop(rng.randrange(len(value)))
        else:
            value.append(copy.deepcopy(rng.choice(value)))
    else:
        parent[key] = rng.choice(REPLACEMENTS)
    text = json.dumps(obj)
    return text.replace(json.dumps(DEEP), "[" * 60_000 + "]" * 60_000).replace(json.dumps(NAN), "NaN")


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    blob = bytearray(data)
    op = rng.randrange(4)
    if op == 0:
        for _ in range(rng.choice([1, 1, 3])):
            pos = rng.randrange(len(blob))
            blob[pos] ^= 1 << rng.randrange(8)
    elif op == 1:
        blob = blob[: rng.randrange(len(blob))]
    elif op == 2:
        blob += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    else:
        pos = rng.randrange(len(blob))
        blob[pos:pos + 8] = bytes(8)
    return bytes(blob)


def replace_file(path: Path, rng: random.Random) -> None:
    """The file replaced by something that is not one: empty, a folder, a link to /dev/zero."""
    path.unlink()
    op = rng.randrange(3)
    if op == 0:
        path.write_bytes(b"")
    elif op == 1:
        path.mkdir()
    else:
        os.symlink("/dev/zero", path)


# ---------------------------------------------------------------------------------------------- the harness
class Outcomes:
    def __init__(self) -> None:
        self.counts = {"ValueError": 0, "unchanged": 0}
        self.failures: list[str] = []

    def run(self, label: str, load_and_use: Callable[[], Any], same: Callable[[Any], bool]) -> None:
        def alarm(*_: Any) -> None:
            raise TimeoutError("no result within 20 s")

        old = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(20)
        try:
            result = load_and_use()
        except ValueError:
            self.counts["ValueError"] += 1
            return
        except BaseException as exc:  # noqa: BLE001 - any other outcome is a finding
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
            return
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        if same is None:  # a re-signed mutation: a valid file, so any result that works is fine
            self.counts["re-signed, used"] = self.counts.get("re-signed, used", 0) + 1
        elif same(result):
            self.counts["unchanged"] += 1
        else:
            self.failures.append(f"{label}: accepted and gave a different result")


def file_cases(original: Path, work: Path, n_json: int, n_bytes: int, n_file: int, rng: random.Random,
               doc: Any = None, json_in: Callable[[Path, str], None] | None = None):
    """Yield (label) after writing each mutated copy of ``original`` to ``work``."""
    data = original.read_bytes()
    for i in range(n_json):
        if work.is_dir() and not work.is_symlink():
            shutil.rmtree(work)
        elif work.exists() or work.is_symlink():
            work.unlink()
        text = mutate_json(doc, rng)
        if json_in is None:
            work.write_text(text)
        else:
            json_in(work, text)
        yield f"json#{i}"
    for i in range(n_bytes):
        _reset(work)
        work.write_bytes(mutate_bytes(data, rng))
        yield f"bytes#{i}"
    for i in range(n_file):
        _reset(work)
        work.write_bytes(data)
        replace_file(work, rng)
        yield f"file#{i}"


def _reset(work: Path) -> None:
    if work.is_dir() and not work.is_symlink():
        shutil.rmtree(work)
    elif work.exists() or work.is_symlink():
        work.unlink()


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def recording():
    pipe = make_gmm((2, 3, 3), num_components=3, seed=0)
    stats = record_trajectories(pipe, [0, 1, 2, 1, 0, 2], teacher_steps=12, batch_size=2, progress=False)
    return pipe, stats


def test_fuzz_every_loader(tmp_path, recording):
    pipe, stats = recording
    rng = random.Random(SEED)
    out = Outcomes()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # ---- schedule JSON: load, then run it in a scheduler
    sched = search_schedule(stats, 4)
    sched_path = tmp_path / "schedule.json"
    sched.save(sched_path)
    ref = sched.to_dict()

    def use_schedule(path: Path) -> Any:
        s = OLSSSchedule.load(path)
        scheduler = OLSSScheduler.from_schedules([s], config=pipe.scheduler.config)
        scheduler.set_timesteps(s.num_steps)
        x = torch.zeros(1, 2, 3, 3)
        scheduler.step(torch.ones_like(x), scheduler.timesteps[0], x)
        return s

    work = tmp_path / "m_schedule.json"
    for label in file_cases(sched_path, work, 110, 40, 6, rng, doc=ref):
        out.run(f"schedule {label}", lambda: use_schedule(work), lambda s: s.to_dict() == ref)

    # ---- scheduler folder: from_pretrained, then step
    folder = tmp_path / "scheduler"
    OLSSScheduler.from_schedules([sched], config=pipe.scheduler.config).save_pretrained(folder)
    cfg_doc = json.loads((folder / "scheduler_config.json").read_text())
    ref_sched = OLSSScheduler.from_pretrained(folder)

    def use_scheduler(path: Path) -> Any:
        s = OLSSScheduler.from_pretrained(path)
        s.set_timesteps(4)
        x = torch.zeros(1, 2, 3, 3)
        s.step(torch.ones_like(x), s.timesteps[0], x)
        return s

    def same_scheduler(s: Any) -> bool:
        a = {k: v for k, v in s.config.items() if k != "_diffusers_version"}
        b = {k: v for k, v in ref_sched.config.items() if k != "_diffusers_version"}
        return a == b

    work_folder = tmp_path / "m_scheduler"
    work_folder.mkdir()
    for label in file_cases(folder / "scheduler_config.json", work_folder / "scheduler_config.json", 80, 25, 5,
                            rng, doc=cfg_doc):
        out.run(f"scheduler {label}", lambda: use_scheduler(work_folder), same_scheduler)

    # ---- GramStats file: the header JSON and the bytes; then a search
    stats_path = tmp_path / "stats.safetensors"
    stats.save(stats_path)
    header_doc = stats.header()

    def header_in(path: Path, text: str) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(stats_path), framework="pt") as fh:
            meta, gram = dict(fh.metadata()), fh.get_tensor("gram")
        meta["olss_fast"] = text  # the digest is not recomputed: a corrupted or hand-edited file
        save_file({"gram": gram}, str(path), metadata=meta)

    def use_stats(path: Path) -> Any:
        s = GramStats.load(path)
        search_schedule(s, 3)
        return s

    def same_stats(s: Any) -> bool:
        return s.header() == stats.header() and torch.equal(s.gram, stats.gram)

    work = tmp_path / "m_stats.safetensors"
    for label in file_cases(stats_path, work, 90, 50, 6, rng, doc=header_doc, json_in=header_in):
        out.run(f"stats {label}", lambda: use_stats(work), same_stats)

    # ---- recording checkpoint: resume it
    from test_hostile_inputs import CrashingGMM, gmm

    CrashingGMM.calls, CrashingGMM.crash_at = 0, 1
    ck = tmp_path / "ck.safetensors"
    prompts = [0, 1, 2, 0]
    rec = dict(teacher_steps=12, batch_size=2, progress=False)
    with pytest.raises(RuntimeError):
        record_trajectories(gmm(), prompts, checkpoint=ck, checkpoint_every=1, **rec)
    CrashingGMM.crash_at = 10**9
    ck_stats = GramStats.load(ck)
    ck_doc = ck_stats.header()
    full = record_trajectories(gmm(), prompts, **rec)
    ck_copy = tmp_path / "ck_original.safetensors"
    shutil.copy(ck, ck_copy)

    def ck_header_in(path: Path, text: str) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(ck_copy), framework="pt") as fh:
            meta, gram = dict(fh.metadata()), fh.get_tensor("gram")
        meta["olss_fast"] = text
        save_file({"gram": gram}, str(path), metadata=meta)

    def use_checkpoint(path: Path) -> Any:
        return record_trajectories(gmm(), prompts, checkpoint=path, checkpoint_every=1, resume=True, **rec)

    def same_resumed(s: Any) -> bool:
        return torch.equal(s.gram, full.gram) and s.num_samples == full.num_samples

    work = tmp_path / "m_ck.safetensors"
    for label in file_cases(ck_copy, work, 45, 25, 3, rng, doc=ck_doc, json_in=ck_header_in):
        out.run(f"checkpoint {label}", lambda: use_checkpoint(work), same_resumed)

    # ---- ONNX export folder: the manifest, the component files; then a run
    pytest.importorskip("onnxruntime")
    import numpy as np

    from test_runtime import make_digits_pipe

    from olss_fast.export.onnx_export import export_onnx
    from olss_fast.export.onnx_runner import OnnxOLSSRunner

    dpipe = make_digits_pipe()
    export = export_onnx(dpipe, OLSSScheduler.from_config(dpipe.scheduler.config).ddim_schedule(2),
                         tmp_path / "export", guidance_scale=2.0)
    noise = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    ref_images = OnnxOLSSRunner(export.path)(input_ids=[3], noise=noise)
    manifest_doc = json.loads((export.path / "manifest.json").read_text())

    def use_export(path: Path) -> Any:
        return OnnxOLSSRunner(path)(input_ids=[3], noise=noise)

    def same_images(images: Any) -> bool:
        return np.array_equal(images, ref_images)

    work = tmp_path / "m_export"
    shutil.copytree(export.path, work)
    for label in file_cases(export.path / "manifest.json", work / "manifest.json", 40, 12, 3, rng,
                            doc=manifest_doc):
        out.run(f"onnx manifest {label}", lambda: use_export(work), same_images)
    for comp in ("denoise.onnx", "decoder.onnx", "olss_onnx_runner.py"):
        for _ in range(5):
            shutil.copy(export.path / comp, work / comp)
            shutil.copy(export.path / "manifest.json", work / "manifest.json")
            (work / comp).write_bytes(mutate_bytes((export.path / comp).read_bytes(), rng))
            out.run(f"onnx {comp}", lambda: use_export(work), same_images)
        shutil.copy(export.path / comp, work / comp)

    # ---- the same JSON mutations with the digests recomputed (a tool that re-signs what it edits): the checks
    # behind the digest must still give a ValueError or a usable result, never another exception
    from olss_fast.export.onnx_runner import manifest_digest
    from olss_fast.serve.scheduler_config import CONFIG_DIGEST_KEY, config_digest
    from olss_fast.core.stats import DIGEST_KEY, stats_digest as _digest
    from helpers import resign_schedule_dict

    def resigned(text: str, sign: Callable[[dict], dict]) -> str:
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            return text
        return json.dumps(sign(doc)) if isinstance(doc, dict) else text

    def sign_config(d: dict) -> dict:
        d[CONFIG_DIGEST_KEY] = config_digest(d)
        return d

    def sign_manifest(d: dict) -> dict:
        try:
            d["manifest_sha256"] = manifest_digest(d)
        except (ValueError, TypeError):
            pass
        return d

    def sign_header(original: Path) -> Callable[[Path, str], None]:
        def write(path: Path, text: str) -> None:
            from safetensors import safe_open
            from safetensors.torch import save_file

            with safe_open(str(original), framework="pt") as fh:
                meta, gram = dict(fh.metadata()), fh.get_tensor("gram")
            meta["olss_fast"] = text
            meta[DIGEST_KEY] = _digest(text, gram)
            save_file({"gram": gram}, str(path), metadata=meta)
        return write

    def json_writer(sign: Callable[[dict], dict]) -> Callable[[Path, str], None]:
        return lambda path, text: path.write_text(resigned(text, sign))

    def safe_sign_schedule(d: dict) -> dict:
        try:
            return resign_schedule_dict(d)
        except (ValueError, TypeError):
            return d

    for label in file_cases(sched_path, tmp_path / "r_schedule.json", 60, 0, 0, rng, doc=ref,
                            json_in=json_writer(safe_sign_schedule)):
        out.run(f"re-signed schedule {label}", lambda: use_schedule(tmp_path / "r_schedule.json"), None)
    for label in file_cases(folder / "scheduler_config.json", work_folder / "scheduler_config.json", 60, 0, 0, rng,
                            doc=cfg_doc, json_in=json_writer(sign_config)):
        out.run(f"re-signed scheduler {label}", lambda: use_scheduler(work_folder), None)
    for label in file_cases(stats_path, tmp_path / "r_stats.safetensors", 60, 0, 0, rng, doc=header_doc,
                            json_in=sign_header(stats_path)):
        out.run(f"re-signed stats {label}", lambda: use_stats(tmp_path / "r_stats.safetensors"), None)
    for label in file_cases(ck_copy, tmp_path / "r_ck.safetensors", 40, 0, 0, rng, doc=ck_doc,
                            json_in=sign_header(ck_copy)):
        out.run(f"re-signed checkpoint {label}", lambda: use_checkpoint(tmp_path / "r_ck.safetensors"), None)
    shutil.copy(export.path / "manifest.json", work / "manifest.json")
    for label in file_cases(export.path / "manifest.json", work / "manifest.json", 40, 0, 0, rng,
                            doc=manifest_doc, json_in=json_writer(sign_manifest)):
        out.run(f"re-signed onnx manifest {label}", lambda: use_export(work), None)

    total = sum(out.counts.values()) + len(out.failures)
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(f"\nfuzz: {total} mutations, {out.counts}, {len(out.failures)} findings, peak RSS +{grew_mib:.0f} MiB")
    assert total >= 800
    assert not out.failures, "\n".join(out.failures[:30])
    assert grew_mib < 512, f"memory grew by {grew_mib:.0f} MiB"



# ---------------------------------------------------------------------------------------------- compile-cache entries
def test_fuzz_compile_cache_entries(tmp_path, monkeypatch):
    """Random mutations of a compile-cache entry: header JSON (re-signed with this user's key, or not), payload bytes
    (re-signed, or not), the file itself. Loading never raises; whatever reaches PyTorch is an entry whose every
    artefact key is a plain relative name."""
    from helpers import artifact_payload

    from olss_fast.serve import compile_cache
    from olss_fast.serve.compile_cache import CompileCache, artifact_keys

    rng = random.Random(SEED + 1)
    payload = artifact_payload([("inductor", "fabc", b"code" * 50), ("autotune", "ab/abcdef.best_config", b"{}")])
    handed: list = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (payload, None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: handed.append(bytes(data)))
    folder = tmp_path / "cache"
    desc = {"m": 1}
    cache = CompileCache(folder)
    entry = cache.save("k", desc)
    original = entry.read_bytes()
    secret = (folder / compile_cache.KEY_FILE).read_bytes()
    header_doc = json.loads(original.split(b"\n", 1)[0])
    failures, outcomes = [], {"ignored": 0, "loaded": 0}

    def resign(header: dict, body: bytes) -> bytes:
        if isinstance(header, dict):
            header["hmac"] = CompileCache._mac(secret, header, body)
        return json.dumps(header).encode() + b"\n" + body

    for i in range(60):
        op = i % 4
        if op == 0:  # header mutations, re-signed
            text = mutate_json(header_doc, rng)
            try:
                data = resign(json.loads(text), payload)
            except (ValueError, RecursionError, TypeError):
                data = text.encode() + b"\n" + payload
        elif op == 1:  # payload mutations, re-signed: the checks behind the HMAC
            data = resign(dict(header_doc), mutate_bytes(payload, rng))
        elif op == 2:  # plain corruption
            data = mutate_bytes(original, rng)
        else:  # planted artefact keys, re-signed
            key = rng.choice(["/etc/x", "../x", "a/../../x", "", ".", "ok/..", "a" * 2000, "x\x00y", "C:\\x"])
            body = artifact_payload([(rng.choice(["inductor", "autotune", "pgo"]), key, b"x")])
            data = resign(dict(header_doc, payload_bytes=len(body)), body)
        entry.unlink()
        entry.write_bytes(data)
        os.chmod(entry, 0o600)
        try:
            outcomes["loaded" if CompileCache(folder).load("k", desc) else "ignored"] += 1
        except BaseException as exc:  # noqa: BLE001 - loading must never raise
            failures.append(f"entry #{i}: {type(exc).__name__}: {exc}")
    for data in handed:
        try:
            artifact_keys(data)
        except ValueError as exc:
            failures.append(f"an unsafe payload reached PyTorch: {exc}")
    assert not failures, failures[:10]
    assert outcomes["ignored"] >= 40, outcomes


# ---------------------------------------------------------------------------------------------- semantic edits
@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from test_runtime import make_digits_pipe

    from olss_fast.export.onnx_export import export_onnx

    pipe = make_digits_pipe()
    return export_onnx(pipe, OLSSScheduler.from_config(pipe.scheduler.config).ddim_schedule(2),
                       tmp_path_factory.mktemp("fx") / "export", guidance_scale=2.0)


def test_resigned_semantic_edits_of_every_file_kind_are_refused(tmp_path, recording, digits_export, monkeypatch):
    """Well-typed values no olss_fast writer produces, in every file kind, each re-signed: all refused."""
    from helpers import artifact_payload, resign_schedule_dict, rewrite_stats_file
    from test_hostile_inputs import CrashingGMM, gmm

    from olss_fast.export.onnx_runner import OnnxOLSSRunner, manifest_digest
    from olss_fast.serve import compile_cache
    from olss_fast.serve.compile_cache import CompileCache
    from olss_fast.serve.scheduler_config import CONFIG_DIGEST_KEY, config_digest

    pipe, stats = recording
    sched = search_schedule(stats, 3)
    refused, accepted = [], []

    def expect_refusal(label: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except ValueError:
            refused.append(label)
            return
        accepted.append(label)

    # ---- schedule JSON
    def sched_edit(label, edit, text_edit=None):
        d = sched.to_dict()
        edit(d)
        text = json.dumps(resign_schedule_dict(d))
        path = tmp_path / "s.json"
        path.write_text(text_edit(text) if text_edit else text)
        expect_refusal(f"schedule {label}", lambda: OLSSScheduler.from_schedules(
            [OLSSSchedule.load(path)], config=pipe.scheduler.config))

    sched_edit("version 2.0", lambda d: d.update(version=2.0))
    sched_edit("version true", lambda d: d.update(version=True))
    sched_edit("timesteps beyond the noise schedule", lambda d: d.update(timesteps=[5000, 3000, 2000]))
    sched_edit("fractional VP timesteps", lambda d: d.update(timesteps=[999.5, 666.5, 333.5]))
    sched_edit("coefficients x1e30", lambda d: d.update(coeffs=[[v * 1e30 for v in r] for r in d["coeffs"]]))
    sched_edit("a coefficient of 3e38", lambda d: d["coeffs"][0].__setitem__(0, 3e38))
    sched_edit("acceptance as a bare list", lambda d: d["fitted_for"].update(accepted_mismatch=["noise_schedule"]))
    sched_edit("acceptance of another setting", lambda d: d["fitted_for"].update(
        noise_schedule={"kind": "vp", "num_train_timesteps": 1000, "alphas_cumprod_sha256": "0" * 64},
        accepted_mismatch={"noise_schedule": {"kind": "vp", "num_train_timesteps": 1000,
                                              "alphas_cumprod_sha256": "1" * 64}}))
    sched_edit("1e400 in meta", lambda d: d.update(meta={"x": "HUGE"}), lambda t: t.replace('"HUGE"', "1e400"))
    sched_edit("a duplicate key", lambda d: None, lambda t: '{"teacher": "x", ' + t[1:])

    # ---- scheduler config
    folder = tmp_path / "sched"
    OLSSScheduler.from_schedules([sched], config=pipe.scheduler.config).save_pretrained(folder)
    cfg = json.loads((folder / "scheduler_config.json").read_text())

    def config_edit(label, edit, resign=True):
        d = json.loads(json.dumps(cfg))
        edit(d)
        if resign:
            d[CONFIG_DIGEST_KEY] = config_digest(d)
        (folder / "scheduler_config.json").write_text(json.dumps(d))
        expect_refusal(f"config {label}", lambda: OLSSScheduler.from_pretrained(folder))

    config_edit("_use_default_values", lambda d: d.update(_use_default_values=["schedules"]))
    config_edit("a null digest", lambda d: d.update({CONFIG_DIGEST_KEY: None, "beta_end": 0.02}), resign=False)
    config_edit("betas of 1", lambda d: d.update(trained_betas=[1.0] * 1000))
    config_edit("beta_end 0.99", lambda d: d.update(beta_schedule="linear", beta_end=0.99))
    config_edit("zero SNR with epsilon", lambda d: d.update(rescale_betas_zero_snr=True))
    config_edit("timesteps beyond num_train_timesteps", lambda d: d.update(num_train_timesteps=500))
    config_edit("an unknown private key", lambda d: d.update(_extra=1))
    config_edit("another class", lambda d: d.update(_class_name="DDIMScheduler"))

    # ---- statistics
    spath = tmp_path / "g.safetensors"

    def stats_edit(label, header=None, gram=None, merge=False):
        stats.save(spath)
        rewrite_stats_file(spath, header=header, gram=gram)
        expect_refusal(f"stats {label}", lambda: GramStats.load(spath) + GramStats.load(spath) if merge
                       else GramStats.load(spath))

    stats_edit("version 2.0", header=lambda h: dict(h, version=2.0))
    stats_edit("timesteps x10", header=lambda h: dict(h, timesteps=[10 * t for t in h["timesteps"]]))
    stats_edit("dtype int64", header=lambda h: dict(h, dtype="int64"))
    stats_edit("items miscounted", header=lambda h: dict(h, items=[[0, 10**9]]))
    stats_edit("items null, merged with itself", header=lambda h: dict(h, items=None), merge=True)
    def zero_norm(g):
        g = g.clone()
        g[:, 5, 5] = 0  # a vector of norm 0 with non-zero inner products
        return g

    stats_edit("a zero norm with a non-zero row", gram=zero_norm)

    # ---- recording checkpoint
    CrashingGMM.calls, CrashingGMM.crash_at = 0, 1
    ck = tmp_path / "ck.safetensors"
    rec = dict(teacher_steps=12, batch_size=2, progress=False)
    with pytest.raises(RuntimeError):
        record_trajectories(gmm(), [0, 1, 2, 0], checkpoint=ck, checkpoint_every=1, **rec)
    CrashingGMM.crash_at = 10**9
    pristine = ck.read_bytes()

    def ck_edit(label, edit):
        ck.write_bytes(pristine)
        rewrite_stats_file(ck, header=lambda h: (edit(h), h)[1])
        expect_refusal(f"checkpoint {label}", lambda: record_trajectories(
            gmm(), [0, 1, 2, 0], checkpoint=ck, checkpoint_every=1, resume=True, **rec))

    fp = lambda h: h["meta"]["record_checkpoint"]["fingerprint"]  # noqa: E731
    ck_edit("seeds_per_prompt true", lambda h: fp(h).update(seeds_per_prompt=True))
    ck_edit("num_prompts 4.0", lambda h: fp(h).update(num_prompts=4.0))
    ck_edit("version 1.0", lambda h: h["meta"]["record_checkpoint"].update(version=1.0))
    ck_edit("scheduler_config", lambda h: h["meta"]["scheduler_config"].update(beta_end=0.02))
    ck_edit("dtype", lambda h: h.update(dtype="float16"))
    ck_edit("items null", lambda h: h.update(items=None))

    # ---- ONNX manifest
    work = tmp_path / "export"
    shutil.copytree(digits_export.path, work)
    manifest = json.loads((work / "manifest.json").read_text())

    def manifest_edit(label, edit):
        m = json.loads(json.dumps(manifest))
        edit(m)
        m["manifest_sha256"] = manifest_digest(m)
        (work / "manifest.json").write_text(json.dumps(m))
        expect_refusal(f"manifest {label}", lambda: OnnxOLSSRunner(work))

    manifest_edit("uncond_ids", lambda m: m.update(uncond_ids=5))
    manifest_edit("id_limit", lambda m: m.update(id_limit=1000))
    manifest_edit("batched", lambda m: m["cond_inputs"][0].update(batched=False))
    manifest_edit("image_shape", lambda m: m.update(image_shape=[1, 3, 8, 8]))
    manifest_edit("external_data", lambda m: m["components"]["decoder"].update(external_data="ab"))
    manifest_edit("exporter type", lambda m: m.update(exporter=["a", 5]))
    manifest_edit("version float", lambda m: m.update(version=float(m["version"])))

    # ---- compile-cache entry, authenticated with this user's own key (what a buggy writer of ours could produce)
    payload = artifact_payload([("inductor", "fabc", b"code")])
    handed: list = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (payload, None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: handed.append(data))
    cfolder = tmp_path / "cache"
    entry = CompileCache(cfolder).save("k", {"m": 1})
    secret = (cfolder / compile_cache.KEY_FILE).read_bytes()
    header = json.loads(entry.read_bytes().split(b"\n", 1)[0])

    def entry_edit(label, edit, body=payload):
        h = dict(header, payload_bytes=len(body))
        edit(h)
        h["hmac"] = CompileCache._mac(secret, h, body)
        entry.write_bytes(json.dumps(h).encode() + b"\n" + body)
        (refused if not CompileCache(cfolder).load("k", {"m": 1}) else accepted).append(f"entry {label}")

    entry_edit("version 2.0", lambda h: h.update(version=2.0))
    entry_edit("another description", lambda h: h.update(description={"m": 2}))
    entry_edit("an absolute artefact key", lambda h: None, artifact_payload([("autotune", "/tmp/x", b"{}")]))
    entry_edit("a climbing artefact key", lambda h: None, artifact_payload([("inductor", "../../x", b"x")]))
    entry_edit("an unknown artefact type", lambda h: None, artifact_payload([("mystery", "fabc", b"x")]))
    assert handed == []

    assert not accepted, f"accepted: {accepted}"
    assert len(refused) >= 40, refused


# ---------------------------------------------------------------------------------------------- resource limits
def test_hostile_files_cost_bounded_time_and_memory(tmp_path, recording, digits_export, monkeypatch):
    """A hostile file near each format's size limit (64 MiB of empty objects or numbers, a header claiming a huge
    matrix over a sparse hole, a compile-cache entry whose header never ends) is refused in under 2 s with under
    256 MiB of peak memory growth per load."""
    from helpers import peak_rss_growth
    from test_trust_loaders import _sparse_stats_file

    from olss_fast.export.onnx_runner import read_manifest
    from olss_fast.serve.compile_cache import CompileCache

    size = 64 * 2**20 - 4096
    objects = ",".join(["{}"] * (size // 3))
    numbers = ",".join(["1"] * (size // 2))
    cases = {}
    p = tmp_path / "objects.json"
    p.write_text('{"format": "olss_fast.schedule", "version": 2, "coeffs": [' + objects + "]}")
    cases["schedule of empty objects"] = lambda p=p: OLSSSchedule.load(p)
    p = tmp_path / "numbers.json"
    p.write_text('{"format": "olss_fast.schedule", "version": 2, "coeffs": [[' + numbers + "]]}")
    cases["schedule of numbers"] = lambda p=p: OLSSSchedule.load(p)
    folder = tmp_path / "sched"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text('{"_class_name": "OLSSScheduler", "schedules": [' + objects + "]}")
    cases["scheduler config of empty objects"] = lambda: OLSSScheduler.from_pretrained(folder)
    p = tmp_path / "sparse.safetensors"
    _sparse_stats_file(p, teacher_steps=1400, channels=1, digest="0" * 64)  # 63 MB claimed over a hole
    cases["statistics claiming a matrix over a hole"] = lambda p=p: GramStats.load(p)
    export = tmp_path / "export"
    shutil.copytree(digits_export.path, export)
    (export / "manifest.json").write_text("[" + ",".join(["{}"] * (16 * 2**20 // 3 - 8)) + "]")
    cases["manifest of empty objects"] = lambda: read_manifest(export)
    cache = tmp_path / "cache"
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"\x00" * 16, None))
    CompileCache(cache)._secret(create=True)
    (cache / "k.bin").write_bytes(b"{" * size)
    os.chmod(cache / "k.bin", 0o600)
    cases["compile-cache entry without a header end"] = lambda: CompileCache(cache).load("k", {}) or None

    import time

    for label, load in cases.items():
        def refused(load=load):
            try:
                out = load()
            except ValueError:
                return "refused"
            return "ignored" if out is None else "accepted"

        t0 = time.perf_counter()
        outcome, grew = peak_rss_growth(refused)
        took = time.perf_counter() - t0
        assert outcome in ("refused", "ignored"), (label, outcome)
        assert took < 2.0, f"{label}: {took:.2f} s"
        assert grew < 256 * 2**20, f"{label}: peak memory grew by {grew / 2**20:.0f} MiB"
