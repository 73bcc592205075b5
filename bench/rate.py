"""``python -m bench.rate --rate 10/s --seconds 40``: does STATESWEEP_CHUNK_RATE_LIMIT hold?

One real worker as the README starts it (prefork, default concurrency 2, both queues), the
limit set, batch 1000, on a table holding enough expired rows for at least ``--seconds`` of
chunks at that rate. Chunk starts come from the worker's JSON log (each ``chunk_deleted``
time minus its ms); the run is cut into 5-second buckets from the first start and the achieved
starts per second of each full bucket reported (min / mean / max), with the whole run's.
Writes bench/results/rate_<N>_per_<unit>_c<C>.{json,md}; the markdown goes to stdout too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench import data, names
from bench.measure import add_service_args, load, progress
from bench.sweep import worker_env
from bench.worker_logs import chunk_starts, forget_redis_keys, log_events
from tests.processes import start_worker
from workers.celery_app import COORDINATE, build_app
from workers.coordinator import new_run_id
from workers.db import db_now, make_engine
from workers.exceptions import SettingsError
from workers.runs import registry_for
from workers.schema import build_tables
from workers.settings import Settings

BUCKET_SECONDS = 5.0
EXPIRED_PERCENT = 90  # most rows expired: the fewest rows to seed for the chunks needed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.rate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="10/s", help="STATESWEEP_CHUNK_RATE_LIMIT, e.g. 10/s")
    p.add_argument("--seconds", type=float, default=40, help="run length to aim for, >= 30")
    p.add_argument("--batch", type=int, default=1000, help="rows per chunk")
    p.add_argument("--concurrency", type=int, default=2, help="the worker's -c")
    add_service_args(p, "statesweep_bench_rate")
    args = p.parse_args(argv)
    try:
        args.per_second = Settings.from_env(
            {"STATESWEEP_CHUNK_RATE_LIMIT": args.rate}).chunk_rate_per_second
    except SettingsError as exc:  # names the setting and the value
        p.error(f"--rate {args.rate!r}: {str(exc).splitlines()[-1].strip()}")
    if args.seconds < 30 or args.batch < 1 or args.concurrency < 1:
        p.error(f"--seconds must be >= 30 (got {args.seconds}), --batch >= 1 (got "
                f"{args.batch}), --concurrency >= 1 (got {args.concurrency})")
    return args


def buckets(starts: list[float], width: float = BUCKET_SECONDS) -> list[float]:
    """Chunk starts per second in each full *width*-second bucket from the first start."""
    if not starts:
        return []
    full = int((starts[-1] - starts[0]) // width)
    counts = [0] * full
    for s in starts:
        i = int((s - starts[0]) // width)
        if i < full:
            counts[i] += 1
    return [c / width for c in counts]


def summarise(starts: list[float], per_second: float) -> dict[str, Any]:
    rates = buckets(starts)
    span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
    return {
        "chunks": len(starts), "span_seconds": round(span, 1),
        "overall_per_second": round((len(starts) - 1) / span, 2) if span else None,
        "bucket_seconds": BUCKET_SECONDS, "buckets": rates,
        "bucket_min": min(rates, default=None), "bucket_max": max(rates, default=None),
        "bucket_mean": round(sum(rates) / len(rates), 2) if rates else None,
        "holds": bool(rates) and span >= 30 and min(rates) >= 0.9 * per_second
        and max(rates) <= 1.1 * per_second,
    }


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    tables = build_tables("seed")
    chunks = int(args.per_second * args.seconds * 1.15) + 1
    rows = int(chunks * args.batch * 100 / EXPIRED_PERCENT)
    with data.scratch_databases(args.pg_url, args.database) as url:
        engine = make_engine(url)
        with engine.connect() as conn:
            now = db_now(conn)
        engine.dispose()
        dataset = data.build(url, tables, names.seed_spec(rows, EXPIRED_PERCENT), now)
        progress(f"built {rows:,} rows ({dataset.expired:,} expired) for about {chunks} chunks")
        env = worker_env(url, args.redis_url, f"rate-{tmp.name}", args.batch, args.rate)
        settings = Settings.from_env(env)
        queues = f"{settings.control_queue},{settings.chunk_queue}"
        worker = start_worker(env, tmp, "rate", concurrency=args.concurrency, queues=queues)
        app = build_app(settings, include_tasks=False)
        registry = registry_for(settings.effective_run_store_url, settings.key_prefix)
        try:
            run_id = new_run_id()
            t0 = time.time()
            app.send_task(COORDINATE, queue=settings.control_queue,
                          kwargs={"batch_size": args.batch, "source": "bench", "run_id": run_id})
            deadline = time.monotonic() + args.seconds * 4 + 120
            record = None
            while time.monotonic() < deadline:
                record = registry.get(run_id)
                if record is not None and record.ended:
                    break
                time.sleep(0.5)
            if record is None or record.state != "finished":
                raise RuntimeError(f"run {run_id} did not finish: {record}")
        finally:
            app.close()
            worker.stop()
            forget_redis_keys(args.redis_url, env)
        events = [e for e in log_events(worker.log_path, run_id) if e["event"] == "chunk_deleted"]
    starts = chunk_starts(events)
    return {"meta": {"rate": args.rate, "per_second": args.per_second, "batch": args.batch,
                     "concurrency": args.concurrency, "rows": rows, "expired": dataset.expired,
                     "started": dt.datetime.fromtimestamp(t0, dt.UTC).isoformat(
                         timespec="seconds"), "load_after": load(), "cpus": os.cpu_count(),
                     "command": "python -m bench.rate " + " ".join(sys.argv[1:])},
            "run": {"run_id": run_id, "seconds": round(record.finished_at - t0, 1),
                    "rows_deleted": record.rows_deleted, "chunks_done": record.chunks_done},
            "starts": summarise(starts, args.per_second)}


def markdown(r: dict[str, Any]) -> str:
    m, s, run_ = r["meta"], r["starts"], r["run"]
    rates = ", ".join(f"{x:g}" for x in s["buckets"])
    return "\n".join([
        f"# STATESWEEP_CHUNK_RATE_LIMIT={m['rate']}: chunk starts per second over a run", "",
        f"Command: `{m['command']}`; {m['started']}, load after {m['load_after']} on "
        f"{m['cpus']} CPUs.  ",
        f"One worker (prefork -c {m['concurrency']}, control and chunk queues), batch "
        f"{m['batch']}, {m['rows']:,} rows ({m['expired']:,} expired): run {run_['run_id']} "
        f"deleted {run_['rows_deleted']:,} rows in {run_['chunks_done']} chunks, "
        f"{run_['seconds']} s from trigger to finished.", "",
        "| chunks | span s | overall starts/s | 5-s buckets min / mean / max | goal | holds |",
        "| ---: | ---: | ---: | ---: | ---: | --- |",
        f"| {s['chunks']} | {s['span_seconds']} | {s['overall_per_second']} | "
        f"{s['bucket_min']} / {s['bucket_mean']} / {s['bucket_max']} | {m['per_second']:g}/s "
        f"(±10% per bucket, ≥ 30 s) | {'yes' if s['holds'] else 'NO'} |", "",
        f"Per bucket (starts/s): {rates}.", ""])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = args.out / "tmp" / uuid.uuid4().hex[:8]
    tmp.mkdir(parents=True, exist_ok=True)
    results = run(args, tmp)
    count, _, unit = args.rate.partition("/")
    stem = f"rate_{count}_per_{unit}_c{args.concurrency}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(results))
    progress(f"wrote {args.out / stem}.{{json,md}}")
    print(markdown(results))
    return 0 if results["starts"]["holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
