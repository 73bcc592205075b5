"""``--for`` durations: the forms people type, and one clear error naming anything else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.flow.durations import MAX_SECONDS, format_duration, parse_duration


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400), ("1d", 86400),
    ("1d12h", 129600), ("2h0m5s", 7205), ("600", 600), (" 15M ", 900), ("90", 90),
])
def test_accepted_forms(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", " ", "0", "0s", "0h0m", "-5m", "-90", "1.5h", "abc", "m", "5x", "30m1h", "1h1h",
    "1 h", "h30", "15 minutes", "1e3",
])
def test_garbage_zero_and_negative_are_refused_naming_the_value(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert repr(text) in str(info.value)


def test_absurdly_long_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than 366 days"):
        parse_duration("367d")
    assert parse_duration("366d") == MAX_SECONDS


@given(st.integers(min_value=1, max_value=MAX_SECONDS))
def test_format_then_parse_is_identity(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds
