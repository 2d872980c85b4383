"""File I/O rules every olss_fast reader and writer follows (the trust model is in docs/design.md, "Trust boundaries").

**Writers are atomic.** A file is written under a temporary name in its target folder
(``.<name>.<pid>.<tag><random>.tmp``; long names are shortened so that the temporary stays a legal file name),
fsynced, given the permissions an ordinary ``open()`` would (``0666 & ~umask``) and renamed onto the final name: a crash
or a kill half-way never leaves a truncated file under the final name. Only regular files are replaced: a target that
is a FIFO, a device or a socket is a ``ValueError``. A temporary left behind by a killed writer is removed by the
next write into the same folder when its writer ran in this PID namespace of this machine (the ``tag``) and no longer
runs, or when it is older than :data:`STALE_AGE_S`: a live writer in another container or on another node that shares
the folder keeps its temporaries.

**Writers are exclusive.** :func:`exclusive_lock` takes an advisory ``flock`` on a lock file beside an output
(``.<name>.lock``); a second writer of the same output gets a ``ValueError`` naming the process that holds it (every
atomic write takes it, unless its caller already holds it). The operating system releases the lock when its process
dies, so a killed job never leaves a stale lock. The lock file is opened without following links
and must be a regular file with one link holding nothing but a lock's text: a planted link or hard link is refused,
never truncated.

**Readers are bounded and strict.** :func:`open_regular` opens a file once (non-blocking, optionally without
following links) and checks the opened descriptor: a regular file of bounded size (no folders, devices, FIFOs, and no
race between a check and the open). :func:`read_limited` reads it in chunks up to its real size, and
:func:`parse_json` turns every JSON problem (invalid UTF-8, syntax, NaN/Infinity literals, numbers beyond float
range, duplicate keys, pathological nesting, more values than the format can hold) into a ``ValueError``;
:mod:`olss_fast.core.checks` then checks every field's exact type and range.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

#: JSON nesting deeper than this is refused (every format of ours nests at most 4 levels)
MAX_JSON_DEPTH = 64
#: a temporary of another machine or PID namespace is removed only when it is older than this (seconds)
STALE_AGE_S = 24 * 3600
#: the most characters of an output's name its temporaries and lock file keep (file names have at most 255 bytes)
_NAME_KEEP = 200
_READ_CHUNK = 1 << 24


#: environment variable naming the cache folder (exports, engines, compiled artefacts)
CACHE_ENV = "OLSS_FAST_CACHE"


def default_cache_dir() -> Path:
    """``$OLSS_FAST_CACHE`` or ``~/.cache/olss_fast``: where ``compile_olss_pipeline`` keeps exports, engines and
    compiled artefacts."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "olss_fast")


# ---------------------------------------------------------------------------------------------- permissions
def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(path: str | os.PathLike) -> None:
    """Give a file we created the permissions an ordinary ``open()`` would (0666 & ~umask; folders 0777 & ~umask):
    ``tempfile`` creates 0600 files and 0700 folders, which would make our outputs private to the writer."""
    p = Path(path)
    os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~current_umask())


def private_folder(folder: Path, what: str, allow_shared: bool = False) -> Path:
    """Create ``folder`` (mode 0700) if needed and check that only this user can change what is in it: owned by the
    current user and not writable by group or others (``allow_shared`` accepts a group- or world-writable folder of
    this user: the user trusts everyone who can write there). ``ValueError`` otherwise."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(folder)
    except OSError as exc:
        raise ValueError(f"cannot create the {what} {folder}: {exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"the {what} {folder} is not a folder")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ValueError(f"the {what} {folder} belongs to another user (uid {st.st_uid}); use a folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not allow_shared:
        raise ValueError(f"the {what} {folder} is writable by other users (mode {st.st_mode & 0o777:o}); make it "
                         "private (chmod go-w) or use a folder of your own")
    return folder


# ---------------------------------------------------------------------------------------------- temporaries
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<hex>[0-9a-f]{12}|[0-9a-f]{8})\.(?:tmp|partial)$")


@functools.lru_cache(maxsize=1)
def namespace_tag() -> str:
    """Six hex digits naming this machine's boot and this PID namespace: pids in a temporary's name are only
    meaningful where the tag is the same."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:6]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def short_name(name: str) -> str:
    """``name``, or for names longer than :data:`_NAME_KEEP` bytes a prefix plus a hash of the whole name (so that
    temporaries and lock files of a legal 255-byte name are legal names too)."""
    raw = name.encode()
    if len(raw) <= _NAME_KEEP:
        return name
    return raw[: _NAME_KEEP - 17].decode("utf-8", "ignore") + "~" + hashlib.sha256(raw).hexdigest()[:16]


