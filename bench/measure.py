"""One method measured on a fresh clone of the template, with a writer beside it: its rows/s,
transactions, CPU, coordinator memory, the writer's latency, and the end state it reached."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench import data, names
from bench.methods import MethodResult, run_single, run_sql_chunks, run_upstream
from bench.names import Method
from bench.observe import TransactionSampler, percentile, postgres_cpu_seconds
from bench.sweep import SWEEP_APPS, Fleet, worker_env
from bench.worker_logs import forget_redis_keys
from bench.writer import Key, Writer, start_writer
from workers.schema import build_tables

RESULTS = Path(__file__).resolve().parent / "results"


def add_service_args(p: argparse.ArgumentParser, database: str) -> None:
    """--pg-url, --redis-url, --database (scratch, default *database*) and --out: the options
    every bench command shares."""
    p.add_argument("--pg-url", default=os.environ.get(
        "STATESWEEP_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="an existing database on the server; the bench creates its own beside it")
    p.add_argument("--redis-url", default=os.environ.get(
        "STATESWEEP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--database", default=database, help="scratch database name")
    p.add_argument("--out", type=Path, default=RESULTS)


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def writer_stats(latencies: list[float], seconds: float) -> dict[str, Any]:
    return {"n": len(latencies), "rate": round(len(latencies) / seconds, 1) if seconds else 0,
            "p50_ms": round(percentile(latencies, 50), 2),
            "p99_ms": round(percentile(latencies, 99), 2),
            "max_ms": round(max(latencies, default=0.0), 2)}


def idle_window(writer: Writer, seconds: float, timeout: float = 60) -> list[float]:
    """Writer latencies over *seconds* with nothing else running, once the writer is writing."""
    writer.resume()
    deadline = time.monotonic() + timeout
    while not writer.path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    t0 = time.time()
    time.sleep(seconds)
    return writer.latencies(t0, time.time())


def machine_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (busy time, all cores)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - t.iowait - t.guest - t.guest_nice)


def tag_of(name: str) -> str:
    """A method's name as it may appear in Redis keys, queue names and file names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def run_baseline(name: str, args: argparse.Namespace, url: str) -> MethodResult:
    if name == "single":
        return run_single(url, build_tables("seed"))
    if name == "upstream":
        return run_upstream(url, build_tables("seed"), args.batch)
    threads = names.sql_chunk_threads(name)
    if threads:
        return run_sql_chunks(url, build_tables("seed"), args.batch, threads)
    raise ValueError(name)


def warm_fleet(args: argparse.Namespace, method: Method, env: dict[str, str],
               tmp: Path) -> tuple[Fleet, dict[str, Any]]:
    """A statesweep method's workers, started and warmed up. Workers are long-lived in
    production: warm them up (engine, tables, broker connections) with a run on a small copy
    of ``<database>``; the caller swaps the real data in under them and reconnects them."""
    tag = tag_of(method.name)
    data.clone(args.pg_url, args.database, "warm")
    fleet = Fleet.start(env, tmp, tag, method.workers, method.pool)
    try:
        warm = fleet.run(f"{tag}_warmup", data.WARM_ROWS // 20, args.timeout)
    except BaseException:
        fleet.stop()
        raise
    return fleet, {"warmup_chunks": warm.detail["chunks_per_worker"],
                   "first_task_ms_max": warm.detail["task_ms_max"]}


def stop(args: argparse.Namespace, env: dict[str, str], fleet: Fleet | None,
         writer: Writer | None) -> None:
    """Stop what a method started and forget its Redis keys."""
    if fleet is not None:
        fleet.stop()
        forget_redis_keys(args.redis_url, env)
    if writer is not None:
        writer.stop()


def measure(args: argparse.Namespace, method: Method, keys: list[Key], tmp: Path,
            dataset: data.Dataset) -> tuple[dict[str, Any], list[float]]:
    """One method on a fresh clone of the template, with a writer beside it."""
    name, tag = method.name, tag_of(method.name)
    tables = build_tables("seed")
    url = data.database_url(args.pg_url, args.database)
    env = worker_env(url, args.redis_url, f"{tmp.name}-{tag}", args.batch,
                     args.chunk_rate_limit, method.env())
    fleet = writer = None
    cold: dict[str, Any] = {}
    try:
        if method.is_sweep:
            fleet, cold = warm_fleet(args, method, env, tmp)
        progress(f"{name}: cloning the template database")
        url, clone_s = data.clone(args.pg_url, args.database)
        if fleet is not None:
            cold["still_cold_after_clone"] = fleet.reconnect()
        writer = start_writer(url, keys, args.writer_rate, tmp / f"writer-{tag}.txt")
        idle = idle_window(writer, 3 if args.quick else 8)
        load_at_start = load()
        progress(f"{name}: running (load {load_at_start})")
        clients = [("bench client (this process)", os.getpid()),
                   ("writer", writer.process.pid or 0)]
        with TransactionSampler(url, clients + (fleet.processes() if fleet else [])) as sampler:
            # Read at the method's edges, not from the sampler's 0.4 s ticks: a 2 s DELETE
            # would be off by a fifth.
            cpu_before, pg_before = machine_cpu_seconds(), postgres_cpu_seconds()
            if fleet is not None:
                spy = tmp if args.py_spy and name == "statesweep_1w" else None
                result = fleet.run(tag, args.batch, args.timeout, profile_dir=spy)
            else:
                result = run_baseline(name, args, url)
            machine = machine_cpu_seconds() - cpu_before
            postgres = postgres_cpu_seconds() - pg_before
        lat = writer.latencies(result.started_wall, result.ended_wall)
    finally:
        stop(args, env, fleet, writer)
    state, left = data.end_state(url, tables)
    verified = state == dataset.survivors and left == 0
    apps = SWEEP_APPS if fleet is not None else (f"bench_{name}",)
    sampled = max((sampler.by_app[a].ms for a in apps if a in sampler.by_app), default=0.0)
    cpu = sampler.cpu.seconds(result.started_wall, result.ended_wall)
    progress(f"{name}: {result.rows:,} rows in {result.seconds:.1f} s "
             f"({result.rows_per_second:,.0f}/s), end state {'ok' if verified else 'WRONG'}")
    return {
        "name": name, "workers": method.workers, "planner_setting": method.planner,
        "throttle": list(method.throttle) if method.throttle else None,
        "rows": result.rows, "seconds": round(result.seconds, 3),
        "rows_per_second": round(result.rows_per_second, 1),
        "longest_txn_ms": round(result.longest_txn_ms, 1),
        "longest_txn_source": result.longest_txn_source,
        "sampled_longest_ms": round(sampled, 1),
        "sampled": {a: vars(v) for a, v in sampler.by_app.items()},
        "cpu_seconds": cpu, "machine_cpu_seconds": round(machine, 2),
        # Every PostgreSQL process (autovacuum, walwriter, … and the writer's backend too).
        "postgres_cpu_seconds": round(postgres, 2),
        # Every process on the machine over the method's window, per million rows deleted: the
        # figure that carries to a bigger machine (other helpers' load included, say so).
        "cpu_s_per_million": round(machine / result.rows * 1e6, 2) if result.rows else None,
        "txn_ms_p50": round(percentile(result.txn_ms, 50), 1),
        "txn_ms_p99": round(percentile(result.txn_ms, 99), 1),
        "detail": {**result.detail, **cold}, "writer": writer_stats(lat, result.seconds),
        "verified": verified, "end_state": vars(state), "expired_left": left,
        "clone_seconds": round(clone_s, 1), "load_at_start": load_at_start,
    }, idle
