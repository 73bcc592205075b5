"""The per-standby rule of workers.flow.lag on rows shaped like pg_stat_replication's, for the
cases a real pair only passes through for milliseconds (tests/integration/test_replica_lag.py
drives the real ones)."""

from __future__ import annotations

from typing import Any

import pytest

from workers.flow.lag import lag_of_row, lag_over_limit


def row(**values: Any) -> dict[str, Any]:
    base = {"name": "walreceiver", "state": "streaming", "replay_lag": None,
            "behind_bytes": 0.0, "silent_for": 4.0}
    return {**base, **values}


def test_caught_up_is_zero_whatever_the_last_report_says() -> None:
    lag = lag_of_row(row(replay_lag=7.5, behind_bytes=0.0, silent_for=30.0))
    assert (lag.seconds, lag.source) == (0.0, "caught_up")


def test_behind_with_a_replay_lag_reads_the_replay_lag() -> None:
    lag = lag_of_row(row(replay_lag=2.5, behind_bytes=8192.0, silent_for=30.0))
    assert (lag.seconds, lag.source, lag.behind_bytes) == (2.5, "replay_lag", 8192)


@pytest.mark.parametrize("behind", [8192.0, None])  # None: the standby never reported a replay
def test_behind_without_a_replay_lag_reads_the_age_of_the_last_reply(
        behind: float | None) -> None:
    lag = lag_of_row(row(behind_bytes=behind, silent_for=4.0))
    assert (lag.seconds, lag.source) == (4.0, "last_reply")


def test_a_standby_clock_ahead_of_the_primary_never_reads_negative() -> None:
    assert lag_of_row(row(behind_bytes=100.0, silent_for=-3.0)).seconds == 0.0


@pytest.mark.parametrize(("lag", "held"), [
    (None, False), (0.0, False), (5.0, False), (5.01, True), (float("inf"), True),
])
def test_which_readings_hold_a_run_at_a_5_second_limit(lag: float | None, held: bool) -> None:
    assert lag_over_limit(lag, 5.0) is held
