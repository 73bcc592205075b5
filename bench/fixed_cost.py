"""``python -m bench.fixed_cost``: what a run costs when there is nothing to delete.

One real worker as the README starts it (prefork, default concurrency, both queues) on a
database whose task_state holds only live rows. Each repeat times, as a user's shell would,
``statesweep cleanup --wait`` end to end (process start, settings, dispatch, the coordinator's
pickup and planning, following the run, the summary), and beside it ``statesweep --version``
(process start and imports alone) and one coordinator task sent from this process and followed
in the run store (no CLI process). Medians and minima of ``--repeats`` runs; the target is an
empty ``cleanup --wait`` within 0.4 s.
Writes bench/results/fixed_cost.{json,md}; the markdown goes to stdout too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench import data
from bench.measure import add_service_args, load, progress
from bench.sweep import worker_env
from bench.worker_logs import forget_redis_keys
from tests.processes import child_env, start_worker
from workers.celery_app import COORDINATE, build_app
from workers.coordinator import new_run_id
from workers.db import db_now, make_engine
from workers.runs import registry_for
from workers.schema import build_tables
from workers.seed import SeedSpec
from workers.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
STATESWEEP = str(Path(sys.executable).with_name("statesweep"))
TARGET_SECONDS = 0.4
LIVE_ROWS = 10_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fixed_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10, help="timed runs of each (>= 3)")
    add_service_args(p, "statesweep_bench_fixed")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error(f"--repeats must be at least 3, got {args.repeats}")
    return args


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} exited {done.returncode}: {done.stderr[-500:]}")
    return seconds


def stats(samples: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(samples), 3), "min_s": round(min(samples), 3),
            "max_s": round(max(samples), 3), "n": len(samples)}


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    tables = build_tables("seed")
    with data.scratch_databases(args.pg_url, args.database) as url:
        engine = make_engine(url)
        with engine.connect() as conn:
            now = db_now(conn)
        engine.dispose()
        # Only live rows: every run plans, finds nothing expired, and finishes empty.
        data.build(url, tables, SeedSpec(rows=LIVE_ROWS, period=10, expired_per_period=0,
                                         never_per_period=5), now)
        env = worker_env(url, args.redis_url, f"fixed-{tmp.name}", 10_000)
        settings = Settings.from_env(env)
        queues = f"{settings.control_queue},{settings.chunk_queue}"
        worker = start_worker(env, tmp, "fixed", queues=queues)
        app = build_app(settings, include_tasks=False)
        registry = registry_for(settings.effective_run_store_url, settings.key_prefix)
        cli_env = child_env(env)
        samples: dict[str, list[float]] = {"cleanup_wait": [], "version": [], "in_process": []}
        try:
            timed([STATESWEEP, "cleanup", "--wait"], cli_env)  # warm: engine, pools, caches
            for _ in range(args.repeats):
                samples["cleanup_wait"].append(timed([STATESWEEP, "cleanup", "--wait"], cli_env))
                samples["version"].append(timed([STATESWEEP, "--version"], cli_env))
                run_id = new_run_id()
                t0 = time.perf_counter()
                app.send_task(COORDINATE, queue=settings.control_queue,
                              kwargs={"source": "bench", "run_id": run_id})
                while (record := registry.get(run_id)) is None or not record.ended:
                    if time.perf_counter() - t0 > 60:
                        raise RuntimeError(f"run {run_id} did not end: {record}")
                    time.sleep(0.002)
                samples["in_process"].append(time.perf_counter() - t0)
                if record.state != "finished" or record.rows_deleted:
                    raise RuntimeError(f"run {run_id} was not an empty finished run: {record}")
        finally:
            app.close()
            worker.stop()
            forget_redis_keys(args.redis_url, env)
    out = {k: stats(v) for k, v in samples.items()}
    return {"meta": {"started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                     "load_after": load(), "cpus": os.cpu_count(), "live_rows": LIVE_ROWS,
                     "command": "python -m bench.fixed_cost " + " ".join(sys.argv[1:])},
            "results": out,
            "target": {"goal_s": TARGET_SECONDS,
                       "holds": out["cleanup_wait"]["median_s"] <= TARGET_SECONDS}}


def markdown(r: dict[str, Any]) -> str:
    m, res, tgt = r["meta"], r["results"], r["target"]
    rows = [("`statesweep cleanup --wait`, end to end", res["cleanup_wait"]),
            ("`statesweep --version` (process start and imports)", res["version"]),
            ("coordinator sent from a running process, followed to its end", res["in_process"])]
    lines = [
        "# Fixed cost of an empty run", "",
        f"Command: `{m['command']}`; {m['started']}, load after {m['load_after']} on "
        f"{m['cpus']} CPUs. One worker (prefork, both queues), {m['live_rows']:,} live rows and "
        "none expired; each figure over the same repeats.", "",
        "| what | median s | min s | max s | n |", "| --- | ---: | ---: | ---: | ---: |",
        *[f"| {label} | {s['median_s']} | {s['min_s']} | {s['max_s']} | {s['n']} |"
          for label, s in rows], "",
        f"Target: an empty `cleanup --wait` within {tgt['goal_s']} s: "
        + ("holds." if tgt["holds"] else
           f"MISSED by {res['cleanup_wait']['median_s'] - tgt['goal_s']:.2f} s (median)."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = args.out / "tmp" / uuid.uuid4().hex[:8]
    tmp.mkdir(parents=True, exist_ok=True)
    results = run(args, tmp)
    (args.out / "fixed_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "fixed_cost.md").write_text(markdown(results))
    progress(f"wrote {args.out / 'fixed_cost'}.{{json,md}}")
    print(markdown(results))
    return 0 if results["target"]["holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
