"""``python -m bench.run``: every method on the same data in one run, with a writer beside it.

    python -m bench.run --rows 1000000            # make bench
    python -m bench.run --rows 100000 --quick     # make bench-quick
    python -m bench.run --rows 5000000            # the big run
    python -m bench.run --rows 5000000 --expired-percent 1     # auto against walk, sparse
    python -m bench.run --rows 5000000 --methods single,upstream --throttle 0.02:1 \
        --throttle 0.05:2                          # the throttle trade-off curve

The data is built once in a template database. For each method: start its worker processes
if it has any and warm them up on a small copy, clone the template afresh (same rows, same
physical state), start a writer, measure the writer idle, run the method to completion while
sampling pg_stat_activity, then check the end state (count and sum(id) of survivors).
Methods: single, upstream, statesweep_<n>w (planner auto), statesweep_<planner>_<n>w (blocks,
ids, walk, expiry forced), statesweep_throttled_<n>w (one per --throttle TARGET:WINDOW),
statesweep_unprotected_<n>w (STATESWEEP_PROTECT_UNFINISHED_DAG_RUNS=false: with --run-state,
which gives dag_run Airflow's state column, beside statesweep_<n>w it is the cost of protection),
statesweep_solo_<n>w (-P solo chunk workers), statesweep_noevents_<n>w
(STATESWEEP_CHUNK_TASK_EVENTS=false: what Flower's per-chunk task events cost).
Outputs go to bench/results/ as latest.{json,md,png} and
rows_<N>[_batch_<B>][_exp_<P>][_rate_<R>].{json,md,png}; `python -m bench.compare` puts
several side by side.
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

from bench import data, names, plan_experiment, profile, report
from bench.measure import add_service_args, load, measure, progress, writer_stats
from bench.observe import TransactionSampler
from bench.sweep import worker_env
from workers.db import db_now, make_engine
from workers.schema import build_tables
from workers.seed import SeedSpec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="task_state rows to load")
    p.add_argument("--batch", type=int, default=10_000, help="rows per chunk / per loop step")
    p.add_argument("--methods", default=",".join(names.DEFAULT_METHODS),
                   help="comma-separated; see above")
    p.add_argument("--expired-percent", type=float, choices=sorted(names.EXPIRED_MIXES),
                   help="share of rows expired (default: the seed's mix, 55%%)")
    p.add_argument("--throttle", action="append", default=[], metavar="TARGET:WINDOW",
                   help="a throttled method: STATESWEEP_TARGET_CHUNK_SECONDS:"
                        "STATESWEEP_MAX_CHUNKS_IN_FLIGHT, e.g. 0.05:2 (repeatable)")
    p.add_argument("--writer-rate", type=float, default=200.0, help="writer upserts per second")
    p.add_argument("--chunk-rate-limit", default="",
                   help="STATESWEEP_CHUNK_RATE_LIMIT for the statesweep workers, e.g. 20/s")
    p.add_argument("--quick", action="store_true", help="shorter idle windows, for development")
    p.add_argument("--run-state", action="store_true",
                   help="give dag_run Airflow's state column (every run finished), so chunks "
                        "check protection; compare statesweep_2w with statesweep_unprotected_2w")
    add_service_args(p, "statesweep_bench")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per method")
    p.add_argument("--keep", action="store_true", help="keep the scratch databases")
    p.add_argument("--py-spy", action="store_true",
                   help="profile statesweep_1w's coordinator and chunk worker with py-spy")
    args = p.parse_args(argv)
    try:
        args.method_list = names.parse_methods(
            [n for n in args.methods.split(",") if n], args.throttle)
    except ValueError as exc:
        p.error(str(exc))
    if args.rows < 1000 or args.batch < 1 or args.writer_rate <= 0:
        p.error(f"--rows must be >= 1000 (got {args.rows}), --batch >= 1 (got {args.batch}), "
                f"--writer-rate > 0 (got {args.writer_rate})")
    return args


def profile_planners(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], Any]:
    """The planners timed and explained, and the dry run, on a clone of the template."""
    tables = build_tables("seed")
    url, _ = data.clone(args.pg_url, args.database)
    prof: dict[str, Any] = {"explain": profile.explain_statements(url, tables, args.batch)}
    with TransactionSampler(url) as sampler:
        t0 = time.time()
        prof["planning"] = profile.time_planning(url, tables, args.batch)
    prof["planning_postgres_cpu_s"] = sampler.cpu.seconds(t0, time.time()).get(
        "postgres backends of bench_planning", 0.0)
    engine = make_engine(url)
    try:
        prof["planning_experiment"] = plan_experiment.compare(
            engine, tables, args.batch, prof["planning"])
    finally:
        engine.dispose()
    dry = profile.time_dry_run(url, tables, args.batch,
                               worker_env(url, args.redis_url, tmp.name, args.batch))
    return prof, dry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    load_before = load()
    tmp = args.out / "tmp" / uuid.uuid4().hex[:8]
    tmp.mkdir(parents=True, exist_ok=True)
    tables = build_tables("seed")
    spec = names.seed_spec(args.rows, args.expired_percent)
    progress(f"rows {args.rows:,}, batch {args.batch}, expired {args.expired_percent or 55}%, "
             f"load {load_before}, logs in {tmp}")
    methods: list[dict[str, Any]] = []
    idle: list[float] = []
    with data.scratch_databases(args.pg_url, args.database, keep=args.keep) as template:
        engine = make_engine(template)
        with engine.connect() as conn:
            now = db_now(conn)
            version = str(conn.exec_driver_sql("SHOW server_version").scalar_one())
        engine.dispose()
        dataset = data.build(template, tables, spec, now)
        warm = data.database_url(args.pg_url, f"{args.database}_warm")
        data.build(warm, tables, SeedSpec(rows=data.WARM_ROWS), now)
        if args.run_state:
            progress(f"dag_run.state added: {data.add_run_state(template):,} dag runs finished")
            data.add_run_state(warm)
        keys = data.writer_keys(template)
        progress(f"built in {dataset.build_seconds:.1f} s: {dataset}")
        prof, dry = profile_planners(args, tmp)
        progress(f"profiled: planning {report.planning_summary(prof)}, dry run {dry}")
        failed: list[dict[str, str]] = []
        for method in args.method_list:
            try:
                row, window = measure(args, method, keys, tmp, dataset)
            except (RuntimeError, TimeoutError) as exc:
                # One method that cannot finish (a setting this build lacks) costs its own row,
                # not the rest of a long run.
                progress(f"{method.name}: FAILED: {exc}")
                failed.append({"name": method.name, "error": str(exc)})
                continue
            methods.append(row)
            idle += window
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))
    results: dict[str, Any] = {
        "meta": {"rows": args.rows, "batch": args.batch, "started": started.isoformat(
            timespec="seconds"), "load_before": load_before, "load_after": load(),
            "cpus": os.cpu_count(), "postgres": f"PostgreSQL {version}", "command": command,
            "writer_rate": args.writer_rate, "quick": args.quick,
            "expired_percent": args.expired_percent, "run_state": args.run_state,
            "chunk_rate_limit": args.chunk_rate_limit or None},
        "dataset": {"rows": dataset.rows, "expired": dataset.expired, "never": dataset.never,
                    "refreshed": dataset.refreshed, "survivors_rows": dataset.survivors.rows,
                    "survivors_id_sum": dataset.survivors.id_sum,
                    "build_seconds": round(dataset.build_seconds, 1)},
        "writer_idle": writer_stats(idle, (3 if args.quick else 8) * len(methods)),
        "methods": methods, "failed": failed, "dry_run": dry, "profile": prof,
    }
    report.add_ratios(results)
    results["targets"] = report.check_targets(results)
    sized = names.results_stem(args.rows, args.batch, args.expired_percent,
                               args.chunk_rate_limit, args.run_state)
    for stem in (sized, "latest"):
        paths = report.write_outputs(results, args.out, stem)
    progress(f"wrote {', '.join(str(p) for p in paths)} and {sized}.*")
    print(report.markdown(results))
    return 0 if all(m["verified"] for m in methods) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
