"""`doctor`'s view of beat and of the pause, from what the run store remembers of triggers.

Every coordinator trigger is noted in the run store (workers.runs.RunStore.note_trigger): the
last one of each outcome, and the times of the latest beat triggers. From those, cheaply:
- beat is alive if it triggered within 3 periods of STATESWEEP_COORDINATOR_SCHEDULE (the first
  trigger comes one period after beat starts, so a fresh beat is not yet a problem);
- two beats run if two beat triggers came closer together than half a period: one beat fires
  once a period, a second one doubles the triggers (one run still, but twice the noise).
"""

from __future__ import annotations

import datetime as dt
import time

from workers.runs import RunStore
from workers.settings import Settings, parse_schedule

STALE_PERIODS = 3
CRONTAB_HORIZON_MINUTES = 8 * 24 * 60  # a week and a day: every crontab repeats within it


def schedule_period(raw: str) -> float:
    """Seconds between coordinator triggers: the number itself, or a crontab's longest gap
    between two firings over a week (so a sparse crontab is not called stale too early)."""
    parsed = parse_schedule(raw)
    if isinstance(parsed, float):
        return parsed
    from celery.schedules import crontab

    minute, hour, day_of_month, month_of_year, day_of_week = parsed
    cron = crontab(minute=minute, hour=hour, day_of_month=day_of_month,
                   month_of_year=month_of_year, day_of_week=day_of_week)
    start = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)  # a Monday; only the gaps matter
    fires = []
    for m in range(CRONTAB_HORIZON_MINUTES):
        at = start + dt.timedelta(minutes=m)
        if (at.minute in cron.minute and at.hour in cron.hour
                and at.isoweekday() % 7 in cron.day_of_week and at.day in cron.day_of_month
                and at.month in cron.month_of_year):
            fires.append(at.timestamp())
    gaps = [b - a for a, b in zip(fires, fires[1:], strict=False)]
    return max(gaps) if gaps else 7 * 86400.0


def _ago(ts: float, now: float) -> str:
    from workers.flow.durations import format_duration

    return f"{format_duration(max(0.0, now - ts))} ago"


def beat_checks(settings: Settings, registry: RunStore,
                now: float | None = None) -> list[tuple[str, str, str]]:
    """(name, status, detail) for beat, the last triggers, a second beat and the pause."""
    now = time.time() if now is None else now
    period = schedule_period(settings.coordinator_schedule)
    checks = []
    beats = registry.beat_trigger_times()
    if not beats:
        checks.append(("beat", "warn", "no beat trigger recorded yet: the first comes one "
                       f"period ({period:g}s, STATESWEEP_COORDINATOR_SCHEDULE="
                       f"{settings.coordinator_schedule!r}) after beat starts; is beat running?"))
    elif now - beats[0] > STALE_PERIODS * period:
        checks.append(("beat", "warn", f"last beat trigger {_ago(beats[0], now)}, over "
                       f"{STALE_PERIODS}x the coordinator schedule ({period:g}s): is beat "
                       "running, and a worker consuming the control queue?"))
    else:
        checks.append(("beat", "ok", f"last beat trigger {_ago(beats[0], now)} "
                       f"(schedule {period:g}s)"))
    gaps = [a - b for a, b in zip(beats, beats[1:], strict=False)]
    close = [g for g in gaps if g < period / 2]
    if close:
        checks.append(("second beat", "warn",
                       f"two beat triggers came {min(close):.1f}s apart, under half the "
                       f"schedule ({period:g}s): a second beat is probably running; run "
                       "exactly one"))
    triggers = registry.triggers()
    if triggers:
        parts = [f"{outcome} {_ago(at, now)} ({source or '-'})"
                 for outcome, (at, _run, source, _d) in
                 sorted(triggers.items(), key=lambda kv: -kv[1][0])]
        failed = triggers.get("failed")
        started = triggers.get("started")
        if failed and (not started or failed[0] > started[0]):
            checks.append(("triggers", "warn", f"the last trigger to run failed: run "
                           f"{failed[1]}: {failed[3]}; last of each: {', '.join(parts)}"))
        else:
            checks.append(("triggers", "ok", "last of each: " + ", ".join(parts)))
    paused = registry.paused()
    if paused is None:
        checks.append(("pause", "ok", "not paused"))
    else:
        until = (dt.datetime.fromtimestamp(paused.until, dt.UTC).isoformat() if paused.until
                 else "`statesweep resume`")
        checks.append(("pause", "warn", f"paused by {paused.by or 'someone'} "
                       f"{_ago(paused.at, now)} until {until}: {paused.reason or '-'}"))
    return checks
