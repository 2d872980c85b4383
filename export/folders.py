"""Export folders on disk: written in a staging sibling and published so that a crash at any moment leaves the old
export or the new one, and the export cache bounded by evicting the least recently used exports.

Publishing (:func:`publish_folder`) swaps the staging folder and the old export in one step where Linux's
``renameat2(RENAME_EXCHANGE)`` is available; elsewhere the old export is parked under a name no cleanup removes and
put back by the next write (:func:`restore_parked`), which runs under the folder's exclusive lock.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from olss_fast.core.files import current_umask, exclusive_lock, short_name, temporary_name
from olss_fast.export.onnx_runner import read_manifest

logger = logging.getLogger(__name__)

__all__ = ["fsync_tree", "mark_used", "publish_folder", "restore_parked", "staging_folder", "trim_export_cache"]


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the C library or the
    filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def parked_exports(out: Path) -> list[Path]:
    """Old exports a publish parked beside ``out`` (``.<name>.<pid>.<tag>.old``), newest first."""
    head = f".{short_name(out.name)}."
    try:
        found = [p for p in out.parent.iterdir() if p.name.startswith(head) and p.name.endswith(".old")
                 and re.fullmatch(r"\d+\.[0-9a-f]{12}", p.name[len(head):-4]) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def restore_parked(out: Path) -> None:
    """Under the folder's lock: a publish killed between its two renames left the old export parked and none at
    ``out``: put the newest parked one back; parked exports of finished publishes are removed."""
    parked = parked_exports(out)
    if parked and not out.exists():
        logger.warning("restoring the ONNX export %s, which an interrupted write had moved to %s", out, parked[0])
        os.replace(parked.pop(0), out)
    for p in parked:
        shutil.rmtree(p, ignore_errors=True)


def publish_folder(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder onto ``out``, replacing an empty folder or an old export so that a crash
    at any point leaves the old or the new export: swapped in one step where the system can, else the old one is
    parked under a name no cleanup removes and put back by the next write (:func:`restore_parked`)."""
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(staging, out)
        return
    if exchange_paths(staging, out):  # the new export at out, the old one at staging's name
        shutil.rmtree(staging, ignore_errors=True)
        return
    parked = out.parent / f".{short_name(out.name)}.{os.getpid()}.{secrets.token_hex(6)}.old"
    os.replace(out, parked)
    os.replace(staging, out)
    shutil.rmtree(parked, ignore_errors=True)


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` that is deleted unless the body moved it away (atomic folder writes). Stale
    staging folders of killed writers are the caller's to clean (``write_export`` does, under the folder's lock)."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create {parent}: {exc}") from None
    if not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write to {parent}")
    staging = temporary_name(out, "partial")
    staging.mkdir(mode=0o777 & ~current_umask())
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` (before it is published by rename)."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def trim_export_cache(folder: Path, max_bytes: int, keep: Path) -> list[Path]:
    """Bound the export cache ``folder`` (one olss_fast export per sub-folder) to ``max_bytes``: remove the least
    recently used exports (by modification time; :func:`mark_used` refreshes it) until the rest fit, never ``keep``,
    never a folder that is not a readable olss_fast export, never one another process is writing. Returns what was
    removed."""
    entries = []
    for sub in (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else ():
        try:
            read_manifest(sub)
        except ValueError:
            continue  # not ours (or damaged): never deleted by the cache
        size = sum(f.stat().st_size for f in sub.rglob("*") if f.is_file() and not f.is_symlink())
        entries.append((sub.stat().st_mtime, sub, size))
    total = sum(size for _, _, size in entries)
    removed = []
    for _, sub, size in sorted(entries):
        if total <= max_bytes:
            break
        if sub.resolve() == keep.resolve():
            continue
        try:
            with exclusive_lock(sub, "ONNX export folder"):
                shutil.rmtree(sub)
        except (ValueError, OSError):
            continue  # being written by another process, or already gone
        total -= size
        removed.append(sub)
        logger.info("export cache %s over %.1f GB: removed the least recently used export %s", folder,
                    max_bytes / 1e9, sub.name)
    return removed


def mark_used(export_dir: Path) -> None:
    """Record that an export was used now (its folder's modification time orders :func:`trim_export_cache`)."""
    with contextlib.suppress(OSError):
        os.utime(export_dir)
