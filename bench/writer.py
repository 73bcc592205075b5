"""A state writer running beside each method: upserts existing keys at a fixed rate through
workers.store.MetastoreStateBackend.set, as Airflow tasks do, and records each call's latency.

It runs in its own process (spawned, so it shares no engine with the parent) and appends
``<wall time> <latency ms>`` lines to a file; the parent cuts that file into windows (idle,
during each method). It is paused while the table is reloaded, which takes an exclusive lock.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from pathlib import Path

Key = tuple[str, str, str, int, str]


def _write_loop(url: str, keys: list[Key], rate: float, path: str, paused: Event,
                stop: Event) -> None:
    from workers.db import make_engine
    from workers.schema import build_tables
    from workers.settings import Settings
    from workers.store import MetastoreStateBackend, TaskScope

    engine = make_engine(url, connect_args={"application_name": "bench_writer"})
    backend = MetastoreStateBackend(Settings(database_url=url), engine, build_tables("seed"))
    rng = random.Random(6)
    interval = 1.0 / rate
    with open(path, "a", buffering=1) as out:
        next_at = time.monotonic()
        n = 0
        while not stop.is_set():
            if paused.is_set():
                time.sleep(0.05)
                next_at = time.monotonic()
                continue
            dag_id, run_id, task_id, map_index, key = rng.choice(keys)
            t0 = time.perf_counter()
            backend.set(TaskScope(dag_id, run_id, task_id, map_index), key, f"w{n}")
            ms = (time.perf_counter() - t0) * 1000
            out.write(f"{time.time():.4f} {ms:.3f}\n")
            n += 1
            # A fixed schedule: a slow call delays the next one but is not made up with a burst.
            next_at = max(next_at + interval, time.monotonic())
            time.sleep(max(0.0, next_at - time.monotonic()))
    engine.dispose()


@dataclass
class Writer:
    process: mp.process.BaseProcess
    path: Path
    paused: Event
    stop_event: Event

    def pause(self) -> None:
        self.paused.set()
        time.sleep(0.3)  # let an in-flight upsert finish before the table is locked

    def resume(self) -> None:
        self.paused.clear()

    def stop(self) -> None:
        self.stop_event.set()
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)

    def latencies(self, start: float, end: float) -> list[float]:
        """Latencies (ms) of upserts that started between wall times *start* and *end*."""
        out: list[float] = []
        for line in self.path.read_text().splitlines():
            wall, ms = line.split()
            begun = float(wall) - float(ms) / 1000
            if start <= begun <= end:
                out.append(float(ms))
        return out


def start_writer(url: str, keys: list[Key], rate: float, path: Path) -> Writer:
    if not keys:
        raise ValueError("the writer needs at least one existing key to rewrite")
    ctx = mp.get_context("spawn")
    paused, stop = ctx.Event(), ctx.Event()
    paused.set()
    path.write_text("")
    proc = ctx.Process(target=_write_loop, args=(url, keys, rate, str(path), paused, stop),
                       name="bench-writer", daemon=True)
    proc.start()
    return Writer(proc, path, paused, stop)
