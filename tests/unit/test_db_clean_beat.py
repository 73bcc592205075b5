"""Beat's db-clean entry (beat_schedule.py): off unless STATESWEEP_DB_CLEAN_KEEP_DAYS turns it
on; its settings checked like the others; the task's arguments checked before any work."""

from __future__ import annotations

import pytest

from beat_schedule import DB_CLEAN, DB_CLEAN_PUMP, build_beat_schedule
from workers.exceptions import SettingsError
from workers.settings import Settings


def test_db_clean_is_off_by_default() -> None:
    tasks = {e["task"] for e in build_beat_schedule(Settings.from_env({})).values()}
    assert DB_CLEAN not in tasks and DB_CLEAN_PUMP not in tasks


def test_keep_days_turns_it_on_with_its_tables_and_period() -> None:
    settings = Settings.from_env({"STATESWEEP_DB_CLEAN_KEEP_DAYS": "30",
                                  "STATESWEEP_DB_CLEAN_TABLES": "log, job",
                                  "STATESWEEP_DB_CLEAN_SCHEDULE": "0 3 * * *"})
    schedule = build_beat_schedule(settings)
    entry = schedule["statesweep-db-clean"]
    assert entry["task"] == DB_CLEAN
    assert entry["kwargs"] == {"source": "beat", "keep_days": 30.0, "tables": ["log", "job"]}
    assert entry["options"]["queue"] == settings.control_queue
    assert schedule["statesweep-db-clean-pump"]["task"] == DB_CLEAN_PUMP


@pytest.mark.parametrize(("name", "value"), [
    ("DB_CLEAN_KEEP_DAYS", "-1"), ("DB_CLEAN_KEEP_DAYS", "soon"),
    ("DB_CLEAN_KEEP_DAYS", "4000"), ("DB_CLEAN_TABLES", "log;drop"),
    ("DB_CLEAN_TABLES", ","), ("DB_CLEAN_SCHEDULE", "every day"),
])
def test_a_bad_db_clean_setting_is_named(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"STATESWEEP_{name}"):
        Settings.from_env({f"STATESWEEP_{name}": value})


@pytest.mark.parametrize(("kwargs", "named"), [
    ({}, "clean_before_timestamp"),
    ({"clean_before_timestamp": "2026-01-01T00:00:00+00:00", "keep_days": 3}, "keep_days"),
    ({"clean_before_timestamp": "yesterday"}, "clean_before_timestamp"),
    ({"keep_days": 0}, "keep_days"),
    ({"keep_days": True}, "keep_days"),
    ({"clean_before_timestamp": "2026-01-01", "batch_size": -1}, "batch_size"),
    ({"clean_before_timestamp": "2026-01-01", "skip_archive": "yes"}, "skip_archive"),
    ({"clean_before_timestamp": "2026-01-01", "tables": 5}, "tables"),
    ({"clean_before_timestamp": "2026-01-01", "dag_ids": [""]}, "dag_ids"),
])
def test_the_tasks_arguments_are_checked(kwargs: dict[str, object], named: str) -> None:
    import datetime as dt

    from workers.dbclean.tasks import request_from_args
    from workers.exceptions import InvalidArgument

    args = {"clean_before_timestamp": None, "keep_days": None, "tables": None, "dag_ids": None,
            "exclude_dag_ids": None, "batch_size": None, "skip_archive": False, **kwargs}
    with pytest.raises(InvalidArgument, match=named):
        request_from_args(**args, now=dt.datetime(2026, 6, 1, tzinfo=dt.UTC))  # type: ignore[arg-type]


def test_keys_keep_their_types_through_a_message() -> None:
    import datetime as dt
    import uuid

    from workers.dbclean.store import decode_key, encode_key

    key = (7, "a|b", uuid.UUID(int=5), dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert decode_key(encode_key(key)) == key
    assert decode_key(encode_key(None)) is None
