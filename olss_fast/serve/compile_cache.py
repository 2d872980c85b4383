"""A persistent cache of ``torch.compile`` artefacts, so that a second process reaches its first image in seconds.

``torch.compile`` spends most of a cold start in inductor (code generation, autotuning, C++/Triton builds). PyTorch
can serialise what it built (``torch.compiler.save_cache_artifacts``: the FX-graph, AOTAutograd and autotuning caches)
and hot-load it in another process (``torch.compiler.load_cache_artifacts``), after which inductor's own cache lookups
hit and only Dynamo's tracing is paid again. This module keeps those bytes on disk, one file per *key*:

* the key (:func:`cache_key`) is a SHA-256 over everything the compiled code depends on — the compiled modules'
  classes, configs and weights fingerprints (:func:`olss_fast.core.fingerprint.model_id`), the program's input shapes,
  dtype and options, the compile mode, the torch / triton / diffusers / transformers / olss_fast versions and the device (GPU
  name, compute capability and CUDA version, or the CPU's vector ISA);
* an entry is ``<key>.bin``: one JSON header line (format, the full key description, payload size and an HMAC-SHA256
  of header and payload under this user's secret key) and the payload;
* writes are atomic (:mod:`olss_fast.core.files`), so a killed process never leaves a half-written entry, and private
  (mode 0600).

**Trust.** The payload is what ``torch.compiler.load_cache_artifacts`` unpickles and writes into inductor's caches:
loading an entry runs whatever it holds. So only entries this user's olss_fast wrote are ever handed to PyTorch:

* the cache folder must belong to this user and not be writable by group or others (``allow_shared=True``, or
  ``OLSS_FAST_SHARED_CACHE=1`` in the environment, accepts a group- or world-writable folder of this user's: everyone
  who can write there is then trusted), else the cache is not used (a warning; the program compiles);
* each entry carries an HMAC under a per-user secret (32 random bytes in ``.olss_fast_cache_key``, mode 0600, in the
  cache folder); a plain digest anyone can recompute proves nothing about who wrote the entry;
* an entry is opened once, without following links and non-blocking, and the opened file is checked (regular, ours,
  not writable by others, bounded size): never the path twice;
* every artefact's key is checked before PyTorch sees it: a known artefact type, and a relative path without ``..``
  (an ``autotune`` key names a file inductor writes under its cache folder).

Anything else is ignored with a warning naming the entry, and the program compiles from scratch (and rewrites it).
Inductor itself guards every cached graph with its own key, so a verified artefact can at worst be unused, never
applied to another graph.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import platform
import re
import secrets
import stat
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from olss_fast.core import checks
from olss_fast.core import files as _io

logger = logging.getLogger(__name__)

__all__ = ["CompileCache", "artifact_keys", "cache_key", "environment", "inductor_counters"]

FORMAT = "olss_fast.compile_cache"
VERSION = 2  # 2: an HMAC under the user's secret key instead of a plain digest
#: entries larger than this are refused (a compiled SDXL program is a few hundred MB)
MAX_ENTRY_BYTES = 8 * 2**30
#: the per-user secret the entries are authenticated with, in the cache folder
KEY_FILE = ".olss_fast_cache_key"
#: environment variable: "1" accepts a group- or world-writable cache folder of this user's
SHARED_ENV = "OLSS_FAST_SHARED_CACHE"
_MAX_HEADER_BYTES = 1 << 20
_HEADER_KEYS = ("format", "version", "key", "description", "payload_bytes", "hmac")
#: the artefact types ``torch.compiler.save_cache_artifacts`` writes
ARTIFACT_TYPES = ("inductor", "autotune", "aot_autograd", "pgo", "precompile")
_KEY_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:=+@-]*$")


def environment(device: torch.device) -> dict[str, Any]:
    """The software and hardware a compiled artefact is specific to."""
    import importlib.metadata as md

    versions: dict[str, Optional[str]] = {"torch": torch.__version__, "python": platform.python_version()}
    for dist in ("triton", "diffusers", "transformers", "olss_fast"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    dev: dict[str, Any] = {"type": device.type}
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        dev.update(name=props.name, capability=list(torch.cuda.get_device_capability(device)),
                   cuda=torch.version.cuda, memory=int(props.total_memory))
    elif device.type == "cpu":
        dev.update(isa=torch.backends.cpu.get_cpu_capability(), machine=platform.machine())
    return {"versions": versions, "device": dev}


def cache_key(description: Mapping[str, Any]) -> str:
    """The SHA-256 of a JSON-serialisable key description (canonical JSON; see the module docstring)."""
    return hashlib.sha256(_io.canonical_json(description).encode()).hexdigest()


def inductor_counters() -> dict[str, int]:
    """Inductor's FX-graph cache hit/miss counters of this process (empty when this torch does not expose them)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - private API moved
        return {}
    c = counters.get("inductor", {})
    return {k: int(c.get(k, 0)) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}


