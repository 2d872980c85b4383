"""Trust boundaries, part 1: the compile cache runs only what this user's olss_fast wrote, and writers touch only
their own files (one test per finding of the hostile-neighbour review; each says which finding it covers).

The compile-cache tests plant real artefacts: a ``torch.compiler.save_cache_artifacts`` payload whose inductor
artefact is a pickle that creates a marker file when unpickled. ``torch.compiler.load_cache_artifacts`` is replaced by
a spy that unpickles every artefact it is handed, so the marker appears exactly when olss_fast hands a planted
payload to PyTorch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from olss_fast import GramStats, OLSSSchedule, OLSSScheduler
from olss_fast.core import files
from olss_fast.serve import compile_cache
from olss_fast.serve.compile_cache import CompileCache, cache_key

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from helpers import artifact_payload  # noqa: E402

DESC = {"modules": {"denoiser": {"class": "X", "config_sha256": "a", "weights_sha256": "b"}},
        "program": {"inputs": [["latents", [1, 4, 8, 8], "torch.float32"]]}, "versions": {"torch": "2.x"}}
KEY = cache_key(DESC)


class _Payload:
    """Unpickling this creates ``marker`` (stands for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (str(self.marker), "w"))


def _unpickling_spy(seen: list[bytes]) -> Any:
    """Stands in for torch.compiler.load_cache_artifacts: parses the payload with PyTorch's own deserializer and
    unpickles every artefact's content, as inductor does when it loads a graph."""
    from torch.compiler._cache import CacheArtifactManager, CacheInfo

    def load(data: bytes) -> Any:
        seen.append(bytes(data))
        for artifacts in (CacheArtifactManager.deserialize(bytes(data)) or {}).values():
            for artifact in artifacts:
                try:
                    pickle.loads(artifact.content)
                except Exception:  # noqa: BLE001 - a harmless artefact's bytes
                    pass
        return CacheInfo()

    return load


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A private cache folder holding one legitimate entry (written by olss_fast), a marker path and the spy."""
    marker = tmp_path / "PWNED"
    seen: list[bytes] = []
    good = artifact_payload([("inductor", "fgood", b"harmless compiled code")])
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (good, None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", _unpickling_spy(seen))
    folder = tmp_path / "compile"
    folder.mkdir(mode=0o700)
    assert CompileCache(folder).save(KEY, DESC) is not None
    evil = artifact_payload([("inductor", "fevil", pickle.dumps(_Payload(marker)))])
    return {"folder": folder, "marker": marker, "seen": seen, "good": good, "evil": evil}


def _plain_digest_entry(path: Path, payload: bytes, mode: int = 0o600) -> None:
    """An entry in the format of olss_fast before this review: a header with a SHA-256 anyone can recompute."""
    header = {"format": "olss_fast.compile_cache", "version": 1, "key": KEY, "description": DESC,
              "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}
    path.write_bytes(json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n" + payload)
    os.chmod(path, mode)


def _hmac_entry(path: Path, payload: bytes, secret: bytes) -> None:
    """An entry in the current format, authenticated with ``secret``."""
    import hmac

    header = {"description": DESC, "format": "olss_fast.compile_cache", "key": KEY, "payload_bytes": len(payload),
              "version": 2}
    mac = hmac.new(secret, json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n",
                   hashlib.sha256)
    mac.update(payload)
    header["hmac"] = mac.hexdigest()
    path.write_bytes(json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n" + payload)
    os.chmod(path, 0o600)


# ================================================================================================ 1. compile cache
def test_compile_cache_runs_no_planted_pickle(cache: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (code execution): an entry with the right owner, mode 0600 and a valid self-computed digest, a link
    to such an entry, or an entry authenticated with another key is ignored with a warning; the planted pickle is
    never handed to PyTorch (the marker never appears), and the cache still works for what olss_fast wrote."""
    folder, entry = cache["folder"], cache["folder"] / f"{KEY}.bin"
    planted = cache["folder"].parent / "planted.bin"
    cases = {
        "plain digest": lambda: _plain_digest_entry(entry, cache["evil"]),
        "link to a planted entry": lambda: (_plain_digest_entry(planted, cache["evil"]), entry.symlink_to(planted)),
        "another key": lambda: _hmac_entry(entry, cache["evil"], os.urandom(32)),
    }
    for name, plant in cases.items():
        if entry.is_symlink() or entry.exists():
            entry.unlink()
        plant()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="olss_fast.serve.compile_cache"):
            assert CompileCache(folder).load(KEY, DESC) is False, name
        assert "ignoring the compile cache entry" in caplog.text, name
        assert not cache["marker"].exists(), f"{name}: the planted pickle ran"
        assert cache["seen"] == [], name
    entry.unlink()
    assert CompileCache(folder).save(KEY, DESC) is not None and CompileCache(folder).load(KEY, DESC) is True
    assert cache["seen"] == [cache["good"]] and not cache["marker"].exists()


