"""STATESWEEP_ACTIVE_HOURS: windows in UTC, wrapping midnight, several per day; open, next
opening and closing instants; malformed values refused with the usage."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.flow.hours import USAGE, parse_active_hours

DAY = dt.datetime(2026, 3, 10, tzinfo=dt.UTC)


def at(hhmm: str, days: int = 0) -> dt.datetime:
    h, m = (int(x) for x in hhmm.split(":"))
    return DAY + dt.timedelta(days=days, hours=h, minutes=m)


def test_a_plain_window_is_open_from_start_inclusive_to_end_exclusive() -> None:
    hours = parse_active_hours("01:00-05:00")
    assert not hours.is_open(at("00:59"))
    assert hours.is_open(at("01:00"))
    assert hours.is_open(at("04:59"))
    assert not hours.is_open(at("05:00"))
    assert hours.next_open(at("05:00")) == at("01:00", days=1)
    assert hours.next_open(at("00:30")) == at("01:00")
    assert hours.closes_at(at("02:00")) == at("05:00")
    assert hours.closes_at(at("06:00")) == at("05:00", days=1)


def test_a_window_wrapping_midnight() -> None:
    hours = parse_active_hours("22:00-06:00")
    assert hours.is_open(at("23:30"))
    assert hours.is_open(at("00:00"))
    assert hours.is_open(at("05:59"))
    assert not hours.is_open(at("06:00"))
    assert not hours.is_open(at("21:59"))
    assert hours.next_open(at("12:00")) == at("22:00")
    # Open in the evening: it closes tomorrow morning, not at midnight.
    assert hours.closes_at(at("23:00")) == at("06:00", days=1)
    assert hours.closes_at(at("03:00")) == at("06:00")
    assert hours.closes_at(at("12:00")) == at("06:00", days=1)


def test_several_windows_and_touching_ones_merge() -> None:
    hours = parse_active_hours("01:00-05:00, 12:00-13:00")
    assert hours.is_open(at("12:30"))
    assert not hours.is_open(at("06:00"))
    assert hours.next_open(at("06:00")) == at("12:00")
    assert hours.next_open(at("13:00")) == at("01:00", days=1)
    merged = parse_active_hours("22:00-24:00,00:00-06:00")
    assert merged.spans == parse_active_hours("22:00-06:00").spans
    assert merged.closes_at(at("23:00")) == at("06:00", days=1)


def test_windows_covering_the_whole_day_never_close() -> None:
    for text in ("00:00-24:00", "00:00-12:00,12:00-24:00", "06:00-18:00,17:00-07:00"):
        hours = parse_active_hours(text)
        assert hours.always_open, text
        assert hours.is_open(at("03:00"))
        assert hours.closes_at(at("03:00")) is None


def test_other_time_zones_are_converted_to_utc() -> None:
    hours = parse_active_hours("22:00-06:00")
    paris_midnight = dt.datetime(2026, 3, 10, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert hours.is_open(paris_midnight)  # 23:00 UTC
    assert hours.next_open(paris_midnight) == paris_midnight


def test_a_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        parse_active_hours("22:00-06:00").is_open(dt.datetime(2026, 3, 10, 12))


@pytest.mark.parametrize("text", [
    "", " ", "22-06", "22:00", "22:00-", "22:00-06:00-07:00", "25:00-06:00", "22:60-06:00",
    "24:00-06:00", "22:00-24:30", "10pm-6am", "22:00-06:00,", "22.00-06.00", "-1:00-02:00",
])
def test_malformed_windows_are_refused_with_the_usage(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_active_hours(text)
    assert str(info.value).startswith(USAGE)


def test_a_window_starting_and_ending_at_the_same_time_is_refused() -> None:
    with pytest.raises(ValueError, match="starts and ends at the same time.*unset"):
        parse_active_hours("22:00-22:00")


minutes = st.integers(min_value=0, max_value=24 * 60 - 1)
windows = st.lists(st.tuples(minutes, minutes).filter(lambda w: w[0] != w[1]),
                   min_size=1, max_size=3)
instants = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1),
                        timezones=st.just(dt.UTC))


def hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def open_by_definition(spec: list[tuple[int, int]], when: dt.datetime) -> bool:
    minute = when.hour * 60 + when.minute
    return any(s <= minute < e if s < e else minute >= s or minute < e for s, e in spec)


@given(spec=windows, when=instants)
def test_is_open_next_open_and_closes_at_agree(spec: list[tuple[int, int]],
                                               when: dt.datetime) -> None:
    hours = parse_active_hours(",".join(f"{hhmm(s)}-{hhmm(e)}" for s, e in spec))
    assert hours.is_open(when) == open_by_definition(spec, when)
    opened = hours.next_open(when)
    assert when <= opened < when + dt.timedelta(days=1)
    assert hours.is_open(opened)
    if opened > when:  # closed until then: the minute before was closed too
        assert not hours.is_open(opened - dt.timedelta(minutes=1))
    closes = hours.closes_at(when)
    if hours.always_open:
        assert closes is None
        return
    assert closes is not None and opened < closes <= opened + dt.timedelta(days=1)
    assert not hours.is_open(closes)
    assert hours.is_open(closes - dt.timedelta(minutes=1))
    # Open all the way from opening to closing (checked each minute boundary in between).
    step = opened.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    while step < closes:
        assert hours.is_open(step)
        step += dt.timedelta(minutes=1)
