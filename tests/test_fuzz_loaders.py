"""A seeded mutation fuzz test of every loader: schedule JSON, scheduler folders, GramStats files, recording
checkpoints and ONNX export folders.

Each mutation (of the JSON values: deleted keys, other types, extreme and non-finite numbers, huge ranges, deep
nesting, unknown keys, tiny changes of valid numbers; of the bytes: bit flips, truncation, appended garbage; of the
file itself: empty, a folder, a link to /dev/zero) is loaded and then used (a search, a scheduler step, a resumed
recording, an ONNX run). Every outcome must be a ``ValueError`` or a result equal to the unmutated one: no other
exception type, no silently different result, no hang (a per-case alarm), and memory stays bounded (the process's
peak RSS may not grow by more than 512 MiB over the whole run).
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
