"""The input checks every entry point uses: one home for "an integer, not a bool", "a finite number", ranges, choices,
exact JSON types, the one-time warning, and the one mapping of loose keyword arguments onto an options dataclass.

Every check raises ``ValueError`` naming what was wrong (``what``) and what was given, and returns the value in the type
it will be used in. Types are exact: a bool is not an integer, ``3.0`` is not an integer, ``"1"`` is not a number
(numpy integer and floating scalars are accepted as numbers). Files use the same checks on their parsed JSON, so a
field has one JSON type and a range checked in the dtype it is used in.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import torch

FLOAT32_MAX = 3.4028234663852886e38

_logger = logging.getLogger(__name__)
_warned: set[Any] = set()
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- numbers
def _int_range(lo: Optional[int], hi: Optional[int]) -> str:
    if lo is not None and hi is not None:
        return f"an integer in [{lo}, {hi}]"
    if lo == 1:
        return "a positive integer"
    if lo == 0:
        return "a non-negative integer"
    if lo is not None:
        return f"an integer >= {lo}"
    if hi is not None:
        return f"an integer <= {hi}"
    return "an integer"


def integer(value: Any, what: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``value`` as an ``int`` in ``[lo, hi]`` (either bound optional); bools and floats (3.9 is not 3) refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be {_int_range(lo, hi)}, got {_show(value)}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{what} must be {_int_range(lo, hi)}, got {v if abs(v) < 10**30 else 'a huge number'}")
    return v


def real(value: Any, what: str, lo: Optional[float] = None, hi: Optional[float] = None, *, open_lo: bool = False,
         float32: bool = False) -> float:
    """``value`` as a finite ``float`` (ints accepted) in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``); with
    ``float32`` it must also be finite in float32, the dtype it will be used in."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a finite number, got {_show(value)}")
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{what} must be a finite number, got a number too large for a float") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {_show(value)}")
    if float32 and abs(v) > FLOAT32_MAX:
        raise ValueError(f"{what} = {v:.3g} overflows float32, the dtype it is used in")
    if lo is not None and (v < lo or (open_lo and v == lo)):
        bound = f"in ({lo}, {hi}]" if hi is not None and open_lo else f"in [{lo}, {hi}]" if hi is not None \
            else f"> {lo}" if open_lo else f">= {lo}"
        raise ValueError(f"{what} must be {bound}, got {v:.6g}")
    if hi is not None and v > hi:
        bound = f"in [{lo}, {hi}]" if lo is not None else f"<= {hi}"
        raise ValueError(f"{what} must be {bound}, got {v:.6g}")
    return v


def optional(check: Callable[..., T], value: Any, *args: Any, **kwargs: Any) -> Optional[T]:
    """``None`` stays ``None``; anything else goes through ``check(value, *args, **kwargs)``."""
    return None if value is None else check(value, *args, **kwargs)


# ---------------------------------------------------------------------------------------------- other types
def boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {_show(value)}")
    return value


def string(value: Any, what: str, max_len: int = 4096) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")
    return value


def choice(value: Any, what: str, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices`` (compared by type and value: ``True`` is not ``1``)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"unknown {what} {_show(value)}: {what} must be one of {tuple(choices)}")
    return value


def mapping(value: Any, what: str, keys: Optional[Sequence[str]] = None, optional: Sequence[str] = ()) -> dict:
    """A dict (a JSON object), with exactly ``keys`` (plus any of ``optional``) when ``keys`` is given."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    if keys is not None:
        missing = [k for k in keys if k not in value]
        unknown = [k for k in value if k not in keys and k not in optional]
        if missing:
            raise ValueError(f"{what} lacks {missing}")
        if unknown:
            raise ValueError(f"{what} has unknown field(s) {sorted(map(str, unknown))[:10]}")
    return value


def listing(value: Any, what: str, max_len: int) -> list:
    """A list (a JSON array) of at most ``max_len`` entries."""
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list, got {type(value).__name__}")
    if len(value) > max_len:
        raise ValueError(f"{what} has {len(value)} entries, more than {max_len}")
    return value


def version(value: Any, what: str, versions: Sequence[int]) -> int:
    """A format version: exactly one of the integers ``versions`` (``2.0`` and ``true`` are not versions)."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in versions:
        raise ValueError(f"unsupported {what} version {_show(value)[:20]}; this olss_fast reads version(s) "
                         f"{', '.join(map(str, versions))}")
    return value


def hex_digest(value: Any, what: str) -> str:
    """A SHA-256 hex digest: 64 lowercase hex digits."""
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"{what} must be a SHA-256 hex digest (64 hex digits), got {_show(value)[:80]}")
    return value


def step_counts(value: Any, what: str, hi: int) -> tuple[int, ...]:
    """One step count or a list of distinct ones, each in ``[1, hi]``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{what} must be a positive integer or a list of them, got {_show(value)}")
    steps = tuple(integer(n, what, 1, hi) for n in value)
    if not steps:
        raise ValueError(f"{what} is empty: give at least one step count")
    if len(set(steps)) != len(steps):
        raise ValueError(f"{what} has duplicates: {list(steps)}")
    return steps


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------- devices
def device(device: str) -> str:
    """``ValueError`` (one line) when the requested device does not exist on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device name (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {device}: no CUDA device is available on this machine (torch "
                             f"{torch.__version__}, {build}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"--device {device}: unsupported device type {dev.type!r}")
    return device


# ---------------------------------------------------------------------------------------------- options
C = TypeVar("C")


def options(cls: type[C], config: Optional[C], given: Mapping[str, Any], what: str) -> C:
    """The one way loose keyword arguments become an options dataclass: ``config`` (an instance of ``cls``) or
    ``given`` (its field names as keywords), never both; unknown names are refused."""
    if config is not None:
        if given:
            raise ValueError(f"pass {what} options in config={cls.__name__}(...) or as keywords, not both "
                             f"({sorted(given)})")
        if not isinstance(config, cls):
            raise ValueError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        return config
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} of the {what}; {cls.__name__} takes {sorted(known)}")
    return cls(**given)


# ---------------------------------------------------------------------------------------------- one-time warnings
def warn_once(key: Any, message: str, *args: Any, logger: Optional[logging.Logger] = None) -> None:
    """Log ``message % args`` as a warning the first time ``key`` is seen in this process (what the library cannot
    honour, or does differently than asked, is said once and clearly; never silently)."""
    if key in _warned:
        return
    _warned.add(key)
    (logger or _logger).warning(message, *args)


# ---------------------------------------------------------------------------------------------- command line
def cli_type(check: Callable[..., T], kind: str, parse: Callable[[str], Any] = int, **bounds: Any
             ) -> Callable[[str], T]:
    """An argparse ``type=``: ``parse`` the text, then ``check(value, kind, **bounds)``; argparse reports
    "expected <kind>, got '<text>'"."""

    def convert(text: str) -> T:
        try:
            return check(parse(text), kind, **bounds)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None

    return convert


#: argparse types of the command lines
any_int = cli_type(integer, "an integer")
positive_int = cli_type(integer, "a positive integer", lo=1)
nonnegative_int = cli_type(integer, "a non-negative integer", lo=0)
finite_float = cli_type(real, "a finite number", parse=float)
