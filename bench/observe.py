"""Watching a method while it runs: the longest open transaction per client (pg_stat_activity
sampled at 10 Hz), the CPU time of each part (psutil), and a process's resident memory, each
in a background thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import psutil
from sqlalchemy import text

from bench.data import autocommit

# One row per session on the bench database other than the sampler's own; ms and query are
# those of its open transaction, if it has one.
_SESSIONS = text("""
    SELECT application_name, pid, xact_start,
           extract(epoch FROM clock_timestamp() - xact_start) * 1000 AS ms, left(query, 80),
           wait_event_type = 'Lock' AS waiting
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
""")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


class _Sampler:
    interval = 0.1

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Longest:
    ms: float = 0.0
    query: str = ""
    transactions: int = 0
    #: samples that caught this client in a transaction, and those waiting on a lock
    samples: int = 0
    lock_waits: int = 0


class CpuAccount:
    """CPU seconds (user + system) each labelled group of processes used within a time window;
    processes may join late (a new backend) or leave early. Also the whole machine's."""

    MACHINE = "machine (every process, other helpers' too)"

    def __init__(self) -> None:
        self._history: dict[int, list[tuple[float, float]]] = {}
        self._label: dict[int, str] = {-1: self.MACHINE}

    def _record(self, pid: int, used: float) -> None:
        self._history.setdefault(pid, []).append((time.time(), used))

    def see(self, label: str, pid: int) -> None:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return
        self._label[pid] = label
        self._record(pid, t.user + t.system)

    def see_machine(self) -> None:
        t = psutil.cpu_times()
        self._record(-1, sum(t) - t.idle - t.iowait - t.guest - t.guest_nice)

    def seconds(self, start: float, end: float) -> dict[str, float]:
        """Per label, CPU used between wall times *start* and *end* (to the nearest sample)."""
        out: dict[str, float] = {}
        for pid, points in self._history.items():
            inside = [used for when, used in points if when <= end]
            before = [used for when, used in points if when <= start]
            if not inside:
                continue
            first = before[-1] if before else inside[0]
            label = self._label[pid]
            out[label] = out.get(label, 0.0) + inside[-1] - first
        return {k: round(v, 2) for k, v in sorted(out.items())}


class TransactionSampler(_Sampler):
    """Longest transaction seen per application_name (a lower bound: sampling misses up to
    one interval of a transaction's life, and transactions shorter than it may go unseen),
    and the CPU time of the bench database's backends and of the given client processes
    (their children included), per label."""

    def __init__(self, url: str, clients: list[tuple[str, int]] | None = None) -> None:
        super().__init__()
        self.engine = autocommit(url)
        self.by_app: dict[str, Longest] = {}
        self.cpu = CpuAccount()
        self.clients = clients or []
        self._seen: set[tuple[int, Any]] = set()
        self._ticks = 0
        self.sample(account=True)

    def sample(self, account: bool = False) -> None:
        # CPU is read every 4th tick (0.4 s): the sampler competes for the same two cores as
        # what it measures, so it keeps its own cost low.
        self._ticks += 1
        account = account or self._ticks % 4 == 0
        if account:
            self.cpu.see_machine()
            for label, pid in self.clients:
                self.cpu.see(label, pid)
                try:
                    children = psutil.Process(pid).children(recursive=True)
                except psutil.Error:
                    children = []
                for child in children:
                    self.cpu.see(label, child.pid)
        with self.engine.connect() as conn:
            rows = conn.execute(_SESSIONS).all()
        for app, pid, started, ms, query, waiting in rows:
            if account:
                self.cpu.see(f"postgres backends of {app or '?'}", pid)
            if started is None:
                continue
            longest = self.by_app.setdefault(app or "?", Longest())
            longest.samples += 1
            longest.lock_waits += bool(waiting)
            if (pid, started) not in self._seen:
                self._seen.add((pid, started))
                longest.transactions += 1
            if float(ms) > longest.ms:
                longest.ms, longest.query = float(ms), " ".join(str(query).split())

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        super().__exit__(et, e, tb)
        self.sample(account=True)
        self.engine.dispose()


@dataclass
class RssSampler(_Sampler):
    """Peak resident set size of one process (MiB), sampled at 10 Hz."""

    pid: int
    baseline_mib: float = 0.0
    peak_mib: float = 0.0
    samples: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()
        self.process = psutil.Process(self.pid)
        self.baseline_mib = self._rss()

    def _rss(self) -> float:
        return float(self.process.memory_info().rss) / 2**20

    def sample(self) -> None:
        try:
            mib = self._rss()
        except psutil.NoSuchProcess:
            return
        self.samples.append(mib)
        self.peak_mib = max(self.peak_mib, mib)


def postgres_cpu_seconds() -> float:
    """CPU seconds (user + system) the whole PostgreSQL server on this machine has used: the
    postmaster, its live children (backends, autovacuum, walwriter, checkpointer …) and, through
    the postmaster's cutime/cstime, every child that has exited and been reaped. Exact over a
    window as a difference of two readings, a backend that ends inside the window included (the
    upstream loop's does); 0.0 if no local postmaster is found."""
    postmaster = next((p for p in psutil.process_iter(["name", "ppid"])
                       if p.info["name"] == "postgres"
                       and psutil.Process(p.info["ppid"]).name() != "postgres"), None)
    if postmaster is None:
        return 0.0
    t = postmaster.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in postmaster.children():
        try:
            c = child.cpu_times()
        except psutil.Error:
            continue
        total += c.user + c.system
    return float(total)
