"""Writers racing a cleanup run: threads that refresh expired keys through the real state-store
writer (MetastoreStateBackend.set), and the key -> value map a correct run must leave."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterable

from sqlalchemy import Engine, select, text

from workers.schema import Tables
from workers.seed import DAGS, ROWS_PER_RUN, SeedSpec, kind_of, seed
from workers.settings import Settings
from workers.store import MetastoreStateBackend, TaskScope

FRESH_RETENTION = dt.timedelta(days=1)


def scope_of(i: int) -> TaskScope:
    """The task scope of seed row *i* (workers.seed._task_row's rule)."""
    r = i // ROWS_PER_RUN
    return TaskScope(dag_id=f"dag_{r % DAGS}", run_id=f"run_{r}", task_id=f"task_{(i // 10) % 10}")


def expired_rows(spec: SeedSpec) -> list[int]:
    return [i for i in range(spec.rows) if kind_of(i, spec) == "expired"]


class Refreshers:
    """*threads* writers refreshing seed rows *rows* (new value, retention one day) as fast as
    they can; each refresh is timed, so a test can show how many overlapped the run."""

    def __init__(self, settings: Settings, engine: Engine, tables: Tables, rows: list[int],
                 threads: int = 2) -> None:
        self.backend = MetastoreStateBackend(settings, engine, tables)
        self.rows = rows
        self.done_at: list[float] = []
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._write, args=(rows[k::threads],),
                                          name=f"refresher-{k}") for k in range(threads)]

    def _write(self, rows: Iterable[int]) -> None:
        try:
            for i in rows:
                self.backend.set(scope_of(i), f"key_{i}", f"fresh_{i}", retention=FRESH_RETENTION)
                self.done_at.append(time.time())
        except BaseException as exc:  # surfaced by join(); a thread cannot fail the test
            self.errors.append(exc)

    def start(self) -> Refreshers:
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float = 60) -> None:
        for t in self._threads:
            t.join(timeout)
            assert not t.is_alive(), f"{t.name} still writing after {timeout}s"
        if self.errors:
            raise self.errors[0]

    def during(self, start: float, end: float) -> int:
        return sum(1 for t in self.done_at if start <= t <= end)

    def stale_reads(self) -> list[int]:
        """Refreshed rows whose get() does not return the new value (must be none)."""
        from concurrent.futures import ThreadPoolExecutor

        def stale(i: int) -> bool:
            return self.backend.get(scope_of(i), f"key_{i}") != f"fresh_{i}"

        with ThreadPoolExecutor(4) as pool:
            return [i for i, bad in zip(self.rows, pool.map(stale, self.rows), strict=True)
                    if bad]


def key_values(engine: Engine, tables: Tables) -> dict[str, str]:
    t = tables.task_state
    with engine.connect() as conn:
        return {str(r.key): str(r.value) for r in conn.execute(select(t.c.key, t.c.value))}


def expected_key_values(spec: SeedSpec, refreshed: Iterable[int]) -> dict[str, str]:
    """Live seed rows unchanged, refreshed rows with their new value, nothing else."""
    out = {f"key_{i}": f"value_{i}" for i in range(spec.rows) if kind_of(i, spec) != "expired"}
    out.update({f"key_{i}": f"fresh_{i}" for i in refreshed})
    return out


def reseed(engine: Engine, tables: Tables, spec: SeedSpec, now: dt.datetime) -> None:
    """Empty the state-store tables and seed *spec* again (one database, many examples)."""
    names = ", ".join(t.name for t in tables.metadata.sorted_tables)
    with engine.begin() as conn:
        # Names come from schema.build_tables, never from input.
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    seed(engine, tables, spec, now)
