"""``python -m bench.dbclean_floor``: how fast ``db-clean`` could be on this machine.

    python -m bench.dbclean_floor --airflow /opt/af-3.3.2/bin/airflow [--scale 1] [--tasks 10]
        [--rounds 3] [--workers 2] [--archive]

bench.dbclean_compare puts statesweep beside ``airflow db clean``; this bench asks what bounds
that ratio. On fresh clones of one filled database (bench.dbclean_fill, as dbclean_compare
fills it), alternating the order each round, it times:

- ``airflow version``: what every ``airflow`` command costs before it touches the database;
- ``airflow db clean --clean-before-timestamp T -y --batch-size B``;
- ``statesweep db-clean --local --batch-size 0``: each table in one transaction (its
  dependants' rows first, each table in one statement), the same rule and the same rows: the
  least work the server can do for this cleanup on one connection, the floor;
- ``statesweep db-clean --local --batch-size B``: the same in bounded transactions, one process;
- ``statesweep db-clean --batch-size B`` on W workers (bench.dbclean_workers).

Every run is ``--skip-archive`` unless ``--archive``. Deleting a task instance or a dag run
fires PostgreSQL's per-row foreign-key triggers on every table that refers to it, whoever
deletes it; with the server's work per row fixed, W workers on C CPUs can at best divide the
floor by min(W, C). The page says what that bound is on this machine. Output:
bench/results/dbclean_floor_<db>_<version>_x<scale>_k<tasks>.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import dbclean_fill as fill
from bench.dbclean_compare import ROOT, Server, airflow_env, build_source, ensure_airflow
from bench.dbclean_speed import uptime

TAG = "dbfloor"


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} … failed:\n{done.stderr[-3000:]}")
    return round(seconds, 2)


def statesweep(url: str, batch: int, extra: list[str], workers: int) -> float:
    env = {**os.environ, "STATESWEEP_DATABASE_URL": url, "STATESWEEP_RUN_STORE_URL": "memory://"}
    cmd = [sys.executable, "-c", "from workers.cli import main; main()", "db-clean",
           "--clean-before-timestamp", fill.T, "-y", "--batch-size", str(batch), *extra]
    with ExitStack() as stack:
        if workers:
            from bench.dbclean_workers import distributed

            env, _ = stack.enter_context(distributed(env, workers))
        else:
            cmd.append("--local")
        return run(cmd, env)


def clean(server: Server, version: str, how: tuple[int, int] | None, airflow: str,
          home: str, batch: str, extra: list[str], into: list[float]) -> None:
    """One cleanup on a fresh clone: Airflow's (*how* None) or statesweep's (batch, workers)."""
    with server.database(f"{TAG}_run", version, f"{TAG}_source") as url:
        if how is None:
            env = airflow_env(server.airflow_url(f"{TAG}_run"), home)
            into.append(run([airflow, "db", "clean", "--clean-before-timestamp", fill.T, "-y",
                             "--batch-size", batch, *extra], env))
        else:
            into.append(statesweep(url, how[0], extra, how[1]))


def positive(kind: type) -> Any:
    """An argparse type: a number of *kind* above zero (a median of no rounds, or no workers,
    has no answer)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
        return value
    return parse


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--airflow", default="/opt/af-3.3.2/bin/airflow")
    p.add_argument("--scale", type=positive(float), default=1.0)
    p.add_argument("--tasks", type=positive(int), default=10)
    p.add_argument("--batch-size", type=positive(int), default=10000)
    p.add_argument("--workers", type=positive(int), default=2)
    p.add_argument("--rounds", type=positive(int), default=3)
    p.add_argument("--archive", action="store_true", help="archive (default: --skip-archive)")
    args = p.parse_args(argv)
    server = Server("postgresql")
    airflow, version = ensure_airflow(args.airflow, True)
    sizes = {"d": 50, "r": int(20000 * args.scale), "k": args.tasks,
             "l": int(200000 * args.scale)}
    extra = [] if args.archive else ["--skip-archive"]
    b = str(args.batch_size)
    modes = {
        "airflow version": None,
        f"airflow db clean --batch-size {b}": None,
        "statesweep --local --batch-size 0 (floor)": (0, 0),
        f"statesweep --local --batch-size {b}": (args.batch_size, 0),
        f"statesweep --batch-size {b} on {args.workers} workers": (args.batch_size,
                                                                   args.workers),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    load_start = uptime()
    with server.database(f"{TAG}_source", version):
        build_source(server, f"{TAG}_source", airflow, version, False, sizes)
        for r in range(args.rounds):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            for mode in order:
                with tempfile.TemporaryDirectory() as home:
                    if mode == "airflow version":
                        env = airflow_env(server.airflow_url("postgres"), home)
                        times[mode].append(run([airflow, "version"], env))
                    else:
                        clean(server, version, modes[mode], airflow, home, b, extra,
                              times[mode])
                print(f"round {r + 1}: {mode}: {times[mode][-1]} s", file=sys.stderr)
    med = {m: statistics.median(v) for m, v in times.items()}
    cpus = os.cpu_count() or 1
    fixed = med["airflow version"]
    af = med[f"airflow db clean --batch-size {b}"]
    floor = med["statesweep --local --batch-size 0 (floor)"]
    ideal = floor / min(args.workers, cpus)
    meta = {"command": "python -m bench.dbclean_floor " + " ".join(argv or sys.argv[1:]),
            "version": version, "sizes": sizes, "cpus": cpus, "rounds": args.rounds,
            "archive": args.archive, "load_start": load_start, "load_end": uptime(),
            "times": times, "median": med, "best_possible_seconds": round(ideal, 2)}
    lines = [
        f"# How fast db-clean could be: PostgreSQL, Airflow {version}",
        "",
        f"Generated by `{meta['command']}`; sizes {sizes} (dags, dag runs, task instances per "
        f"run, log rows), as bench.dbclean_compare fills them; "
        f"{'archived' if args.archive else '--skip-archive'}; {args.rounds} rounds on fresh "
        f"clones, the order alternating; {cpus} CPUs; load average at start {load_start}, at "
        f"end {meta['load_end']}.",
        "",
        "| run | median s | each round s | × airflow db clean |",
        "| --- | ---: | --- | ---: |",
    ]
    for m, v in times.items():
        lines.append(f"| {m} | {med[m]} | {', '.join(map(str, v))} | "
                     f"{round(af / med[m], 2) if m != 'airflow version' else ''} |")
    lines += [
        "",
        f"Airflow's own cost before it touches the database is {fixed} s; its cleanup's time "
        f"in the database is about {round(af - fixed, 2)} s. statesweep's floor, each table in "
        f"one transaction on one connection, {floor} s whole (its command's start included), "
        f"is {round(af / floor, 2)}x Airflow's whole run. On {cpus} CPUs, {args.workers} "
        f"workers can at best divide the floor by {min(args.workers, cpus)}: about "
        f"{round(ideal, 2)} s, {round(af / ideal, 2)}x Airflow's run, with no fixed cost "
        f"at all.",
    ]
    page = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "results" / (
        f"dbclean_floor_postgresql_{version}_x{args.scale:g}_k{args.tasks}"
        + ("_archived" if args.archive else ""))
    Path(f"{out}.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    Path(f"{out}.md").write_text(page)
    print(page)


if __name__ == "__main__":
    main()
