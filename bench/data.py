"""The benchmark's data: an Airflow-shaped task_state built once in a template database, and
a byte-for-byte clone of it made fresh before each method, so every method starts from the same
rows, indexes, statistics, visibility map and free space; and the end state each must reach.

The shape is workers.seed's (ids ascend with write time; by default 55% expired, 10% never
expire, the rest expire within 30 days; ``--expired-percent`` picks another mix, see bench.names)
plus a refresh: a slice of old, expired rows was written again and now expires in a week, so
"old id" does not mean "expired" and every DELETE must re-check.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from workers.db import make_engine
from workers.schema import Tables, upgrade
from workers.seed import SeedSpec, seed


@dataclass(frozen=True)
class EndState:
    """Survivors of a cleanup, compared by count and by a checksum of their ids."""

    rows: int
    id_sum: int


@dataclass(frozen=True)
class Dataset:
    rows: int
    expired: int
    never: int
    refreshed: int
    survivors: EndState
    build_seconds: float


def autocommit(url: str) -> Engine:
    return make_engine(url, isolation_level="AUTOCOMMIT")


def database_url(admin_url: str, name: str) -> str:
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _drop(admin: Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


WARM_ROWS = 2000


@contextmanager
def scratch_databases(admin_url: str, name: str, *, keep: bool = False) -> Iterator[str]:
    """New, empty template databases ``<name>_template`` (the data) and ``<name>_warm`` (a
    small copy to warm workers up on); they and the clone ``<name>`` are dropped afterwards
    (unless *keep*). Yields the template's URL."""
    admin = autocommit(admin_url)
    names = (name, f"{name}_template", f"{name}_warm")
    for db in names:
        _drop(admin, db)
    with admin.connect() as conn:
        for db in names[1:]:
            conn.execute(text(f'CREATE DATABASE "{db}" TEMPLATE template0'))
    try:
        yield database_url(admin_url, names[1])
    finally:
        if not keep:
            for db in names:
                _drop(admin, db)
        admin.dispose()


def recreate(admin_url: str, name: str) -> str:
    """``<name>`` dropped (its sessions ended) and created empty; returns its URL."""
    admin = autocommit(admin_url)
    try:
        _drop(admin, name)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE template0'))
    finally:
        admin.dispose()
    return database_url(admin_url, name)


def clone(admin_url: str, name: str, source: str = "template") -> tuple[str, float]:
    """Recreate ``<name>`` as a file copy of ``<name>_<source>``; returns (url, seconds).
    FILE_COPY copies the data files as they are (after a checkpoint) instead of WAL-logging
    every block, which is what makes a multi-gigabyte reload take seconds. Sessions still on
    ``<name>`` are ended; pooled connections of running workers reconnect (pre-ping)."""
    t0 = time.perf_counter()
    admin = autocommit(admin_url)
    try:
        _drop(admin, name)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{name}_{source}" '
                              "STRATEGY FILE_COPY"))
    finally:
        admin.dispose()
    return database_url(admin_url, name), time.perf_counter() - t0


def build(url: str, tables: Tables, spec: SeedSpec, now: dt.datetime) -> Dataset:
    """Create the schema, seed *spec*, refresh a slice of old ones, VACUUM ANALYZE."""
    t0 = time.perf_counter()
    engine = make_engine(url)
    ts = tables.task_state.name
    try:
        upgrade(engine, tables.naming)
        counts = seed(engine, tables, spec, now)
        # The default mix keeps its rule (id % 10 = 3: results compare with earlier runs);
        # other mixes have one expired row per period at most, so pick every tenth period.
        step = 1 if spec == SeedSpec(rows=spec.rows) else spec.period
        rows = spec.rows
        with engine.begin() as conn:
            # Rows in the oldest half so picked that had expired were written again: about a
            # tenth of the old expired rows now survive among the ranges the cleanup covers.
            refreshed = conn.execute(text(f"""
                UPDATE {ts} SET expires_at = :now + interval '7 days', updated_at = :now
                WHERE id <= :half AND (id / :step) % 10 = 3 AND expires_at < :now
            """), {"now": now, "half": rows // 2, "step": step}).rowcount  # noqa: S608
        with engine.connect() as conn:
            survivors = conn.execute(text(f"""
                SELECT count(*), coalesce(sum(id), 0) FROM {ts}
                WHERE expires_at IS NULL OR expires_at >= now()
            """)).one()  # noqa: S608
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"VACUUM ANALYZE {ts}"))
    finally:
        engine.dispose()
    return Dataset(rows, counts.expired - int(refreshed), counts.never, int(refreshed),
                   EndState(int(survivors[0]), int(survivors[1])), time.perf_counter() - t0)


def add_run_state(url: str) -> int:
    """Give dag_run Airflow's ``state`` column and its partial indexes on the queued and running
    states, every run finished ('success'), so workers see
    dag run state (workers.schema reads the live columns) and each chunk's DELETE carries the
    protection check. With no run queued or running the check keeps nothing: every expired row
    pays it and the end state is unchanged, so protected and unprotected runs do the same work.
    Returns the dag runs marked."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE dag_run ADD COLUMN state VARCHAR(50)"))
            marked = conn.execute(text("UPDATE dag_run SET state = 'success'")).rowcount
            # Airflow's own partial indexes on the unfinished states (3.3.2's schema has both):
            # the protection check finds the few unfinished runs through them.
            for state in ("queued", "running"):
                conn.execute(text(f"CREATE INDEX idx_dag_run_{state}_dags ON dag_run "
                                  f"(state, dag_id) WHERE state = '{state}'"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE dag_run"))
    finally:
        engine.dispose()
    return int(marked)


def end_state(url: str, tables: Tables) -> tuple[EndState, int]:
    """(survivors, rows still expired) of the live table."""
    ts = tables.task_state.name
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            n, s = conn.execute(text(
                f"SELECT count(*), coalesce(sum(id), 0) FROM {ts}")).one()  # noqa: S608
            left = conn.execute(text(
                f"SELECT count(*) FROM {ts} WHERE expires_at < now()")).scalar_one()  # noqa: S608
    finally:
        engine.dispose()
    return EndState(int(n), int(s)), int(left)


def writer_keys(url: str, limit: int = 2000) -> list[tuple[str, str, str, int, str]]:
    """(dag_id, run_id, task_id, map_index, key) of recent rows that expire in the future: what
    a writer rewrites. Rewriting them keeps them alive, so the end state does not move."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            top = conn.execute(text("SELECT max(id) FROM task_state")).scalar_one()
            rows = conn.execute(text("""
                SELECT dag_id, run_id, task_id, map_index, key FROM task_state
                WHERE id > :recent AND expires_at > now() + interval '12 hours'
                ORDER BY id DESC LIMIT :limit
            """), {"recent": int(top * 0.9), "limit": limit}).all()
    finally:
        engine.dispose()
    return [(str(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4])) for r in rows]