@pytest.mark.parametrize("after", [1, 2, 3])
def test_compile_cache_checks_the_file_it_reads(cache: Any, monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Regression (check, then open again): the entry is swapped for a world-writable planted one right after the
    loader's ``after``-th look at the path (stat or lstat); whichever file the loader opens, what it checked is what
    it read: the marker never appears."""
    entry = cache["folder"] / f"{KEY}.bin"
    planted = cache["folder"].parent / "swap.bin"
    _plain_digest_entry(planted, cache["evil"], mode=0o666)
    os.chmod(planted, 0o666)
    looks = {"n": 0}
    real_stat, real_lstat = os.stat, os.lstat

    def watch(real: Any) -> Any:
        def look(p: Any, *args: Any, **kwargs: Any) -> Any:
            out = real(p, *args, **kwargs)
            if isinstance(p, (str, os.PathLike)) and os.fspath(p) == str(entry):
                looks["n"] += 1
                if looks["n"] == after:
                    os.replace(planted, entry)
            return out
        return look

    monkeypatch.setattr(os, "stat", watch(real_stat))
    monkeypatch.setattr(os, "lstat", watch(real_lstat))
    CompileCache(cache["folder"]).load(KEY, DESC)
    monkeypatch.setattr(os, "stat", real_stat)
    monkeypatch.setattr(os, "lstat", real_lstat)
    assert not cache["marker"].exists()
    assert all(data == cache["good"] for data in cache["seen"])


def test_compile_cache_artifact_keys_stay_in_the_cache(cache: Any, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Regression (writes anywhere): artefacts whose key is an absolute path (an ``autotune`` key is joined to
    inductor's cache folder) or climbs out with ``..`` are neither written nor handed to PyTorch, also when the
    entry itself verifies."""
    victim = cache["folder"].parent / "victim.txt"
    bad_payloads = [artifact_payload([("autotune", str(victim), b"attacker bytes")]),
                    artifact_payload([("inductor", "../../escape", b"x")]),
                    artifact_payload([("inductor", "fok", b"x"), ("autotune", "ab/../../x.best_config", b"{}")])]
    for payload in bad_payloads:
        monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda p=payload: (p, None))
        with caplog.at_level(logging.WARNING, logger="olss_fast.serve.compile_cache"):
            assert CompileCache(cache["folder"]).save(KEY, DESC) is None  # not written
        # written by an olss_fast that did not check (authenticated with this user's own key): still refused
        secret = (cache["folder"] / compile_cache.KEY_FILE).read_bytes()
        _hmac_entry(cache["folder"] / f"{KEY}.bin", payload, secret)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="olss_fast.serve.compile_cache"):
            assert CompileCache(cache["folder"]).load(KEY, DESC) is False
        assert "not a plain relative name" in caplog.text
    assert cache["seen"] == [] and not victim.exists()


