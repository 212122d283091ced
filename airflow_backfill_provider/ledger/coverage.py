"""Is a chunk already loaded? Coverage of a chunk's range by the ranges the ledger holds.

Pure: no Airflow, no database. A ledger row is a rectangle: a half-open time range ``[t0, t1)`` times a
half-open key range ``[k0, k1)`` (a time chunk covers every key: ``(-inf, +inf)``). A new chunk is done
when the *union* of the done rectangles covers its rectangle, whatever chunking loaded them: day chunks
cover a week chunk, key ranges of the same time range cover a time chunk, and so on. An exact match is
just the simplest case.

Times are compared as instants (epoch seconds), never as wall clock.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Iterable

INF = math.inf


@dataclass(frozen=True)
class Rect:
    t0: float
    t1: float
    k0: float = -INF  # None in the ledger / chunk means unbounded
    k1: float = INF

    @property
    def all_keys(self) -> bool:
        return self.k0 == -INF and self.k1 == INF


def rect(t0, t1, k0=None, k1=None) -> Rect:
    """From datetimes (or epoch numbers) and optional integer key bounds."""

    def ts(v):
        return float(v) if isinstance(v, (int, float)) else v.timestamp()

    return Rect(ts(t0), ts(t1), -INF if k0 is None else k0, INF if k1 is None else k1)


def merge(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of half-open intervals as sorted disjoint ones (touching intervals join: [a,b)+[b,c) = [a,c))."""
    out: list[list[float]] = []
    for a, b in sorted(i for i in intervals if i[0] < i[1]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _covers_1d(merged: list[tuple[float, float]], starts: list[float], a: float, b: float) -> bool:
    if a >= b:
        return True
    i = bisect.bisect_right(starts, a) - 1
    return i >= 0 and merged[i][0] <= a and merged[i][1] >= b


class Coverage:
    """The done rectangles, indexed so that 17,520 lookups against 17,520 rows stay fast."""

    def __init__(self, done: Iterable[Rect]):
        done = list(done)
        self._full = merge((r.t0, r.t1) for r in done if r.all_keys)
        self._full_starts = [a for a, _ in self._full]
        self._partial = sorted((r for r in done if not r.all_keys and r.t0 < r.t1 and r.k0 < r.k1), key=lambda r: r.t0)
        self._partial_starts = [r.t0 for r in self._partial]

    def covers(self, target: Rect) -> bool:
        if target.t0 >= target.t1 or target.k0 >= target.k1:
            return True  # an empty range holds no rows
        if _covers_1d(self._full, self._full_starts, target.t0, target.t1):
            return True
        # 2-D: cut the target's time range into slabs at every edge of an overlapping rectangle; each slab
        # is covered when the key ranges of the rectangles spanning it cover the target's key range
        over = [r for r in self._partial[: bisect.bisect_left(self._partial_starts, target.t1)] if r.t1 > target.t0]
        over += [Rect(a, b) for a, b in self._full if a < target.t1 and b > target.t0]
        if not over:
            return False
        edges = sorted({target.t0, target.t1, *(r.t0 for r in over), *(r.t1 for r in over)})
        edges = [e for e in edges if target.t0 <= e <= target.t1]
        for a, b in zip(edges, edges[1:]):
            keys = merge((r.k0, r.k1) for r in over if r.t0 <= a and r.t1 >= b)
            if not _covers_1d(keys, [k for k, _ in keys], target.k0, target.k1):
                return False
        return True
