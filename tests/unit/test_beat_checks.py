"""doctor's beat checks on an in-process run store (fakeredis runs the same commands as Redis):
the coordinator's period from a number or a crontab, a stale beat, a second beat, the pause."""

from __future__ import annotations

import time

import pytest

from tests.cleanup_runs import memory_store
from workers.cli.beat_checks import beat_checks, schedule_period
from workers.settings import Settings


@pytest.mark.parametrize(("raw", "period"), [
    ("600", 600.0),
    ("*/10 * * * *", 600.0),
    ("0 3 * * *", 86400.0),
    ("0 3 * * 1", 7 * 86400.0),
    ("0 1,13 * * *", 12 * 3600.0),
    ("0 2,3 * * *", 23 * 3600.0),  # the longest gap, so a sparse crontab is not stale too soon
])
def test_the_coordinator_period_comes_from_seconds_or_a_crontab(raw: str, period: float) -> None:
    assert schedule_period(raw) == period


def checks(settings: Settings, store: object, now: float) -> dict[str, tuple[str, str]]:
    return {name: (status, detail) for name, status, detail in
            beat_checks(settings, store, now=now)}  # type: ignore[arg-type]


def test_beat_never_seen_recent_stale_and_doubled() -> None:
    settings = Settings.from_env({"STATESWEEP_COORDINATOR_SCHEDULE": "600"})
    store = memory_store()
    now = time.time()
    first = checks(settings, store, now)
    assert first["beat"][0] == "warn" and "one period (600s" in first["beat"][1]
    assert first["pause"] == ("ok", "not paused") and "triggers" not in first

    store.note_trigger("started", "r1", "beat")
    assert checks(settings, store, now)["beat"][0] == "ok"
    stale = checks(settings, store, now + 3 * 600 + 1)
    assert stale["beat"][0] == "warn" and "over 3x the coordinator schedule" in stale["beat"][1]
    assert "second beat" not in stale

    store.note_trigger("skipped", "r2", "cli", "run r1 is active")  # ad hoc: no beat
    assert "second beat" not in checks(settings, store, now)
    store.note_trigger("skipped", "r3", "beat", "run r1 is active")
    doubled = checks(settings, store, now)
    assert doubled["second beat"][0] == "warn"
    assert doubled["triggers"][0] == "ok" and "skipped" in doubled["triggers"][1]


def test_a_failed_last_trigger_and_a_pause_are_warnings() -> None:
    settings = Settings.from_env({})
    store = memory_store()
    store.note_trigger("started", "r1", "beat")
    store.note_trigger("failed", "r2", "beat", "OperationalError: connection refused")
    store.pause("ops@host", "incident 9", 600)
    found = checks(settings, store, time.time())
    assert found["triggers"][0] == "warn" and "connection refused" in found["triggers"][1]
    assert found["pause"][0] == "warn" and "incident 9" in found["pause"][1]
    assert [r for _, r, _, _ in store.failed_triggers()] == ["r2"]