def artifact_keys(payload: bytes) -> list[tuple[str, str]]:
    """``(type, key)`` of every artefact in a ``torch.compiler.save_cache_artifacts`` payload, read without unpickling
    anything. The format (``torch.utils._appending_byte_serializer``): a CRC-32, a uint64 version (1), then per
    artefact type its name, a uint64 count and per artefact its key and content; integers are big-endian, names and
    keys length-prefixed base64 of UTF-8, contents length-prefixed bytes. ``ValueError`` for anything else, an unknown
    type, or a key that is not a plain relative name (an absolute path or ``..`` would make PyTorch write outside its
    cache folder)."""
    data = memoryview(payload)
    if len(data) < 12 or zlib.crc32(data[4:]).to_bytes(4, "big") != bytes(data[:4]):
        raise ValueError("its artefacts are not in PyTorch's format (checksum)")
    pos = 4

    def u64() -> int:
        nonlocal pos
        if pos + 8 > len(data):
            raise ValueError("its artefacts are truncated")
        pos += 8
        return int.from_bytes(data[pos - 8:pos], "big")

    def blob() -> memoryview:
        nonlocal pos
        n = u64()
        if n > len(data) - pos:
            raise ValueError("its artefacts are truncated")
        pos += n
        return data[pos - n:pos]

    def text() -> str:
        try:
            return base64.b64decode(bytes(blob()), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise ValueError("its artefacts hold a name that is not base64 UTF-8") from None

    if u64() != 1:
        raise ValueError("its artefacts are in an unknown version of PyTorch's format")
    out = []
    while pos < len(data):
        kind = text()
        if kind not in ARTIFACT_TYPES:
            raise ValueError(f"it holds artefacts of an unknown type {kind[:40]!r}")
        for _ in range(u64()):
            key = text()
            blob()
            parts = key.split("/")
            if not key or len(key) > 1024 or len(parts) > 4 or not all(_KEY_PART.match(p) for p in parts):
                raise ValueError(f"its {kind} artefact key {key[:80]!r} is not a plain relative name (an absolute "
                                 "path or '..' would write outside PyTorch's cache folder)")
            out.append((kind, key))
    return out


class CompileCache:
    """Compiled artefacts in ``folder``, one file per key (see the module docstring). ``allow_shared`` (default:
    ``$OLSS_FAST_SHARED_CACHE == "1"``) accepts a folder of this user's that group or others may write."""

    def __init__(self, folder: "str | os.PathLike[str]", allow_shared: Optional[bool] = None) -> None:
        self.folder = Path(folder)
        self.allow_shared = os.environ.get(SHARED_ENV) == "1" if allow_shared is None else bool(allow_shared)
        self.loaded: set[str] = set()
        self.saved: set[str] = set()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.bin"

    def _secret(self, create: bool) -> bytes:
        """This user's secret key (created 0600 on the first save); ``ValueError`` when the folder or the key file
        is not private to this user."""
        _io.private_folder(self.folder, "compile cache folder", self.allow_shared)
        path = self.folder / KEY_FILE
        if create and not os.path.lexists(path):
            tmp = _io.temporary_name(path)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            try:
                os.write(fd, secrets.token_bytes(32))
                os.fsync(fd)
                os.close(fd)
                try:
                    os.link(tmp, path)  # never replaces a key another process created first
                except FileExistsError:
                    pass
            finally:
                os.unlink(tmp)
        fd, st = _io.open_regular(path, 64, "its key file", follow=False)
        try:
            if (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o077 or st.st_size != 32:
                raise ValueError(f"the key file {path} is not a private 32-byte file of this user's (mode "
                                 f"{st.st_mode & 0o777:o}); delete it and the entries to start over")
            return _io.read_fd(fd, 32, "its key file")
        finally:
            os.close(fd)

    def load(self, key: str, description: Mapping[str, Any]) -> bool:
        """Hot-load the entry for ``key`` into this process; True when it was loaded. A missing entry returns
        False silently; an unusable one (not written by this user's olss_fast, corrupted, truncated, stale, unsafe
        folder or permissions, an unsafe artefact, rejected by PyTorch) logs a warning naming the file and returns
        False."""
        path = self.path(key)
        if not os.path.lexists(path):
            return False
        try:
            payload = self._read(path, key, description, self._secret(create=False))
            artifact_keys(payload)
        except ValueError as exc:
            logger.warning("ignoring the compile cache entry %s: %s; compiling from scratch (the entry is rewritten)",
                           path, exc)
            return False
        try:
            info = torch.compiler.load_cache_artifacts(payload)
        except Exception as exc:  # noqa: BLE001 - PyTorch's own loader failing is an unusable entry, not an error
            logger.warning("ignoring the compile cache entry %s: torch.compiler.load_cache_artifacts failed (%r); "
                           "compiling from scratch", path, exc)
            return False
        self.loaded.add(key)
        logger.info("loaded compiled artefacts from %s (%s)", path, _describe(info))
        return True

    @staticmethod
    def _mac(secret: bytes, header: Mapping[str, Any], payload: bytes | memoryview) -> str:
        h = hmac.new(secret, _io.canonical_json({k: v for k, v in header.items() if k != "hmac"}).encode() + b"\n",
                     hashlib.sha256)
        h.update(payload)
        return h.hexdigest()

    def _read(self, path: Path, key: str, description: Mapping[str, Any], secret: bytes) -> bytes:
        fd, st = _io.open_regular(path, MAX_ENTRY_BYTES + _MAX_HEADER_BYTES, "compile cache entry", follow=False)
        try:  # every check on the one opened file
            if hasattr(os, "getuid") and st.st_uid != os.getuid():
                raise ValueError("it is owned by another user")
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise ValueError("it is writable by other users")
            head = _io.read_fd(fd, min(st.st_size, _MAX_HEADER_BYTES), "compile cache entry")
            newline = head.find(b"\n")
            if newline < 0:
                raise ValueError("it has no header line (truncated or not one of ours)")
            header = checks.mapping(_io.parse_json(head[:newline], "its header"), "its header")
            if header.get("format") != FORMAT:
                raise ValueError(f"it is not a {FORMAT} file")
            checks.version(header.get("version"), "compile cache entry", (VERSION,))
            checks.mapping(header, "its header", keys=_HEADER_KEYS)
            if header["key"] != key or _io.canonical_json(header["description"]) != _io.canonical_json(description):
                raise ValueError("it was written for another model, shape, dtype or software version (stale)")
            size = checks.integer(header["payload_bytes"], "payload_bytes", 0, MAX_ENTRY_BYTES)
            if st.st_size != newline + 1 + size:
                raise ValueError(f"it has {st.st_size - newline - 1} payload bytes, the header says {size} "
                                 "(truncated?)")
            payload = bytes(_io.read_fd(fd, size, "compile cache entry", newline + 1))  # PyTorch wants bytes
        finally:
            os.close(fd)
        mac = header["hmac"]
        if not isinstance(mac, str) or not hmac.compare_digest(mac, self._mac(secret, header, payload)):
            raise ValueError("its HMAC does not verify: it was not written by this user's olss_fast (or it was "
                             "modified or corrupted)")
        return payload

    def save(self, key: str, description: Mapping[str, Any]) -> Optional[Path]:
        """Write what this process compiled so far (``torch.compiler.save_cache_artifacts``) as the entry for
        ``key``; returns the path, or None when there was nothing to save or the folder cannot be used (a warning:
        the program still runs, only the next process compiles again)."""
        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # noqa: BLE001
            logger.warning("torch.compiler.save_cache_artifacts failed (%r); the next process compiles again", exc)
            return None
        if saved is None or not saved[0]:
            return None
        payload = bytes(saved[0])
        path = self.path(key)
        try:
            artifact_keys(payload)  # what load would refuse is not written
            secret = self._secret(create=True)
        except (OSError, ValueError) as exc:
            logger.warning("cannot write the compile cache entry %s (%s); the next process compiles again", path, exc)
            return None
        header = {"format": FORMAT, "version": VERSION, "key": key, "description": dict(description),
                  "payload_bytes": len(payload)}
        header["hmac"] = self._mac(secret, header, payload)

        def write(tmp: Path) -> None:
            os.chmod(tmp, 0o600)  # private: entries are trusted code (see the module docstring)
            with open(tmp, "wb") as fh:
                fh.write(_io.canonical_json(header).encode() + b"\n")
                fh.write(payload)

        try:
            _io.atomic_write_with(path, write)
            os.chmod(path, 0o600)
        except (OSError, ValueError) as exc:
            logger.warning("cannot write the compile cache entry %s (%s); the next process compiles again", path, exc)
            return None
        self.saved.add(key)
        logger.info("saved compiled artefacts to %s (%.1f MB, %s)", path, len(payload) / 1e6, _describe(saved[1]))
        return path


def _describe(info: Any) -> str:
    """``CacheInfo`` → "inductor: 3, aot_autograd: 3" (artefact counts by kind)."""
    artifacts = getattr(info, "artifacts", None)
    if not isinstance(artifacts, Mapping):
        return "no details"
    return ", ".join(f"{kind}: {len(keys)}" for kind, keys in artifacts.items() if keys) or "no artefacts"
