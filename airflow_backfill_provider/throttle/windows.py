"""Maintenance windows: may a chunk start now, and if not, when does the window open?

Pure: no Airflow, no database. The chunk operator asks :meth:`Windows.next_open` before it opens a
source session; a non-None answer makes it defer (a time trigger, no worker slot) until then.

Spec (``windows:``):

- ``allowed: ["22:00-06:00", ...]``: daily ranges, local wall clock in the windows' timezone, seconds
  optional, half-open ``[from, to)``; ``from > to`` wraps midnight. Empty list: any time is allowed.
- ``blackout: ["12:00-13:00", "2024-12-24T00:00/2024-12-27T00:00"]``: daily ranges, or absolute ranges
  ``start/end`` (ISO, local time unless an offset is given). A blackout wins over an allowed range.

A window is checked when a chunk *starts*: a chunk that started inside the window runs to its end
(a transaction is not cut in the middle); keep chunks short relative to the window.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import pendulum

from airflow_backfill_provider.core.chunks import parse_datetime
from airflow_backfill_provider.core.exceptions import SpecError

_DAILY = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*-\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*$")
#: look this many days ahead for the next opening; a spec that never opens within it is refused
_HORIZON_DAYS = 8


@dataclass(frozen=True)
class Daily:
    start_s: int  # seconds after local midnight
    end_s: int

    def contains(self, local: pendulum.DateTime) -> bool:
        s = local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6
        if self.start_s < self.end_s:
            return self.start_s <= s < self.end_s
        return s >= self.start_s or s < self.end_s  # wraps midnight


@dataclass(frozen=True)
class Absolute:
    start: pendulum.DateTime
    end: pendulum.DateTime

    def contains(self, moment: pendulum.DateTime) -> bool:
        return self.start.timestamp() <= moment.timestamp() < self.end.timestamp()


def _daily(text: str, what: str) -> Daily:
    m = _DAILY.match(text)
    if not m:
        raise SpecError(f"{what}={text!r} is not a daily range; write 'HH:MM-HH:MM' (e.g. '22:00-06:00')")
    h1, m1, s1, h2, m2, s2 = (int(x or 0) for x in m.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or s1 > 59 or s2 > 59 or (h2 == 24 and (m2 or s2)):
        raise SpecError(f"{what}={text!r} has an hour or minute out of range (00:00 to 24:00)")
    a, b = h1 * 3600 + m1 * 60 + s1, h2 * 3600 + m2 * 60 + s2
    if a == b % 86400:
        raise SpecError(f"{what}={text!r} is empty or the whole day; leave 'allowed' empty for 'any time'")
    return Daily(a, b % 86400 if b != 86400 else 86400)


def _absolute(text: str, what: str, tz: pendulum.Timezone) -> Absolute:
    try:
        a, b = (parse_datetime(part.strip(), tz) for part in text.split("/", 1))
    except Exception as err:  # pendulum's parser errors vary
        raise SpecError(
            f"{what}={text!r} is not a range; write 'YYYY-MM-DDTHH:MM/YYYY-MM-DDTHH:MM' or a daily 'HH:MM-HH:MM'"
        ) from err
    if b <= a:
        raise SpecError(f"{what}={text!r}: the end must be after the start")
    return Absolute(a, b)


@dataclass(frozen=True)
class Windows:
    tz: pendulum.Timezone
    allowed: tuple[Daily, ...]
    blackout: tuple[Daily | Absolute, ...]

    @property
    def active(self) -> bool:
        return bool(self.allowed or self.blackout)

    def is_open(self, moment: dt.datetime) -> bool:
        local = pendulum.instance(moment).in_timezone(self.tz)
        if self.allowed and not any(w.contains(local) for w in self.allowed):
            return False
        return not any(w.contains(local) for w in self.blackout)

    def next_open(self, now: dt.datetime) -> pendulum.DateTime | None:
        """None when a chunk may start at ``now``; else the first instant after it when one may."""
        if self.is_open(now):
            return None
        local = pendulum.instance(now).in_timezone(self.tz)
        candidates = []
        for days in range(-1, _HORIZON_DAYS + 1):
            day = local.add(days=days)
            edges = [w.start_s for w in self.allowed] + [w.end_s for w in self.blackout if isinstance(w, Daily)]
            for s in edges:
                candidates.append(pendulum.datetime(day.year, day.month, day.day, tz=self.tz).add(seconds=s))
        candidates += [w.end for w in self.blackout if isinstance(w, Absolute)]
        for c in sorted(c for c in candidates if c.timestamp() > local.timestamp()):
            if self.is_open(c):
                return c.in_timezone(self.tz)
        raise SpecError(
            f"windows never open within {_HORIZON_DAYS} days of {local.isoformat()}: allowed={self.allowed} "
            f"blackout={self.blackout}; check windows.allowed and windows.blackout"
        )


def parse_windows(allowed: list[str], blackout: list[str], tz_name: str) -> Windows:
    """Validate and parse the spec's windows; errors name the entry and the accepted forms."""
    from airflow_backfill_provider.core.chunks import check_timezone
    from airflow_backfill_provider.core.exceptions import PlanError

    try:
        tz = check_timezone(tz_name)
    except PlanError as err:
        raise SpecError(f"windows.timezone: {err}") from None
    allow = tuple(_daily(t, f"windows.allowed[{i}]") for i, t in enumerate(allowed))
    black = tuple(
        _absolute(t, f"windows.blackout[{i}]", tz) if "/" in t else _daily(t, f"windows.blackout[{i}]")
        for i, t in enumerate(blackout)
    )
    return Windows(tz, allow, black)