def test_compile_cache_folder_must_be_private(cache: Any, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Regression (the folder is never checked): a cache folder writable by group or others, or owned by another
    user, is not used (its entries are not loaded, nothing is written) unless the user opts in; a key file others
    can read is refused."""
    folder = cache["folder"]
    os.chmod(folder, 0o777)
    with caplog.at_level(logging.WARNING, logger="olss_fast.serve.compile_cache"):
        assert CompileCache(folder).load(KEY, DESC) is False
        assert CompileCache(folder).save(KEY, DESC) is None
    assert caplog.text.count("writable by other users") == 2 and cache["seen"] == []
    assert CompileCache(folder, allow_shared=True).load(KEY, DESC) is True  # the user's explicit opt-in
    monkeypatch.setenv(compile_cache.SHARED_ENV, "1")
    assert CompileCache(folder).load(KEY, DESC) is True
    monkeypatch.delenv(compile_cache.SHARED_ENV)
    os.chmod(folder, 0o700)
    real_getuid = os.getuid
    monkeypatch.setattr(os, "getuid", lambda: real_getuid() + 1)  # as another user sees this folder
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="olss_fast.serve.compile_cache"):
        assert CompileCache(folder).load(KEY, DESC) is False
    assert "belongs to another user" in caplog.text
    monkeypatch.setattr(os, "getuid", real_getuid)
    os.chmod(folder / compile_cache.KEY_FILE, 0o644)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="olss_fast.serve.compile_cache"):
        assert CompileCache(folder).load(KEY, DESC) is False
    assert "not a private 32-byte file" in caplog.text
    assert len(cache["seen"]) == 2


def test_artifact_parser_agrees_with_pytorch() -> None:
    """The payload reader olss_fast checks keys with reads what PyTorch's own deserializer reads."""
    from torch.compiler._cache import CacheArtifactManager

    payload = artifact_payload([("inductor", "fabc", b"\x00code"), ("aot_autograd", "adef", b"x"),
                                ("autotune", "ab/abcdef.best_config", b"{}")])
    ours = compile_cache.artifact_keys(payload)
    theirs = [(kind, a.key) for kind, arts in CacheArtifactManager.deserialize(payload).items() for a in arts]
    assert ours == theirs == [("inductor", "fabc"), ("aot_autograd", "adef"), ("autotune", "ab/abcdef.best_config")]
    for broken in (payload[:-3], b"\x00" * 4 + payload[4:], b"junk"):
        with pytest.raises(ValueError):
            compile_cache.artifact_keys(broken)


# ================================================================================================ 2. writers
def _schedule() -> OLSSSchedule:
    c = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.1, 0.1]], dtype=torch.float64)
    return OLSSSchedule([900, 400], [0, 5], c, teacher_steps=10)


def _stats() -> GramStats:
    g = torch.Generator().manual_seed(0)
    s = GramStats([900, 600, 300], prediction_type="epsilon")
    s.update(torch.randn(4, 2, 2, 3, generator=g), torch.randn(3, 2, 2, 3, generator=g), items=[0, 1])
    return s


def test_lock_files_are_never_followed_or_truncated(tmp_path: Path) -> None:
    """Regression (lock files follow symlinks): a planted ``.<name>.lock`` that is a symbolic link or a hard link to
    another file, or a file with other content, is refused with a ValueError; the other file is untouched."""
    from olss_fast.fit.recording import record_trajectories
    from olss_fast.models.gmm import make_gmm

    victim = tmp_path / "victim.txt"
    for target, write in [
        (tmp_path / "sched", lambda: OLSSScheduler.from_schedules([_schedule()]).save_pretrained(tmp_path / "sched")),
        (tmp_path / "ck.safetensors", lambda: record_trajectories(
            make_gmm((2, 3, 3), num_components=3, seed=0), [0, 1], teacher_steps=6, progress=False,
            checkpoint=tmp_path / "ck.safetensors")),
        (tmp_path / "s.json", lambda: _schedule().save(tmp_path / "s.json")),
    ]:
        lock = tmp_path / f".{target.name}.lock"
        for plant in ("symlink", "hardlink", "content"):
            victim.write_text("precious data\n")
            if plant == "symlink":
                lock.symlink_to(victim)
            elif plant == "hardlink":
                os.link(victim, lock)
            else:
                lock.write_text("someone's notes, not a lock")
            with pytest.raises(ValueError, match="lock"):
                write()
            assert victim.read_text() == "precious data\n", (target.name, plant)
            lock.unlink()
        write()  # without the planted file it works
        assert not lock.exists()


