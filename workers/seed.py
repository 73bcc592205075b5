"""Airflow-shaped sample data for the demo, the tests and the benchmarks.

Rows are written in id order with write time, as a real state store fills: a mix of expired,
future and never-expiring task state, plus asset state of active and inactive assets. The mix
is deterministic in the row number, so a test can say exactly which rows must survive.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Engine, func, insert, select, text

from workers.schema import LEGACY_REGION, Tables

ROWS_PER_RUN = 100
DAGS = 50
# Table names below come from schema.build_tables, never from input.
_SETVAL = ("SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
           "(SELECT coalesce(max(id), 1) FROM {table}))")


@dataclass(frozen=True)
class SeedSpec:
    rows: int = 100_000
    #: out of every `period` rows: this many expired, this many never expire; the rest expire
    #: in the future (period 100 can express 1% expired)
    expired_per_period: int = 11
    never_per_period: int = 2
    assets: int = 100
    keys_per_asset: int = 5
    #: every n-th asset is inactive (its state orphaned)
    inactive_every: int = 3
    period: int = 20
    #: row number of the first row: 0 for a fresh seed, the last id to add rows after it (the
    #: assets are seeded with the first rows only)
    first_row: int = 0


def kind_of(i: int, spec: SeedSpec) -> str:
    """'expired', 'never' or 'future' for the i-th row (0-based); the same rule the SQL uses."""
    m = i % spec.period
    if m < spec.expired_per_period:
        return "expired"
    if m < spec.expired_per_period + spec.never_per_period:
        return "never"
    return "future"


@dataclass(frozen=True)
class SeedCounts:
    expired: int
    never: int
    future: int
    asset_rows_live: int
    asset_rows_orphaned: int


def seed(engine: Engine, tables: Tables, spec: SeedSpec, now: dt.datetime,
         batch: int = 20_000) -> SeedCounts:
    """Insert *spec* relative to *now* (aware UTC). The tables must be empty, or, with
    ``spec.first_row``, hold rows up to that id (as a previous seed left them)."""
    first, end = spec.first_row, spec.first_row + spec.rows
    # Dag runs a previous seed made are there already: runs of rows before `first`.
    first_run = -(-first // ROWS_PER_RUN)
    runs = range(first_run, max(first_run + (first == 0), -(-end // ROWS_PER_RUN)))
    dr, ts = tables.dag_run, tables.task_state
    with engine.begin() as conn:
        if runs:
            conn.execute(insert(dr), [
                {"id": r + 1, "dag_id": f"dag_{r % DAGS}", "run_id": f"run_{r}"} for r in runs
            ])
    if engine.dialect.name == "postgresql" and spec.rows:
        _seed_task_state_pg(engine, tables, spec, now)
    else:
        for start in range(first, end, batch):
            rows = [{**_task_row(i, spec, now), **tables.scope_columns(-1, None)}
                    for i in range(start, min(end, start + batch))]
            with engine.begin() as conn:
                conn.execute(insert(ts), rows)
    live, orphaned = _seed_assets(engine, tables, spec, now) if first == 0 else (0, 0)

    kinds = [kind_of(i, spec) for i in range(spec.period)]

    def upto(n: int, k: str) -> int:  # rows of kind k among rows 0..n-1
        full, rest = divmod(n, spec.period)
        return full * kinds.count(k) + kinds[:rest].count(k)

    def count(k: str) -> int:
        return upto(end, k) - upto(first, k)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            # Reset sequences past the explicit ids so later writers do not collide.
            for name in (dr.name, ts.name):
                conn.execute(text(_SETVAL.format(table=name)))
            conn.execute(text(f"ANALYZE {ts.name}"))
    return SeedCounts(count("expired"), count("never"), count("future"), live, orphaned)


def _task_row(i: int, spec: SeedSpec, now: dt.datetime) -> dict[str, object]:
    r = i // ROWS_PER_RUN
    kind = kind_of(i, spec)
    if kind == "expired":
        expires: dt.datetime | None = now - dt.timedelta(minutes=1 + i % 1000)
    elif kind == "never":
        expires = None
    else:
        expires = now + dt.timedelta(days=1 + i % 30)
    return {
        "id": i + 1, "dag_run_id": r + 1, "task_id": f"task_{(i // 10) % 10}", "key": f"key_{i}",
        "dag_id": f"dag_{r % DAGS}", "run_id": f"run_{r}",
        "value": f"value_{i}", "updated_at": now - dt.timedelta(days=40), "expires_at": expires,
    }


def _seed_task_state_pg(engine: Engine, tables: Tables, spec: SeedSpec, now: dt.datetime) -> None:
    """The same rows as _task_row, generated on the server: millions of rows in seconds."""
    ts = tables.task_state.name
    e, n, period = spec.expired_per_period, spec.never_per_period, spec.period
    # 3.4's region: every seeded row is in the legacy (all-zero) one.
    index, region, zero = ((tables.index_column.name, "", "") if tables.layout == "3.3" else
                           (tables.index_column.name, "region_id, ", f"'{LEGACY_REGION}', "))
    # The table and column names come from build_tables and the counts are ints; values are
    # bound.
    sql = text(f"""
        INSERT INTO {ts} (id, dag_run_id, task_id, {region}{index}, key, dag_id, run_id, value,
                          updated_at, expires_at)
        SELECT i + 1, i / {ROWS_PER_RUN} + 1, 'task_' || ((i / 10) % 10), {zero}-1, 'key_' || i,
               'dag_' || ((i / {ROWS_PER_RUN}) % {DAGS}), 'run_' || (i / {ROWS_PER_RUN}),
               'value_' || i, :now - interval '40 days',
               CASE WHEN i % {period} < {e} THEN :now - (1 + i % 1000) * interval '1 minute'
                    WHEN i % {period} < {e + n} THEN NULL
                    ELSE :now + (1 + i % 30) * interval '1 day' END
        FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS i
    """)  # noqa: S608
    with engine.begin() as conn:
        conn.execute(sql, {"now": now, "first": spec.first_row,
                           "last": spec.first_row + spec.rows - 1})


def _seed_assets(engine: Engine, tables: Tables, spec: SeedSpec,
                 now: dt.datetime) -> tuple[int, int]:
    a, aa, s = tables.asset, tables.asset_active, tables.asset_state
    assets = [{"id": k + 1, "name": f"asset_{k}", "uri": f"s3://bucket/asset_{k}"}
              for k in range(spec.assets)]
    active = [{"name": x["name"], "uri": x["uri"]} for k, x in enumerate(assets)
              if k % spec.inactive_every != 0]
    state = [{"asset_id": x["id"], "key": f"k{j}", "value": f"v{j}", "updated_at": now}
             for x in assets for j in range(spec.keys_per_asset)]
    with engine.begin() as conn:
        if assets:
            conn.execute(insert(a), assets)
        if active:
            conn.execute(insert(aa), active)
        if state:
            conn.execute(insert(s), state)
        if engine.dialect.name == "postgresql" and assets:
            conn.execute(text(_SETVAL.format(table=a.name)))
    orphaned_assets = len(range(0, spec.assets, spec.inactive_every))
    orphaned = orphaned_assets * spec.keys_per_asset
    return len(state) - orphaned, orphaned


def task_state_rows(engine: Engine, tables: Tables) -> set[tuple[int, str]]:
    """Every task_state row as (id, value): what tests compare before and after a run."""
    t = tables.task_state
    with engine.connect() as conn:
        return {(int(r.id), str(r.value)) for r in conn.execute(select(t.c.id, t.c.value))}


def asset_state_rows(engine: Engine, tables: Tables) -> set[tuple[int, str]]:
    s = tables.asset_state
    with engine.connect() as conn:
        return {(int(r.asset_id), str(r.key)) for r in conn.execute(select(s.c.asset_id, s.c.key))}


def expected_survivors(spec: SeedSpec) -> set[tuple[int, str]]:
    """The (id, value) rows a correct cleanup leaves of a fresh seed."""
    return {(i + 1, f"value_{i}") for i in range(spec.rows) if kind_of(i, spec) != "expired"}


def expected_live_asset_state(spec: SeedSpec) -> set[tuple[int, str]]:
    return {(k + 1, f"k{j}") for k in range(spec.assets) if k % spec.inactive_every != 0
            for j in range(spec.keys_per_asset)}


def row_count(engine: Engine, tables: Tables) -> int:
    t = tables.task_state
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(t)).scalar_one())
