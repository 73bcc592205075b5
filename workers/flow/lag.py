"""Replica lag, read where the run is: on the primary (PostgreSQL) or on each replica (MySQL).

**PostgreSQL.** One query on the primary reads ``pg_stat_replication``, one row per connected
walsender; base backups in progress (state ``backup``) and logical-decoding consumers (their
slot is ``logical``: a CDC reader that confirms late is not a standby serving reads) are left
out. For each standby:

* **Caught up** (``replay_lsn`` at or past ``pg_current_wal_lsn()``): lag is 0. Nothing has
  been written that the standby has not applied, however old its last report is. This is the
  case ``replay_lag`` cannot express: PostgreSQL clears it to NULL once an idle primary's
  standby has replayed everything, so NULL alone means neither "fine" nor "stuck".
* **Behind, with a replay_lag**: ``replay_lag``. It is measured on the primary's own clock (the
  time since the WAL the standby has just replayed was flushed here), so host clock skew does
  not enter. It also covers a paused or stuck replay: while ``replay_lsn`` stays put, the
  primary extrapolates from its oldest unreplayed sample, so the figure keeps growing with
  every status report (``wal_receiver_status_interval``, 10 s by default, or sooner as WAL
  arrives) instead of freezing at the old value.
* **Behind, replay_lag NULL** (the first burst of WAL after an idle spell, before the standby's
  first reply to it; or a standby that has stopped replying): the age of the standby's last
  reply (``clock_timestamp() - reply_time``, or since the walsender started if it never
  replied). A behind standby cannot be shown to be fresher than its last word, so this errs
  towards holding: a healthy standby replies within milliseconds and the next reading has a
  replay_lag again (:func:`replica_lag_seconds` waits up to a second for it); a silent one
  reads ever older. This is the one place the standby's clock enters (``reply_time`` is its
  send time), and only until its next reply.

The LSN distance alone (bytes) is reported but never turned into seconds: bytes per second
varies by orders of magnitude, and the limit is a time. The run's figure is the worst standby's.
A standby that has disconnected is not in ``pg_stat_replication`` at all, so it is invisible
here; watch its replication slot for that. A standby that stops replying while WAL is flowing
keeps the replay_lag of its last reply until ``wal_sender_timeout`` (60 s) drops it: taking
the reply age there too would make every standby whose clock runs a little slow read as lagging
for good, and a walsender sees no other sign of life.

The role reading it needs ``pg_monitor`` (or ``pg_read_all_stats``, or superuser): without it
PostgreSQL shows the rows with every column but the pid NULL, which would read as "nothing
known"; that is refused with :class:`ReplicaLagUnreadable` naming the grant to run.

**MySQL / MariaDB.** Lag is only known on each replica: ``SHOW REPLICA STATUS`` (MySQL 8.0.22+,
MariaDB 10.5.1+) or ``SHOW SLAVE STATUS``, column ``Seconds_Behind_Source`` /
``Seconds_Behind_Master``. NULL there means the SQL or IO thread is not running: replication is
stopped, which is read as infinitely behind (over any limit). A server that is no replica at
all (empty status) is refused. The reading role needs ``REPLICATION CLIENT`` (MySQL; MariaDB
10.5+: ``REPLICA MONITOR`` or ``REPLICATION CLIENT``/``SLAVE MONITOR``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from workers.exceptions import StatesweepError


class ReplicaLagUnreadable(StatesweepError):
    """The lag cannot be read from this connection (privileges, wrong server); the message
    says what to change."""


@dataclass(frozen=True)
class StandbyLag:
    """One standby's lag as the primary sees it. ``source`` says which rule gave ``seconds``:
    ``caught_up``, ``replay_lag`` or ``last_reply``."""

    name: str
    state: str
    seconds: float
    behind_bytes: int | None
    source: str


# Physical standbys only: base backups and logical-decoding walsenders are not replicas that
# serve reads. clock_timestamp(), not now(): now() is frozen at the transaction's start.
_PG_STANDBYS = text("""
SELECT r.application_name AS name,
       r.state AS state,
       extract(epoch FROM r.replay_lag)::float8 AS replay_lag,
       pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn)::float8 AS behind_bytes,
       extract(epoch FROM clock_timestamp() - coalesce(r.reply_time, r.backend_start))::float8
           AS silent_for
FROM pg_stat_replication AS r
WHERE r.state IS DISTINCT FROM 'backup'
  AND NOT EXISTS (SELECT 1 FROM pg_replication_slots AS s
                  WHERE s.active_pid = r.pid AND s.slot_type = 'logical')