def _digits_pipe() -> Any:
    from test_runtime import make_digits_pipe

    return make_digits_pipe()


def test_export_overwrite_replaces_only_olss_fast_exports(tmp_path: Path) -> None:
    """Regression (``export_onnx(overwrite=True)`` deletes any folder with a ``manifest.json``): a web app's folder,
    or a folder whose manifest claims to be ours but whose digest is wrong, is refused and left as it was."""
    pytest.importorskip("onnx")
    from olss_fast.export.onnx_export import export_onnx

    pipe = _digits_pipe()
    sched = OLSSScheduler.from_config(pipe.scheduler.config).ddim_schedule(2)
    app = tmp_path / "app"
    (app / "src").mkdir(parents=True)
    (app / "index.html").write_text("<html>my app</html>")
    (app / "src" / "main.js").write_text("console.log(1)")
    for manifest in ({"name": "my-app", "version": "1.0.0"},
                     {"format": "olss_fast.onnx_export", "version": 3, "manifest_sha256": "0" * 64}):
        (app / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="not an olss_fast export"):
            export_onnx(pipe, sched, app, guidance_scale=2.0, overwrite=True)
        assert (app / "index.html").read_text() == "<html>my app</html>"
        assert (app / "src" / "main.js").read_text() == "console.log(1)"
        assert json.loads((app / "manifest.json").read_text()) == manifest


def test_writers_refuse_fifos_and_devices(tmp_path: Path) -> None:
    """Regression (writers replace FIFOs and device nodes with regular files): a FIFO, or a link to /dev/null, given
    as the output is a ValueError and stays what it was."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    null_link = tmp_path / "null"
    null_link.symlink_to("/dev/null")
    for target in (fifo, null_link):
        for write in (lambda p: _schedule().save(p), lambda p: _stats().save(p),
                      lambda p: files.atomic_write_text(p, "x")):
            with pytest.raises(ValueError, match="not a regular file"):
                write(target)
    assert __import__("stat").S_ISFIFO(os.lstat(fifo).st_mode)
    assert null_link.is_symlink() and __import__("stat").S_ISCHR(os.stat("/dev/null").st_mode)


def test_temporaries_of_live_writers_elsewhere_are_kept(tmp_path: Path) -> None:
    """Regression (stale-temporary cleanup by "pid not alive here"): a temporary whose writer runs in another PID
    namespace or on another node (another tag, or no tag) survives the next write however its pid looks here;
    only this namespace's dead writers' temporaries, and anything left for a day, are removed."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = getattr(files, "namespace_tag", lambda: "f" * 6)()  # (olss_fast before the tag: a name it would make)
    other = "0" * 6 if mine != "0" * 6 else "1" * 6
    keep = [tmp_path / f".s.json.{dead.pid}.{other}abcdef.tmp",  # a live writer in another container
            tmp_path / f".g.safetensors.{dead.pid}.0123abcd.tmp",  # a tag-less name, as older writers made
            tmp_path / f".export.{dead.pid}.{other}abcdef.partial"]
    gone = [tmp_path / f".s.json.{dead.pid}.{mine}abcdef.tmp",  # a dead writer of this namespace
            tmp_path / f".x.json.{dead.pid}.{other}fedcba.tmp"]  # another's, left two days ago
    for p in keep[:2] + gone:
        p.write_text("half-written")
    keep[2].mkdir()
    old = os.stat(gone[1]).st_mtime - 2 * 86400
    os.utime(gone[1], (old, old))
    for _ in range(3):
        _schedule().save(tmp_path / "s.json")
        _stats().save(tmp_path / "g.safetensors")
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)


