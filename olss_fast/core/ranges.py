"""Sets of work-item indices kept as sorted, disjoint ``[start, stop)`` ranges, never expanded.

Statistics and checkpoints record which work items they hold as ranges; a file may claim ``[[0, 10**9]]`` in a few
bytes, so every operation here costs O(number of ranges) (plus sorting the new indices), never O(number of items).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from olss_fast.core import checks

#: the largest work-item index (exclusive) a range may name
MAX_ITEMS = 10**9
#: the most ranges a file may list
MAX_RANGES = 10**6

Ranges = list[list[int]]


def to_ranges(indices: Iterable[int]) -> Ranges:
    """Sorted ``[start, stop)`` ranges covering ``indices``."""
    out: Ranges = []
    for i in sorted(set(int(i) for i in indices)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def check_ranges(ranges: Any, what: str, limit: int = MAX_ITEMS) -> Ranges:
    """Validate ``[start, stop)`` ranges without expanding them: integers, ``0 <= start < stop <= limit``, sorted
    and disjoint."""
    out = []
    prev = -1
    for r in checks.listing(ranges, what, MAX_RANGES):
        if not (isinstance(r, list) and len(r) == 2):
            raise ValueError(f"{what} must hold [start, stop) pairs, got {str(r)[:60]}")
        a, b = checks.integer(r[0], what, 0, limit), checks.integer(r[1], what, 0, limit)
        if not a < b or a <= prev:
            raise ValueError(f"{what} must be sorted, disjoint [start, stop) ranges, got {str(r)[:60]}")
        prev = b - 1
        out.append([a, b])
    return out


def count(ranges: Sequence[Sequence[int]]) -> int:
    """How many indices the ranges cover."""
    return sum(b - a for a, b in ranges)


def union(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> Ranges:
    """The union of two range lists, merged into sorted disjoint ranges (adjacent ranges joined)."""
    out: Ranges = []
    for start, stop in sorted([list(r) for r in a] + [list(r) for r in b]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return out


def shared(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> tuple[int, int | None]:
    """How many indices both range lists cover, and the smallest of them (None when there is none): a merge walk
    over both sorted lists."""
    i = j = total = 0
    first = None
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            total += hi - lo
            first = lo if first is None else first
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return total, first
