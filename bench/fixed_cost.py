"""``python -m bench.fixed_cost``: what a run costs when there is nothing to delete, right
after a big run.

Real workers as the tests start them (``--workers``, prefork, both queues) on a database of
``--rows`` rows in the default mix (about half expired). One big ``statesweep cleanup --wait``
deletes the backlog; right after it, with no VACUUM in between, each repeat times, as a user's
shell would, an empty ``statesweep cleanup --wait`` end to end (process start, settings,
dispatch, the coordinator's pickup and planning, following the run, the summary), split by the
run record's own times into the CLI before the run is recorded (process start, imports,
connecting), the workers (pickup, plan, finish) and from the run's end to the process's exit.
Beside it ``statesweep --version`` (process start and imports alone) and one coordinator task
sent from this process and followed in the run store (no CLI process). The target is an empty
``cleanup --wait`` within 0.4 s (issue 20).
Writes bench/results/fixed_cost.{json,md}; the markdown goes to stdout too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
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
from workers.db import db_now, make_engine
from workers.run_ids import new_run_id
from workers.runs import registry_for
from workers.schema import build_tables
from workers.seed import SeedSpec
from workers.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
STATESWEEP = str(Path(sys.executable).with_name("statesweep"))
TARGET_SECONDS = 0.4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fixed_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10, help="timed runs of each (>= 3)")
    p.add_argument("--rows", type=int, default=1_000_000,
                   help="task_state rows, about half expired: the big run before the empty ones")
    p.add_argument("--workers", type=int, default=2, help="worker processes, both queues")
    p.add_argument("--batch-size", type=int, default=10_000)
    p.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                   help="also time the CLI of this checkout (e.g. `git archive` of an older "
                        "commit), turn about with this one")
    p.add_argument("--baseline-label", default="", metavar="TEXT",
                   help="what the baseline is, for the results (e.g. its commit)")
    add_service_args(p, "statesweep_bench_fixed")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error(f"--repeats must be at least 3, got {args.repeats}")
    return args


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str, float]:
    """(wall seconds, epoch at exit, stdout, CPU seconds) of *cmd*; RuntimeError if it fails.
    The CPU time (user + system, the process alone: workers are children not yet reaped) is
    what a busy host does not inflate the way it inflates wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds, ended = time.perf_counter() - t0, time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} exited {done.returncode}: {done.stderr[-500:]}")
    return seconds, ended, done.stdout, cpu


