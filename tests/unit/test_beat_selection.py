"""Beat's selection: STATESWEEP_DAG_IDS, STATESWEEP_EXCLUDE_DAG_IDS and STATESWEEP_CLEAN_GRACE
reach the coordinator entry of the built schedule as the coordinator task's own arguments; the
grace travels as seconds and becomes a cutoff before the database's now(), never after it; bad
values are one line naming the variable and its value (no services)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from beat_schedule import build_beat_schedule
from workers.exceptions import InvalidArgument, SettingsError
from workers.selection import Selection, parse_duration
from workers.settings import Settings

COORD_ENTRY = "statesweep-cleanup-task-state"
NOW = dt.datetime(2026, 12, 4, 6, 0, tzinfo=dt.UTC)


def coordinator_kwargs(env: dict[str, str]) -> dict[str, object]:
    kwargs = build_beat_schedule(Settings.from_env(env))[COORD_ENTRY]["kwargs"]
    assert isinstance(kwargs, dict)
    # Beat sends them through Celery's JSON serializer: what arrives is what round-trips.
    decoded = json.loads(json.dumps(kwargs))
    assert isinstance(decoded, dict)
    return decoded


def test_the_coordinator_entry_carries_the_selection_settings() -> None:
    kwargs = coordinator_kwargs({"STATESWEEP_DAG_IDS": " etl_daily, etl_hourly,etl_daily",
                                 "STATESWEEP_EXCLUDE_DAG_IDS": "billing",
                                 "STATESWEEP_CLEAN_GRACE": "6h"})
    assert kwargs == {"source": "beat", "dag_ids": ["etl_daily", "etl_hourly"],
                      "exclude_dag_ids": ["billing"], "clean_grace_seconds": 21600.0}
    # The coordinator task takes them as they are and narrows its run to them.
    chosen = Selection.from_args(kwargs["dag_ids"], kwargs["exclude_dag_ids"], None,
                                 kwargs["clean_grace_seconds"])
    assert chosen == Selection(("etl_daily", "etl_hourly"), ("billing",), None,
                               dt.timedelta(hours=6))
    assert chosen.cutoff(NOW) == NOW - dt.timedelta(hours=6)
    assert "expired more than 6h ago" in chosen.describe()


def test_without_selection_settings_beat_cleans_everything_expired() -> None:
    assert coordinator_kwargs({}) == {"source": "beat"}
    assert coordinator_kwargs({"STATESWEEP_CLEAN_GRACE": "0", "STATESWEEP_DAG_IDS": ""}) == {
        "source": "beat"}


def test_each_beat_run_takes_the_grace_from_its_own_now() -> None:
    """A grace is relative: two runs an hour apart get cutoffs an hour apart, each one the
    grace before the now() it read; a fixed timestamp would stop moving."""
    chosen = Selection.from_args(clean_grace_seconds=600)
    later = NOW + dt.timedelta(hours=1)
    assert chosen.cutoff(NOW) == NOW - dt.timedelta(minutes=10)
    assert chosen.cutoff(later) == later - dt.timedelta(minutes=10)


def test_grace_and_timestamp_only_narrow() -> None:
    """The earliest of now, now - grace and the timestamp wins; nothing moves the cutoff past
    the database's now()."""
    assert Selection().cutoff(NOW) == NOW
    soon = NOW + dt.timedelta(days=1)
    assert Selection(before=soon).cutoff(NOW) == NOW
    assert Selection(before=soon, grace=dt.timedelta(hours=1)).cutoff(NOW) == (
        NOW - dt.timedelta(hours=1))
    early = NOW - dt.timedelta(days=3)
    assert Selection(before=early, grace=dt.timedelta(hours=1)).cutoff(NOW) == early


def test_a_grace_survives_the_run_record() -> None:
    chosen = Selection(("a",), (), None, dt.timedelta(seconds=90))
    assert Selection.decode(chosen.encode()) == chosen
    assert not Selection.from_args(clean_grace_seconds=0).encode()


@pytest.mark.parametrize(("raw", "seconds"), [
    ("600", 600.0), ("90s", 90.0), ("30m", 1800.0), ("6h", 21600.0), ("2d", 172800.0),
    ("1w", 604800.0), (" 1.5H ", 5400.0), ("0", 0.0)])
def test_durations(raw: str, seconds: float) -> None:
    assert parse_duration(raw) == seconds
    assert Settings.from_env({"STATESWEEP_CLEAN_GRACE": raw}).clean_grace == seconds


@pytest.mark.parametrize(("env", "says"), [
    ({"STATESWEEP_CLEAN_GRACE": "soon"}, "STATESWEEP_CLEAN_GRACE='soon': must be a duration"),
    ({"STATESWEEP_CLEAN_GRACE": "-1h"}, "STATESWEEP_CLEAN_GRACE='-1h': must be a duration "
                                        "from 0"),
    ({"STATESWEEP_CLEAN_GRACE": "inf"}, "STATESWEEP_CLEAN_GRACE='inf'"),
    ({"STATESWEEP_CLEAN_GRACE": "11000d"}, "ten years"),
    ({"STATESWEEP_DAG_IDS": "a,,b"}, "STATESWEEP_DAG_IDS='a,,b': must name dag ids"),
    ({"STATESWEEP_EXCLUDE_DAG_IDS": "x" * 251}, "at most 250 characters"),
    ({"STATESWEEP_DAG_IDS": "a,b", "STATESWEEP_EXCLUDE_DAG_IDS": "b"},
     "STATESWEEP_EXCLUDE_DAG_IDS='b': excludes dag ids STATESWEEP_DAG_IDS names (b)"),
])
def test_bad_selection_settings_are_one_line_naming_the_variable(env: dict[str, str],
                                                                  says: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    assert says in message
    assert "\n" not in message


@pytest.mark.parametrize("value", [-1, "600", True, float("nan"), 11 * 366 * 86400])
def test_a_bad_clean_grace_seconds_argument_is_refused(value: object) -> None:
    with pytest.raises(InvalidArgument, match="clean_grace_seconds must be a number of seconds"):
        Selection.from_args(clean_grace_seconds=value)
