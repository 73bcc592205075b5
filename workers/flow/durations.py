"""Durations as people type them on the command line: ``statesweep pause --for 1h30m``.

Accepted: one or more ``<number><unit>`` parts with units ``d``, ``h``, ``m``, ``s`` in that
order, each at most once (``90s``, ``15m``, ``2h``, ``1h30m``, ``1d``, ``1d12h``), or a plain
whole number of seconds (``600``). Case and surrounding spaces are ignored. Anything else, and a
total of zero, is a :class:`ValueError` whose message names the value, so the CLI can print it
as it is. Fractions (``1.5h``) are refused rather than guessed: ``1h30m`` says it exactly.
"""

from __future__ import annotations

import re

_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}

# Units in descending order, each optional but at least one present (checked below).
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")

#: Longest pause accepted: a year. Beyond it a typo (``--for 10000000d``) is likelier than intent,
#: and an absurd value would overflow ``datetime`` arithmetic downstream.
MAX_SECONDS = 366 * 86400

EXAMPLES = "e.g. 90s, 15m, 2h, 1h30m, 1d or plain seconds"


def parse_duration(value: str) -> int:
    """Seconds in *value* (``"1h30m"`` -> 5400); ValueError naming *value* when it is not a
    positive duration of at most :data:`MAX_SECONDS`."""
    text = value.strip().lower()
    if text.isdigit():
        seconds = int(text)
    else:
        match = _DURATION.fullmatch(text)
        if not text or match is None or not any(match.groups()):
            raise ValueError(f"{value!r} is not a duration ({EXAMPLES})")
        seconds = sum(int(n) * _UNIT_SECONDS[unit]
                      for n, unit in zip(match.groups(), "dhms", strict=True) if n)
    if seconds <= 0:
        raise ValueError(f"{value!r} is not a positive duration ({EXAMPLES})")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{value!r} is longer than {MAX_SECONDS // 86400} days")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse for display: 5400 -> ``"1h30m"``, 0 -> ``"0s"``; fractions are dropped."""
    remaining = int(seconds)
    parts = []
    for unit, size in _UNIT_SECONDS.items():
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"
