"""A persistent cache of ``torch.compile`` artefacts, so that a second process reaches its first image in seconds.

``torch.compile`` spends most of a cold start in inductor (code generation, autotuning, C++/Triton builds). PyTorch
can serialise what it built (``torch.compiler.save_cache_artifacts``: the FX-graph, AOTAutograd and autotuning caches)
and hot-load it in another process (``torch.compiler.load_cache_artifacts``), after which inductor's own cache lookups
hit and only Dynamo's tracing is paid again. This module keeps those bytes on disk, one file per *key*:

* the key (:func:`cache_key`) is a SHA-256 over everything the compiled code depends on — the compiled modules'
  classes, configs and sampled weights (:func:`olss_fast.core.provenance.model_id`), the program's input shapes, dtype and
  options, the compile mode, the torch / triton / diffusers / transformers / olss_fast versions and the device (GPU
  name, compute capability and CUDA version, or the CPU's vector ISA);
* an entry is ``<key>.bin``: one JSON header line (format, the full key description, payload size and SHA-256) and
  the payload. :meth:`CompileCache.load` checks the header and digest before handing anything to PyTorch; a
  truncated, corrupted, foreign or stale entry (a header whose key description differs from the expected one) logs a
  warning and is ignored — the program then compiles from scratch and the entry is rewritten — never loaded;
* writes are atomic (:mod:`olss_fast.core.files`), so a killed process never leaves a half-written entry, and private
  (mode 0600).

Inductor itself guards every cached graph with its own key, so an artefact can at worst be unused, never applied to
another graph. The payload is pickled data, as PyTorch's own caches are: the cache folder must be as trusted as the
Python environment; entries not owned by the current user, or writable by others, are refused with a warning.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import stat
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from olss_fast.core import checks
from olss_fast.core import files as _io

logger = logging.getLogger(__name__)

__all__ = ["CompileCache", "cache_key", "environment", "inductor_counters"]

FORMAT = "olss_fast.compile_cache"
VERSION = 1
#: entries larger than this are refused (a compiled SDXL program is a few hundred MB)
MAX_ENTRY_BYTES = 8 * 2**30
_MAX_HEADER_BYTES = 1 << 20


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


class CompileCache:
    """Compiled artefacts in ``folder``, one file per key (see the module docstring)."""

    def __init__(self, folder: "str | os.PathLike[str]") -> None:
        self.folder = Path(folder)
        self.loaded: set[str] = set()
        self.saved: set[str] = set()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.bin"

    def load(self, key: str, description: Mapping[str, Any]) -> bool:
        """Hot-load the entry for ``key`` into this process; True when it was loaded. A missing entry returns
        False silently; an unusable one (corrupted, truncated, foreign, stale, unsafe permissions, rejected by
        PyTorch) logs a warning naming the file and returns False."""
        path = self.path(key)
        if not path.exists():
            return False
        try:
            payload = self._read(path, key, description)
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

    def _read(self, path: Path, key: str, description: Mapping[str, Any]) -> bytes:
        st = _io.check_regular_file(path, MAX_ENTRY_BYTES + _MAX_HEADER_BYTES, "compile cache entry")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise ValueError("it is owned by another user")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ValueError("it is writable by other users")
        data = _io.read_limited(path, MAX_ENTRY_BYTES + _MAX_HEADER_BYTES, "compile cache entry")
        newline = data.find(b"\n", 0, _MAX_HEADER_BYTES)
        if newline < 0:
            raise ValueError("it has no header line (truncated or not one of ours)")
        header = checks.mapping(_io.parse_json(data[:newline], "its header"), "its header",
                                 keys=("format", "version", "key", "description", "payload_bytes",
                                       "payload_sha256"))
        if header["format"] != FORMAT or header["version"] != VERSION:
            raise ValueError(f"it is not a version-{VERSION} {FORMAT} file")
        if header["key"] != key or _io.canonical_json(header["description"]) != _io.canonical_json(description):
            raise ValueError("it was written for another model, shape, dtype or software version (stale)")
        payload = data[newline + 1:]
        size = checks.integer(header["payload_bytes"], "payload_bytes", 0, MAX_ENTRY_BYTES)
        if len(payload) != size:
            raise ValueError(f"its payload has {len(payload)} bytes, the header says {size} (truncated?)")
        if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
            raise ValueError("its payload does not match its SHA-256 digest (corrupted)")
        return payload

    def save(self, key: str, description: Mapping[str, Any]) -> Optional[Path]:
        """Write what this process compiled so far (``torch.compiler.save_cache_artifacts``) as the entry for
        ``key``; returns the path, or None when there was nothing to save or the folder cannot be written (a
        warning: the program still runs, only the next process compiles again)."""
        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # noqa: BLE001
            logger.warning("torch.compiler.save_cache_artifacts failed (%r); the next process compiles again", exc)
            return None
        if saved is None or not saved[0]:
            return None
        payload = bytes(saved[0])
        header = {"format": FORMAT, "version": VERSION, "key": key, "description": dict(description),
                  "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}
        path = self.path(key)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                fh.write(_io.canonical_json(header).encode() + b"\n")
                fh.write(payload)

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            _io.atomic_write_with(path, write)
            os.chmod(path, 0o600)  # private: entries are trusted code (see the module docstring)
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
