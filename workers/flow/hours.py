"""``STATESWEEP_ACTIVE_HOURS``: the UTC windows in which runs may send chunks.

Syntax: ``HH:MM-HH:MM`` in UTC, start inclusive, end exclusive; a window whose end is earlier
than its start wraps midnight (``22:00-06:00`` is open from 22:00 until 06:00 next morning).
``24:00`` is accepted as an end. Several windows may be given separated by commas
(``01:00-05:00,12:00-13:00``): owners of a database often have a night window and a quiet hour
at lunch, and one run should be able to use both without a second scheduler. Overlapping or
touching windows merge, so ``22:00-24:00,00:00-06:00`` behaves as ``22:00-06:00``.

A window whose start equals its end is refused: ``22:00-22:00`` could mean "never" or "always",
and a setting that can be read both ways is a bug waiting for a bad night. To run at any hour,
leave the variable unset. ``00:00-24:00``, or windows that together cover the whole day
(``00:00-12:00,12:00-24:00``), are not ambiguous: they are accepted and mean always open.

Times are UTC only, so a daylight-saving change never moves a window. All methods take and
return timezone-aware datetimes; a naive one is a ValueError rather than a guess.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

DAY = 24 * 60  # minutes
USAGE = "must be HH:MM-HH:MM in UTC, e.g. 22:00-06:00 (several windows separated by commas)"

_WINDOW = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")


@dataclass(frozen=True)
class ActiveHours:
    """Open stretches of the UTC day as disjoint, sorted ``(start, end)`` minute pairs in
    ``[0, 1440]``; a stretch wrapping midnight is stored as its two halves. Build with
    :func:`parse_active_hours`."""

    spans: tuple[tuple[int, int], ...]
    text: str = ""

    @property
    def always_open(self) -> bool:
        return self.spans == ((0, DAY),)

    def is_open(self, at: dt.datetime) -> bool:
        """Whether chunks may be sent at *at*."""
        minute = _minute_of_day(at)
        return any(start <= minute < end for start, end in self.spans)

    def next_open(self, at: dt.datetime) -> dt.datetime:
        """*at* itself when open, else the next instant the window opens."""
        if self.is_open(at):
            return at
        minute = _minute_of_day(at)
        midnight = _midnight(at)
        for start, _ in self.spans:
            if start > minute:
                return midnight + dt.timedelta(minutes=start)
        return midnight + dt.timedelta(days=1, minutes=self.spans[0][0])

    def closes_at(self, at: dt.datetime) -> dt.datetime | None:
        """When the open stretch containing *at* ends; when closed at *at*, when the next one
        (the one :meth:`next_open` returns) ends. None if the window never closes."""
        if self.always_open:
            return None
        opened = self.next_open(at)
        minute = _minute_of_day(opened)
        midnight = _midnight(opened)
        for start, end in self.spans:
            if start <= minute < end:
                if end < DAY or self.spans[0][0] != 0:
                    return midnight + dt.timedelta(minutes=end)
                # Open until midnight and again from 00:00: the stretch goes on into tomorrow.
                return midnight + dt.timedelta(days=1, minutes=self.spans[0][1])
        raise AssertionError("next_open returned a closed instant")  # pragma: no cover

    def __str__(self) -> str:
        return self.text or ",".join(f"{_hhmm(s)}-{_hhmm(e)}" for s, e in self.spans)


def parse_active_hours(value: str) -> ActiveHours:
    """The windows in *value*; ValueError with :data:`USAGE` and the bad part when malformed."""
    minutes: list[tuple[int, int]] = []
    parts = [p.strip() for p in value.split(",")]
    if not any(parts):
        raise ValueError(f"{USAGE}; it is empty")
    for part in parts:
        match = _WINDOW.fullmatch(part)
        if match is None:
            raise ValueError(f"{USAGE}; {part!r} is not HH:MM-HH:MM")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        start, end = _to_minute(part, h1, m1, allow_24=False), _to_minute(part, h2, m2, True)
        if start == end:
            raise ValueError(f"{USAGE}; {part!r} starts and ends at the same time "
                             "(leave the setting unset to run at any hour)")
        if end > start:
            minutes.append((start, end))
        else:
            minutes += [(start, DAY), (0, end)] if end else [(start, DAY)]
    return ActiveHours(_merge(minutes), text=",".join(parts))


def _to_minute(part: str, hour: int, minute: int, allow_24: bool) -> int:
    if minute > 59 or hour > 24 or (hour == 24 and (minute or not allow_24)):
        raise ValueError(f"{USAGE}; {part!r} has a time outside 00:00-23:59")
    return hour * 60 + minute


def _merge(spans: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


def _minute_of_day(at: dt.datetime) -> float:
    utc = _utc(at)
    return utc.hour * 60 + utc.minute + (utc.second + utc.microsecond / 1e6) / 60


def _midnight(at: dt.datetime) -> dt.datetime:
    return _utc(at).replace(hour=0, minute=0, second=0, microsecond=0)


def _utc(at: dt.datetime) -> dt.datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"naive datetime {at!r}: active hours need a timezone-aware one")
    return at.astimezone(dt.UTC)


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"