def cleanup_wait(env: dict[str, str]) -> dict[str, Any]:
    """One `statesweep cleanup --wait`, timed, with its run record's times: the CLI before
    the run was recorded, the workers from then to its end, and its end to the exit."""
    started = time.time()
    wall, exited, out, cpu = timed([STATESWEEP, "cleanup", "--wait", "--format", "json"], env)
    record = json.loads(out)
    queued = dt.datetime.fromisoformat(record["started_at"]).timestamp()
    finished = dt.datetime.fromisoformat(record["finished_at"]).timestamp()
    return {"wall": wall, "cpu": cpu, "cli_start": queued - started,
            "workers": finished - queued,
            "end_to_exit": exited - finished, "rows": record["rows_deleted"],
            "chunks": record["chunks_done"], "planner": record["planner"],
            "state": record["state"]}


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
        dataset = data.build(url, tables, SeedSpec(rows=args.rows), now)
        env = worker_env(url, args.redis_url, f"fixed-{tmp.name}", args.batch_size)
        settings = Settings.from_env(env)
        queues = f"{settings.control_queue},{settings.chunk_queue}"
        workers = [start_worker(env, tmp, f"fixed{i + 1}", queues=queues)
                   for i in range(args.workers)]
        app = build_app(settings, include_tasks=False)
        registry = registry_for(settings.effective_run_store_url, settings.key_prefix)
        cli_env = child_env(env)
        samples: dict[str, list[float]] = {k: [] for k in (
            "cleanup_wait", "cleanup_wait_cpu", "cli_start", "workers", "end_to_exit",
            "version", "version_cpu", "in_process", "baseline_cleanup_wait",
            "baseline_cleanup_wait_cpu", "baseline_version", "baseline_version_cpu")}
        # The CLI of another checkout, on the same workers, turn about with this one: a
        # before/after under the same load.
        base_env = {**cli_env, "PYTHONPATH": str(args.baseline)} if args.baseline else None
        try:
            timed([STATESWEEP, "--version"], cli_env)  # the page cache, not the run
            big = cleanup_wait(cli_env)
            if big["state"] != "finished" or big["rows"] < dataset.expired // 2:
                raise RuntimeError(f"the big run did not delete the backlog: {big}")
            progress(f"big run: {big['rows']:,} rows in {big['wall']:.1f}s ({big['planner']})")
            first = None
            for _ in range(args.repeats):
                empty = cleanup_wait(cli_env)
                if empty["state"] != "finished" or empty["rows"]:
                    raise RuntimeError(f"not an empty finished run: {empty}")
                first = first or empty
                for key in ("cli_start", "workers", "end_to_exit"):
                    samples[key].append(empty[key])
                samples["cleanup_wait"].append(empty["wall"])
                samples["cleanup_wait_cpu"].append(empty["cpu"])
                if base_env is not None:
                    old = cleanup_wait(base_env)
                    if old["state"] != "finished" or old["rows"]:
                        raise RuntimeError(f"not an empty finished run: {old}")
                    samples["baseline_cleanup_wait"].append(old["wall"])
                    samples["baseline_cleanup_wait_cpu"].append(old["cpu"])
            for _ in range(args.repeats):
                wall, _, _, cpu = timed([STATESWEEP, "--version"], cli_env)
                samples["version"].append(wall)
                samples["version_cpu"].append(cpu)
                if base_env is not None:
                    wall, _, _, cpu = timed([STATESWEEP, "--version"], base_env)
                    samples["baseline_version"].append(wall)
                    samples["baseline_version_cpu"].append(cpu)
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
            for worker in workers:
                worker.stop()
            forget_redis_keys(args.redis_url, env)
    out = {k: stats(v) for k, v in samples.items() if v}
    return {"meta": {"started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                     "load_after": load(), "cpus": os.cpu_count(), "rows": args.rows,
                     "workers": args.workers, "batch_size": args.batch_size,
                     "baseline": args.baseline_label or str(args.baseline or ""),
                     "command": "python -m bench.fixed_cost " + " ".join(sys.argv[1:])},
            "big_run": {k: round(v, 3) if isinstance(v, float) else v for k, v in big.items()},
            "first_empty": {k: round(v, 3) if isinstance(v, float) else v
                            for k, v in (first or {}).items()},
            "results": out,
            "target": {"goal_s": TARGET_SECONDS,
                       "holds": out["cleanup_wait"]["median_s"] <= TARGET_SECONDS}}


def markdown(r: dict[str, Any]) -> str:
    m, res, tgt, big, first = (r["meta"], r["results"], r["target"], r["big_run"],
                               r["first_empty"])
    rows = [("`statesweep cleanup --wait`, empty, end to end", "cleanup_wait"),
            ("… its CPU (user + system of the CLI process)", "cleanup_wait_cpu"),
            ("… of it: process start to the run recorded (imports, settings, connecting)",
             "cli_start"),
            ("… of it: recorded to ended (pickup, plan, finish in the workers)", "workers"),
            ("… of it: the run's end to the process's exit (following, summary)",
             "end_to_exit"),
            ("`statesweep --version` (process start and imports)", "version"),
            ("… its CPU", "version_cpu"),
            ("coordinator sent from a running process, followed to its end", "in_process"),
            (f"baseline `{m.get('baseline')}`: `cleanup --wait`, empty, end to end",
             "baseline_cleanup_wait"),
            ("… its CPU", "baseline_cleanup_wait_cpu"),
            ("baseline `--version`", "baseline_version"), ("… its CPU", "baseline_version_cpu")]
    lines = [
        "# Fixed cost of an empty run", "",
        f"Command: `{m['command']}`; {m['started']}, load after {m['load_after']} on "
        f"{m['cpus']} CPUs. {m['workers']} workers (prefork, both queues), batch "
        f"{m['batch_size']:,}. First a big `cleanup --wait` on {m['rows']:,} rows: "
        f"{big['rows']:,} deleted in {big['chunks']:,} chunks ({big['planner']}), "
        f"{big['wall']} s wall, its end to the CLI's exit {big['end_to_exit']} s. Then, with no "
        "VACUUM between, the empty runs; each figure over the same repeats. Wall time grows "
        "with the host's load (other processes on its CPUs); CPU time much less.", "",
        "| what | median s | min s | max s | n |", "| --- | ---: | ---: | ---: | ---: |",
        *[f"| {label} | {res[k]['median_s']} | {res[k]['min_s']} | {res[k]['max_s']} | "
          f"{res[k]['n']} |" for label, k in rows if k in res], "",
        f"The first empty run after the big one: {first.get('wall')} s "
        f"(workers {first.get('workers')} s).", "",
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