def test_schedule_and_statistics_saves_are_exclusive(tmp_path: Path) -> None:
    """Regression (``OLSSSchedule.save`` and ``GramStats.save`` take no lock): a second writer of the same file gets
    a ValueError, as a second writer of a scheduler folder does; the file keeps the first writer's content."""
    # another process holding both files' locks (taken as exclusive_lock takes them: flock on .<name>.lock)
    code = ("import fcntl, os, sys, time\n"
            "fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o644) for p in sys.argv[1:]]\n"
            "for fd in fds:\n    fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'process %d' % os.getpid())\n"
            "print('LOCKED', flush=True); time.sleep(60)\n")
    s_path, g_path = tmp_path / "s.json", tmp_path / "g.safetensors"
    locks = [str(p.parent / f".{p.name}.lock") for p in (s_path, g_path)]
    holder = subprocess.Popen([sys.executable, "-c", code, *locks], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(ValueError, match=f"being written by process {holder.pid}"):
            _schedule().save(s_path)
        with pytest.raises(ValueError, match=f"being written by process {holder.pid}"):
            _stats().save(g_path)
    finally:
        holder.kill()
        holder.wait()
    assert not s_path.exists() and not g_path.exists()
    with files.exclusive_lock(s_path):  # in one process too
        with pytest.raises(ValueError, match="being written"):
            _schedule().save(s_path)
    _schedule().save(s_path)
    assert OLSSSchedule.load(s_path).timesteps == [900, 400]


class _Killed(BaseException):
    """Stands for SIGKILL: no except clause of the library handles it."""


@pytest.mark.parametrize("swap", [False, True])
def test_an_interrupted_export_publish_keeps_the_old_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             swap: bool) -> None:
    """Regression (export publishing is two renames): replacing an export is interrupted at the second rename of the
    publish (where the system cannot swap two folders in one step) or not at all (where it can); either way the old
    export survives: it is at the folder, or put back by the next write, which then reuses it."""
    pytest.importorskip("onnxruntime")
    from olss_fast.export import folders, onnx_export
    from olss_fast.export.onnx_runner import OnnxOLSSRunner

    pipe = _digits_pipe()
    base = OLSSScheduler.from_config(pipe.scheduler.config).ddim_schedule(2)
    a = base
    b = OLSSSchedule(base.timesteps, base.indices, base.coeffs * 1.01, teacher_steps=base.teacher_steps)
    out = tmp_path / "export"
    first = onnx_export.export_onnx(pipe, a, out, guidance_scale=2.0)
    if not swap:
        monkeypatch.setattr(folders, "exchange_paths", lambda x, y: False)
    state = {"publishing": False, "renames": 0}
    real_replace, real_publish = os.replace, onnx_export.publish_folder

    def replace(src: Any, dst: Any) -> None:
        if state["publishing"]:
            state["renames"] += 1
            if state["renames"] == 2:
                raise _Killed()
        real_replace(src, dst)

    def publish(staging: Path, target: Path) -> None:
        state["publishing"] = True
        try:
            real_publish(staging, target)
        finally:
            state["publishing"] = False

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(onnx_export, "publish_folder", publish)
    try:
        onnx_export.export_onnx(pipe, b, out, guidance_scale=2.0, overwrite=True)
        interrupted = False
    except _Killed:
        interrupted = True
    monkeypatch.undo()
    assert interrupted or swap  # two renames where the folders cannot be swapped in one step
    again = onnx_export.export_onnx(pipe, a, out, guidance_scale=2.0, overwrite=True)
    if interrupted:
        assert again.reused and again.cache_key == first.cache_key  # the old export, restored, not re-exported
    assert OnnxOLSSRunner(out).schedule == a.to_dict()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")]
    assert leftovers in ([], [".export.lock"]), leftovers