ORDER BY r.application_name, r.pid
""")


def standby_lags(conn: Connection) -> list[StandbyLag]:
    """Every connected physical standby of the PostgreSQL primary *conn* is on."""
    if conn.dialect.name != "postgresql":
        raise ReplicaLagUnreadable(
            f"replica lag is read on a PostgreSQL primary, not on {conn.dialect.name}")
    if conn.execute(text("SELECT pg_is_in_recovery()")).scalar_one():
        raise ReplicaLagUnreadable(
            "this server is a standby: point statesweep at the primary to read replica lag")
    lags: list[StandbyLag] = []
    for row in conn.execute(_PG_STANDBYS).mappings():
        if row["state"] is None:
            user = conn.execute(text("SELECT current_user")).scalar_one()
            raise ReplicaLagUnreadable(
                f"role {user!r} cannot read pg_stat_replication; run "
                f'GRANT pg_monitor TO "{user}" on the primary')
        lags.append(lag_of_row(row))
    return lags


def lag_of_row(row: Mapping[Any, Any]) -> StandbyLag:
    """The rules of the module docstring applied to one row of the standby query."""
    behind = row["behind_bytes"]
    name, state = row["name"] or "", row["state"]
    if behind is not None and behind <= 0:
        return StandbyLag(name, state, 0.0, 0, "caught_up")
    behind_bytes = None if behind is None else int(behind)
    if row["replay_lag"] is not None:
        return StandbyLag(name, state, float(row["replay_lag"]), behind_bytes, "replay_lag")
    return StandbyLag(name, state, max(0.0, float(row["silent_for"])), behind_bytes,
                      "last_reply")


def replica_lag_seconds(conn: Connection, *, settle_seconds: float = 1.0) -> float | None:
    """The worst standby's lag in seconds, or None when the primary has no standby.

    A reading taken just after a commit on a quiet primary often lands before the standby's
    first reply to that WAL, where the only figure is the age of the last reply (up to a whole
    status interval, though the standby is milliseconds behind). So while any standby reads by
    ``last_reply``, this reads again every 50 ms for up to *settle_seconds*; a healthy standby
    answers within that and is read by its replay_lag, a silent one keeps its growing age.
    """
    deadline = time.monotonic() + settle_seconds
    lags = standby_lags(conn)
    while any(lag.source == "last_reply" for lag in lags) and time.monotonic() < deadline:
        time.sleep(0.05)
        lags = standby_lags(conn)
    return max(lag.seconds for lag in lags) if lags else None


def lag_over_limit(lag: float | None, limit: float) -> bool:
    """Whether a reading holds the run: None (no standby) never does, ``inf`` (replication
    stopped) always does; a reading equal to the limit does not."""
    return lag is not None and lag > limit


def mysql_replica_lag_seconds(replica_conn: Connection) -> float:
    """``Seconds_Behind_Source`` of the MySQL/MariaDB replica *replica_conn* is on; ``inf``
    when replication is stopped (NULL). Several sources (multi-source) give the worst one."""
    rows = _replica_status(replica_conn)
    if not rows:
        raise ReplicaLagUnreadable(
            "this server is not a replica (SHOW REPLICA STATUS is empty): "
            "STATESWEEP_REPLICA_URLS must name replicas, not the primary")
    worst = 0.0
    for row in rows:
        value = row.get("Seconds_Behind_Source", row.get("Seconds_Behind_Master"))
        worst = max(worst, math.inf if value is None else float(value))
    return worst


def _replica_status(conn: Connection) -> list[dict[str, Any]]:
    # SHOW REPLICA STATUS first (the current name); older servers only know SHOW SLAVE STATUS.
    # MariaDB's SHOW ALL SLAVES STATUS would cover multi-source too, but only one source is
    # needed for a plain replica and both statements exist on every supported version.
    for statement in ("SHOW REPLICA STATUS", "SHOW SLAVE STATUS"):
        try:
            return [dict(r) for r in conn.execute(text(statement)).mappings()]
        except DBAPIError as exc:
            if _is_access_denied(exc):
                raise ReplicaLagUnreadable(
                    "the replica refused SHOW REPLICA STATUS: grant the reading user "
                    "REPLICATION CLIENT (MariaDB: REPLICA MONITOR)") from None
            last = exc
    raise ReplicaLagUnreadable(f"cannot read replica status: {last.orig}") from None


def _is_access_denied(exc: DBAPIError) -> bool:
    code = getattr(exc.orig, "args", [None])[0]
    return code in (1227, 1045, 1142)  # ER_SPECIFIC_ACCESS_DENIED_ERROR, ACCESS_DENIED, ...
