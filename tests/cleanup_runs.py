"""Helpers for tests that drive cleanup runs as plain functions: a run store per test (real Redis
or an in-process fakeredis), a dispatch that collects chunk messages instead of publishing them,
a delivery loop that runs them as workers would, and row helpers that compare whole id sets."""

from __future__ import annotations

import datetime as dt
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import redis
from sqlalchemy import Engine, insert, select

from workers import chunk
from workers.planners import ChunkRange, Plan
from workers.runs import Gate, RunStore, Window
from workers.schema import Tables
from workers.settings import Settings

CUTOFF_TEXT = "2026-01-01T00:00:00+00:00"
WRITTEN = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


def another_connection(store: RunStore) -> RunStore:
    """The same store through a connection of its own, as another process has (memory:// is one
    process: its callers share the in-process server)."""
    if isinstance(store.client, fakeredis.FakeRedis):
        return store
    return RunStore(redis.Redis(connection_pool=redis.ConnectionPool(
        **store.client.connection_pool.connection_kwargs)), store.prefix)


def memory_store(prefix: str = "sw") -> RunStore:
    """The memory:// run store (the same Lua steps on fakeredis), on a server of its own."""
    return RunStore(fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True),
                    prefix)


@dataclass(frozen=True)
class Message:
    run_id: str
    number: int
    range: ChunkRange
    cutoff: str

    def args(self) -> chunk.ChunkArgs:
        r = self.range
        return chunk.check_chunk_args(self.run_id, self.number, r.kind, r.lo, r.hi, self.cutoff)


@dataclass
class Outbox:
    """A dispatch that queues each chunk message instead of publishing it."""

    queue: deque[Message] = field(default_factory=deque)
    sent: list[Message] = field(default_factory=list)

    def __call__(self, run_id: str, number: int, rng: ChunkRange, cutoff: str) -> None:
        m = Message(run_id, number, rng, cutoff)
        self.queue.append(m)
        self.sent.append(m)

    def take(self) -> list[Message]:
        out = list(self.queue)
        self.queue.clear()
        return out


def deliver(settings: Settings, engine: Engine, tables: Tables, store: RunStore,
            outbox: Outbox) -> list[chunk.ChunkResult]:
    """Run queued chunk messages (and those they send) until none is left, as one worker."""
    results = []
    while outbox.queue:
        m = outbox.queue.popleft()
        results.append(chunk.run_chunk(settings, engine, tables, store, outbox, m.args()))
    return results


def start_plan(store: RunStore, run_id: str, plan: Plan, *, window: int = 16,
               lock_ttl: int = 3600, resend_after: float = 3600.0, gate: Gate | None = None,
               cutoff: str = CUTOFF_TEXT) -> Window:
    """Take the lock and start *plan* as run *run_id*, as coordinate() does."""
    assert store.acquire(run_id, 60) is None
    started = store.start(run_id, plan, cutoff=cutoff, batch_size=10, source="test",
                          window=window, lock_ttl=lock_ttl, resend_after=resend_after,
                          gate=gate or Gate())
    assert isinstance(started, Window), started
    return started


def id_plan(chunks: int, size: int = 10) -> Plan:
    """An ids plan of *chunks* chunks of *size* ids from id 1."""
    return Plan("ids", "ids", 1, 1 + chunks * size, size, chunks * size, "test plan")


# --- rows ---------------------------------------------------------------------------------------


def add_rows(engine: Engine, tables: Tables, expiries: Iterable[dt.datetime | None],
             *, tag: str = "k", dag_run_id: int = 1) -> list[int]:
    """Insert one task_state row per expiry (keys <tag>0, <tag>1, …); returns their ids."""
    t = tables.task_state
    rows = [{"dag_run_id": dag_run_id, "task_id": "t", "map_index": -1, "key": f"{tag}{i}",
             "dag_id": "d", "run_id": "r", "value": f"{tag}{i}", "updated_at": WRITTEN,
             "expires_at": e} for i, e in enumerate(expiries)]
    if not rows:
        return []
    with engine.begin() as conn:
        conn.execute(insert(t), rows)
        return list(conn.execute(select(t.c.id).where(t.c.key.like(f"{tag}%"))
                                 .order_by(t.c.id)).scalars())


def add_dag_run(engine: Engine, tables: Tables, dag_run_id: int = 1) -> None:
    with engine.begin() as conn:
        conn.execute(insert(tables.dag_run), [{"id": dag_run_id, "dag_id": "d", "run_id": "r"}])


def ids_by_expiry(engine: Engine, tables: Tables) -> dict[int, dt.datetime | None]:
    t = tables.task_state
    with engine.connect() as conn:
        return {int(r.id): r.expires_at for r in conn.execute(select(t.c.id, t.c.expires_at))}


def surviving_ids(engine: Engine, tables: Tables) -> set[int]:
    return set(ids_by_expiry(engine, tables))


def expired_at(rows: dict[int, Any], cutoff: dt.datetime) -> set[int]:
    """Ids whose expiry is strictly before *cutoff* (naive datetimes are UTC)."""
    def utc(e: dt.datetime) -> dt.datetime:
        return e if e.tzinfo else e.replace(tzinfo=dt.UTC)
    return {i for i, e in rows.items() if e is not None and utc(e) < cutoff}