def temporary_name(final: Path, suffix: str = "tmp") -> Path:
    """``.<name>.<pid>.<tag><random>.<suffix>`` beside ``final`` (recognisable as ours, with its writer's pid and
    :func:`namespace_tag`)."""
    return final.parent / f".{short_name(final.name)}.{os.getpid()}.{namespace_tag()}{secrets.token_hex(3)}.{suffix}"


def _is_stale(p: Path, m: re.Match) -> bool:
    hexpart = m.group("hex")
    if len(hexpart) == 12 and hexpart[:6] == namespace_tag():
        return not _pid_alive(int(m.group("pid")))
    try:  # another machine or PID namespace (or an old name without a tag): only when it was left long ago
        return time.time() - os.lstat(p).st_mtime > STALE_AGE_S
    except OSError:
        return False


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove our temporaries in ``folder`` whose writer is gone (see the module docstring); returns what was
    removed."""
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP_RE.match(p.name)
        if m is None or not _is_stale(p, m):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:  # pragma: no cover - raced with another cleaner
            pass
    return removed


def check_writable_target(path: Path) -> None:
    """``ValueError`` unless ``path`` is missing or a regular file (a link to one counts): a writer never replaces a
    folder, a FIFO, a device or a socket."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"cannot write {path}: it is a folder")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"cannot write {path}: it is not a regular file (a FIFO, a device or a socket); "
                         "choose a file name")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, lock: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it onto ``path``, on failure delete
    it. The write holds :func:`exclusive_lock` on ``path`` (``lock=False``: the caller holds it); stale temporaries in
    the folder are removed first."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"cannot write {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: folder {folder} is not writable")
    check_writable_target(path)
    with exclusive_lock(path, "file") if lock else contextlib.nullcontext():
        clean_stale_temporaries(folder)
        for _ in range(16):
            tmp_path = temporary_name(path)
            try:
                fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
                break
            except FileExistsError:  # pragma: no cover - 24 random bits collided
                continue
        else:  # pragma: no cover
            raise ValueError(f"cannot create a temporary file beside {path}")
        os.close(fd)
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            default_mode(tmp_path)
            check_writable_target(path)
            os.replace(tmp_path, path)
            _fsync_folder(folder)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
            raise


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str, lock: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, lock) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None], lock: bool = True) -> None:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path, lock) as tmp:
        writer(tmp)


# ---------------------------------------------------------------------------------------------- locks
_LOCK_TEXT = re.compile(rb"^(process \d+)?$")


def lock_path(target: Path) -> Path:
    """The lock file of ``target``: ``.<name>.lock`` beside it."""
    parent = target.parent if str(target.parent) else Path(".")
    return parent / f".{short_name(target.name)}.lock"


