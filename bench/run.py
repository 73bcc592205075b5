"""``python -m bench.run``: every method on the same data in one run, with a writer beside it.

    python -m bench.run --rows 1000000            # make bench
    python -m bench.run --rows 100000 --quick     # make bench-quick
    python -m bench.run --rows 5000000            # the big run

The data is built once in a template database. For each method: start its worker processes
if it has any and warm them up on a small copy, clone the template afresh (same rows, same
physical state), start a writer, measure the writer idle, run the method to completion while
sampling pg_stat_activity, then check the end state (count and sum(id) of survivors).
Outputs go to bench/results/ as latest.{json,md,png} and rows_<N>[_batch_<B>].{json,md,png}.
Progress goes to stderr; the markdown table and the targets to stdout. Timing never makes the
exit code fail; a wrong end state does (exit 1), since then the numbers compare different work.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench import data, plan_experiment, profile, report
from bench.methods import MethodResult, run_single, run_upstream
from bench.observe import TransactionSampler, percentile
from bench.sweep import Fleet, forget_redis_keys, worker_env
from bench.writer import Key, Writer, start_writer
from workers.db import db_now, make_engine
from workers.schema import build_tables

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("single", "upstream", "statesweep_1w", "statesweep_2w")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="task_state rows to load")
    p.add_argument("--batch", type=int, default=10_000, help="rows per chunk / per loop step")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--writer-rate", type=float, default=200.0, help="writer upserts per second")
    p.add_argument("--chunk-rate-limit", default="",
                   help="STATESWEEP_CHUNK_RATE_LIMIT for the statesweep workers, e.g. 20/s")
    p.add_argument("--quick", action="store_true", help="shorter idle windows, for development")
    p.add_argument("--pg-url", default=os.environ.get(
        "STATESWEEP_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="an existing database on the server; the bench creates its own beside it")
    p.add_argument("--redis-url", default=os.environ.get(
        "STATESWEEP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--database", default="statesweep_bench", help="scratch database name")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per method")
    p.add_argument("--keep", action="store_true", help="keep the scratch databases")
    p.add_argument("--py-spy", action="store_true",
                   help="profile statesweep_1w's coordinator and chunk worker with py-spy")
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {', '.join(sorted(unknown))}; "
                f"choose from {', '.join(METHODS)}")
    if args.rows < 1000 or args.batch < 1 or args.writer_rate <= 0:
        p.error(f"--rows must be >= 1000 (got {args.rows}), --batch >= 1 (got {args.batch}), "
                f"--writer-rate > 0 (got {args.writer_rate})")
    return args


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def writer_stats(latencies: list[float], seconds: float) -> dict[str, Any]:
    return {"n": len(latencies), "rate": round(len(latencies) / seconds, 1) if seconds else 0,
            "p50_ms": round(percentile(latencies, 50), 2),
            "p99_ms": round(percentile(latencies, 99), 2),
            "max_ms": round(max(latencies, default=0.0), 2)}


def run_baseline(name: str, args: argparse.Namespace, url: str) -> MethodResult:
    if name == "single":
        return run_single(url, build_tables("seed"))
    if name == "upstream":
        return run_upstream(url, build_tables("seed"), args.batch)
    raise ValueError(name)


def idle_window(writer: Writer, seconds: float, timeout: float = 60) -> list[float]:
    """Writer latencies over *seconds* with nothing else running, once the writer is writing."""
    writer.resume()
    deadline = time.monotonic() + timeout
    while not writer.path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    t0 = time.time()
    time.sleep(seconds)
    return writer.latencies(t0, time.time())


def measure(args: argparse.Namespace, name: str, keys: list[Key], tmp: Path,
            dataset: data.Dataset) -> tuple[dict[str, Any], list[float]]:
    """One method on a fresh clone of the template, with a writer beside it."""
    tables = build_tables("seed")
    url = data.database_url(args.pg_url, args.database)
    env = worker_env(url, args.redis_url, f"{tmp.name}-{name}", args.batch,
                     args.chunk_rate_limit)
    fleet = writer = None
    cold: dict[str, Any] = {}
    try:
        if name.startswith("statesweep"):
            # Workers are long-lived in production: warm them up (engine, tables, broker
            # connections) with a run on a small copy, then swap the real data in under them.
            data.clone(args.pg_url, args.database, "warm")
            fleet = Fleet.start(env, tmp, name, int(name[-2]))
            warm = fleet.run(f"{name}_warmup", data.WARM_ROWS // 20, args.timeout)
            cold = {"warmup_chunks": warm.detail["chunks_per_worker"],
                    "first_task_ms_max": warm.detail["task_ms_max"]}
        progress(f"{name}: cloning the template database")
        url, clone_s = data.clone(args.pg_url, args.database)
        writer = start_writer(url, keys, args.writer_rate, tmp / f"writer-{name}.txt")
        idle = idle_window(writer, 3 if args.quick else 8)
        load_at_start = load()
        progress(f"{name}: running (load {load_at_start})")
        clients = [("bench client (this process)", os.getpid()),
                   ("writer", writer.process.pid or 0)]
        with TransactionSampler(url, clients + (fleet.processes() if fleet else [])) as sampler:
            if fleet is not None:
                spy = tmp if args.py_spy and name == "statesweep_1w" else None
                result = fleet.run(name, args.batch, args.timeout, profile_dir=spy)
            else:
                result = run_baseline(name, args, url)
        lat = writer.latencies(result.started_wall, result.ended_wall)
    finally:
        if fleet is not None:
            fleet.stop()
            forget_redis_keys(args.redis_url, env)
        if writer is not None:
            writer.stop()
    state, left = data.end_state(url, tables)
    verified = state == dataset.survivors and left == 0
    apps = report.SWEEP_APPS if fleet is not None else (f"bench_{name}",)
    sampled = max((sampler.by_app[a].ms for a in apps if a in sampler.by_app), default=0.0)
    progress(f"{name}: {result.rows:,} rows in {result.seconds:.1f} s "
             f"({result.rows_per_second:,.0f}/s), end state {'ok' if verified else 'WRONG'}")
    return {
        "name": name, "rows": result.rows, "seconds": round(result.seconds, 3),
        "rows_per_second": round(result.rows_per_second, 1),
        "longest_txn_ms": round(result.longest_txn_ms, 1),
        "longest_txn_source": result.longest_txn_source,
        "sampled_longest_ms": round(sampled, 1),
        "sampled": {a: vars(v) for a, v in sampler.by_app.items()},
        "cpu_seconds": sampler.cpu.seconds(result.started_wall, result.ended_wall),
        "txn_ms_p50": round(percentile(result.txn_ms, 50), 1),
        "txn_ms_p99": round(percentile(result.txn_ms, 99), 1),
        "detail": {**result.detail, **cold}, "writer": writer_stats(lat, result.seconds),
        "verified": verified, "end_state": vars(state), "expired_left": left,
        "clone_seconds": round(clone_s, 1), "load_at_start": load_at_start,
    }, idle


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    load_before = load()
    tmp = args.out / "tmp" / uuid.uuid4().hex[:8]
    tmp.mkdir(parents=True, exist_ok=True)
    tables = build_tables("seed")
    progress(f"rows {args.rows:,}, batch {args.batch}, load {load_before}, logs in {tmp}")
    methods: list[dict[str, Any]] = []
    idle: list[float] = []
    with data.scratch_databases(args.pg_url, args.database, keep=args.keep) as template:
        engine = make_engine(template)
        with engine.connect() as conn:
            now = db_now(conn)
            version = str(conn.exec_driver_sql("SHOW server_version").scalar_one())
        engine.dispose()
        dataset = data.build(template, tables, args.rows, now)
        data.build(data.database_url(args.pg_url, f"{args.database}_warm"), tables,
                   data.WARM_ROWS, now)
        keys = data.writer_keys(template)
        progress(f"built in {dataset.build_seconds:.1f} s: {dataset}")
        # Profiled on a clone: EXPLAIN ANALYZE of a DELETE, even rolled back, marks tuples.
        url, _ = data.clone(args.pg_url, args.database)
        prof: dict[str, Any] = {"explain": profile.explain_statements(url, tables, args.batch)}
        with TransactionSampler(url) as sampler:
            t0 = time.time()
            prof["planning"] = profile.time_planning(url, tables, args.batch)
        prof["planning"]["postgres_cpu_s"] = sampler.cpu.seconds(t0, time.time()).get(
            "postgres backends of bench_planning", 0.0)
        engine = make_engine(url)
        prof["planning_experiment"] = plan_experiment.compare(engine, tables, args.batch)
        engine.dispose()
        dry = profile.time_dry_run(url, tables, args.batch,
                                   worker_env(url, args.redis_url, tmp.name, args.batch))
        progress(f"profiled: planning {prof['planning']}, dry run {dry}")
        for name in args.methods.split(","):
            row, window = measure(args, name, keys, tmp, dataset)
            methods.append(row)
            idle += window
    by = {m["name"]: m for m in methods}
    for m in methods:
        for base in ("single", "upstream"):
            ref = by.get(base, {}).get("rows_per_second", 0)
            m[f"ratio_{base}"] = round(m["rows_per_second"] / ref, 3) if ref else 0.0
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))
    results: dict[str, Any] = {
        "meta": {"rows": args.rows, "batch": args.batch, "started": started.isoformat(
            timespec="seconds"), "load_before": load_before, "load_after": load(),
            "cpus": os.cpu_count(), "postgres": f"PostgreSQL {version}", "command": command,
            "writer_rate": args.writer_rate, "quick": args.quick},
        "dataset": {"rows": dataset.rows, "expired": dataset.expired, "never": dataset.never,
                    "refreshed": dataset.refreshed, "survivors_rows": dataset.survivors.rows,
                    "survivors_id_sum": dataset.survivors.id_sum,
                    "build_seconds": round(dataset.build_seconds, 1)},
        "writer_idle": writer_stats(idle, (3 if args.quick else 8) * len(methods)),
        "methods": methods, "dry_run": dry, "profile": prof,
    }
    results["targets"] = report.check_targets(results)
    sized = f"rows_{args.rows}" + ("" if args.batch == 10_000 else f"_batch_{args.batch}")
    for stem in (sized, "latest"):
        paths = report.write_outputs(results, args.out, stem)
    progress(f"wrote {', '.join(str(p) for p in paths)} and {sized}.*")
    print(report.markdown(results))
    return 0 if all(m["verified"] for m in methods) else 1


if __name__ == "__main__":
    sys.exit(main())
