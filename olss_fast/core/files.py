"""File I/O rules every olss_fast reader and writer follows.

**Writers are atomic.** A file is written under a temporary name in its target folder (``.<name>.<pid>.<random>.tmp``),
fsynced, given the permissions an ordinary ``open()`` would (``0666 & ~umask``) and renamed onto the final name: a crash
or a kill half-way never leaves a truncated file under the final name. Temporaries left behind by a killed process
(its pid no longer runs on this machine) are removed by the next write into the same folder.

**Writers are exclusive.** :func:`exclusive_lock` takes an advisory ``flock`` on a lock file beside an output
(``.<name>.lock``); a second writer of the same output gets a ``ValueError`` naming the process that holds it. The
operating system releases the lock when its process dies, so a killed job never leaves a stale lock.

**Readers are bounded and strict.** :func:`read_limited` reads only regular files (no folders, devices, FIFOs),
checks the size before reading, and :func:`parse_json` turns every JSON problem (invalid UTF-8, syntax, NaN/Infinity
literals, pathological nesting) into a ``ValueError``; :mod:`olss_fast.core.checks` then checks every field's exact
type and range.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Callable, Iterator

#: JSON nesting deeper than this is refused (every format of ours nests at most 4 levels)
MAX_JSON_DEPTH = 64


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


# ---------------------------------------------------------------------------------------------- temporaries
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.(?:tmp|partial)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def temporary_name(final: Path, suffix: str = "tmp") -> Path:
    """``.<name>.<pid>.<random>.<suffix>`` beside ``final`` (recognisable as ours, with its writer's pid)."""
    return final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.{suffix}"


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove our temporaries in ``folder`` whose writer process no longer runs; returns what was removed."""
    import shutil

    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP_RE.match(p.name)
        if m is None or _pid_alive(int(m.group("pid"))):
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it onto ``path``, on failure delete
    it. Stale temporaries of killed writers in the same folder are removed first."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"cannot write {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: folder {folder} is not writable")
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder")
    clean_stale_temporaries(folder)
    tmp_path = temporary_name(path)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        default_mode(tmp_path)
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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


# ---------------------------------------------------------------------------------------------- locks
@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Hold an exclusive advisory lock on ``target`` (a file or folder that may not exist yet) for the body.

    The lock file ``.<name>.lock`` lives beside ``target`` while the lock is held and is removed afterwards; a second
    holder gets a ``ValueError`` naming the process that holds it. The operating system releases the lock when its
    process dies (a killed job leaves at most an unlocked lock file, which the next holder reuses).
    """
    import fcntl

    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create {parent}: {exc}") from None
    lock = parent / f".{target.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        except OSError as exc:
            raise ValueError(f"cannot create the lock file {lock}: {exc}") from None
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
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)  # releases the flock


# ---------------------------------------------------------------------------------------------- bounded reading
def check_regular_file(path: str | os.PathLike, max_bytes: int, what: str) -> os.stat_result:
    """``ValueError`` unless ``path`` is a regular file of at most ``max_bytes`` (missing, a folder, a device or FIFO,
    too large, unreadable) — for readers that open the file themselves; returns its ``os.stat``."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {path} is not a regular file")
    if st.st_size > max_bytes:
        raise ValueError(f"{what} {path} has {st.st_size} bytes, more than the {max_bytes} such a file can have "
                         "(not one of ours, or corrupted)")
    return st


def read_limited(path: str | os.PathLike, max_bytes: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ``ValueError`` otherwise (see
    :func:`check_regular_file`, and a file that grows while being read)."""
    path = Path(path)
    check_regular_file(path, max_bytes, what)
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{what} {path} grew beyond {max_bytes} bytes while being read")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"the JSON literal {name} is not a number")


def _depth(obj: Any, limit: int) -> int:
    stack = [(obj, 1)]
    deepest = 0
    while stack:
        cur, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(cur, dict):
            stack.extend((v, d + 1) for v in cur.values())
        elif isinstance(cur, list):
            stack.extend((v, d + 1) for v in cur)
    return deepest


def parse_json(data: bytes | str, what: str) -> Any:
    """JSON text → Python objects; every problem is a ``ValueError`` naming ``what``."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 text (corrupted?)") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"{what} nests JSON too deeply (corrupted?)") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{what} is not valid JSON (truncated or corrupted?): {exc}") from None
    if _depth(obj, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ValueError(f"{what} nests JSON too deeply (corrupted?)")
    return obj


def read_json(path: str | os.PathLike, max_bytes: int, what: str) -> Any:
    """:func:`read_limited` + :func:`parse_json`."""
    return parse_json(read_limited(path, max_bytes, what), f"{what} {path}")


def canonical_json(obj: Any) -> str:
    """Sorted-key, compact JSON of JSON data (what file headers are written as; NaN and infinities refused)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def digest(obj: Any) -> str:
    """The one digest of olss_fast's JSON data: SHA-256 of its sorted-key, compact JSON (values JSON cannot hold by
    their ``repr``; infinities as ``Infinity``: scheduler configs hold some). It detects corruption and edits by
    anyone who does not recompute it; it proves nothing about who wrote the data (anyone can recompute it)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr).encode()).hexdigest()