def _open_lock(lock: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(lock, flags, 0o666 & ~current_umask())
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"the lock file {lock} is a symbolic link, not an olss_fast lock (planted?); remove it "
                             "if you know where it came from") from None
        raise ValueError(f"cannot create the lock file {lock}: {exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > 64:
        os.close(fd)
        raise ValueError(f"{lock} is not an olss_fast lock file (not a plain file of its own: a link, a device or a "
                         "file with content); remove it if you know where it came from")
    return fd


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Hold an exclusive advisory lock on ``target`` (a file or folder that may not exist yet) for the body.

    The lock file ``.<name>.lock`` lives beside ``target`` while the lock is held and is removed afterwards; a second
    holder gets a ``ValueError`` naming the process that holds it (in this process too). The operating system releases the lock when its process dies (a killed job leaves at most an unlocked lock file,
    which the next holder reuses). A lock file that is a link, a hard link or holds other text is refused, never
    truncated.
    """
    import fcntl

    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create {parent}: {exc}") from None
    lock = lock_path(target)
    while True:
        fd = _open_lock(lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(f"cannot lock {lock}: {exc}") from None
            raise ValueError(
                f"{what} {target} is being written by {holder}; wait for it to finish or choose another path"
            ) from None
        try:  # the file we locked must still be the one at the path (a finishing holder unlinks it)
            st = os.fstat(fd)
            same = st.st_ino == os.lstat(lock).st_ino and st.st_nlink == 1
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    if not _LOCK_TEXT.match(os.pread(fd, 65, 0).strip()):
        os.close(fd)
        raise ValueError(f"{lock} is not an olss_fast lock file (it holds other text); remove it if you know where "
                         "it came from")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)  # releases the flock


# ---------------------------------------------------------------------------------------------- bounded reading
def open_regular(path: str | os.PathLike, max_bytes: int, what: str, *, follow: bool = True) -> tuple[int, Any]:
    """Open ``path`` once for reading (non-blocking, so a FIFO cannot hang us; without following a final link when
    ``follow`` is False) and check the opened file: ``(fd, its fstat)`` of a regular file of at most ``max_bytes``,
    else ``ValueError`` (the descriptor is closed). The caller closes ``fd``."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise ValueError(f"{what} {path} is a symbolic link (refused: it must be a file of its own)") from None
        raise ValueError(f"{what} {path} cannot be read: {exc}") from None
    st = os.fstat(fd)
    problem = ("is a folder, not a file" if stat.S_ISDIR(st.st_mode) else
               "is not a regular file" if not stat.S_ISREG(st.st_mode) else
               f"has {st.st_size} bytes, more than the {max_bytes} such a file can have (not one of ours, or "
               "corrupted)" if st.st_size > max_bytes else None)
    if problem:
        os.close(fd)
        raise ValueError(f"{what} {path} {problem}")
    return fd, st


def read_fd(fd: int, size: int, what: str, offset: int = 0) -> bytearray:
    """``size`` bytes of an open file from ``offset``, read in chunks into one buffer of exactly that size (never a
    buffer larger than what is there); ``ValueError`` when the file is shorter."""
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        chunk = os.pread(fd, min(_READ_CHUNK, size - got), offset + got)
        if not chunk:
            raise ValueError(f"{what} ended after {got} of {size} bytes (truncated while being read?)")
        view[got:got + len(chunk)] = chunk
        got += len(chunk)
    return buf


def read_limited(path: str | os.PathLike, max_bytes: int, what: str, *, follow: bool = True) -> bytearray:
    """The bytes of a regular file of at most ``max_bytes`` (:func:`open_regular`), read in chunks up to its real
    size; ``ValueError`` otherwise, and when the file changes size while being read."""
    fd, st = open_regular(path, max_bytes, what, follow=follow)
    try:
        data = read_fd(fd, st.st_size, f"{what} {path}")
        if os.pread(fd, 1, st.st_size):
            raise ValueError(f"{what} {path} grew while being read")
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc}") from None
    finally:
        os.close(fd)
    return data


class _Refused(ValueError):
    """A JSON value the formats never hold (a duplicate key, a number beyond float range)."""


def _reject_constant(name: str) -> Any:
    raise _Refused(f"the JSON literal {name} is not a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is beyond the float range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Refused(f"the key {k[:60]!r} appears twice in one object (which one counts is ambiguous)")
        out[k] = v
    return out


def _depth(obj: Any, limit: int) -> int:
    stack = [(obj, 1)]
    deepest = 0
    while stack:
        cur, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        values = cur.values() if isinstance(cur, dict) else cur
        stack.extend((v, d + 1) for v in values if isinstance(v, (dict, list)))
    return deepest


def parse_json(data: bytes | str, what: str, max_values: Optional[int] = None) -> Any:
    """JSON text → Python objects; every problem is a ``ValueError`` naming ``what``. With ``max_values`` a text
    holding more values (counted by separators, before anything is built) or more than ``max_values // 8`` arrays and
    objects is refused: what a file may cost is bounded by what the format can hold."""
    if max_values is not None:  # counted on the raw text, before anything is decoded or built
        comma, brackets = (",", "[{") if isinstance(data, str) else (b",", (b"[", b"{"))
        values, containers = data.count(comma) + 1, data.count(brackets[0]) + data.count(brackets[1])
        if values > max_values or containers > max(max_values // 8, 64):
            raise ValueError(f"{what} holds more values ({values}) or arrays and objects ({containers}) than such a "
                             "file can (not one of ours, or corrupted)")
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 text (corrupted?)") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                         object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError(f"{what} nests JSON too deeply (corrupted?)") from None
    except _Refused as exc:
        raise ValueError(f"{what}: {exc}") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{what} is not valid JSON (truncated or corrupted?): {exc}") from None
    if _depth(obj, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ValueError(f"{what} nests JSON too deeply (corrupted?)")
    return obj


def read_json(path: str | os.PathLike, max_bytes: int, what: str, max_values: Optional[int] = None) -> Any:
    """:func:`read_limited` + :func:`parse_json`."""
    return parse_json(read_limited(path, max_bytes, what), f"{what} {path}", max_values)


def canonical_json(obj: Any) -> str:
    """Sorted-key, compact JSON of JSON data (what file headers are written as; NaN and infinities refused)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def digest(obj: Any) -> str:
    """The one digest of olss_fast's JSON data: SHA-256 of its sorted-key, compact JSON (values JSON cannot hold by
    their ``repr``; infinities as ``Infinity``: scheduler configs hold some). It detects corruption and edits by
    anyone who does not recompute it; it proves nothing about who wrote the data (anyone can recompute it)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr).encode()).hexdigest()
