"""``python -m bench.dbclean_compare --workers N``: statesweep's distributed ``db-clean`` (no
``--local``) on N Celery workers of its own: a key prefix and queue names of this run on the
local Redis (run store and broker), each worker ``celery -A workers.celery_app worker -c 1`` on
both queues, stopped with SIGTERM (then SIGKILL) when the run is over. ``db-clean`` without
``--local`` dispatches the run and waits for it to end, so its wall time is the run's; the
workers' logs (JSON, one file each) give the chunks' times.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELERY = str(Path(sys.executable).with_name("celery"))
REDIS = os.environ.get("STATESWEEP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


@contextmanager
def distributed(env: dict[str, str], n: int) -> Iterator[tuple[dict[str, str], Path]]:
    """(the CLI's environment, the workers' log directory) while N workers consume this run's
    queues."""
    tag = f"dbc{os.getpid()}"
    env = {**env, "STATESWEEP_RUN_STORE_URL": REDIS, "STATESWEEP_BROKER_URL": REDIS,
           "STATESWEEP_RESULT_BACKEND": REDIS, "STATESWEEP_LOG_FORMAT": "json",
           "STATESWEEP_KEY_PREFIX": tag, "STATESWEEP_CONTROL_QUEUE": f"{tag}-control",
           "STATESWEEP_CHUNK_QUEUE": f"{tag}-chunks", "PYTHONUNBUFFERED": "1",
           # libpq's application_name: the sampler (bench.dbclean_speed) names who holds a
           # transaction, the command or worker i.
           "PGAPPNAME": "statesweep-cli"}
    queues = f"{env['STATESWEEP_CONTROL_QUEUE']},{env['STATESWEEP_CHUNK_QUEUE']}"
    logs = Path(tempfile.mkdtemp(prefix="dbc_workers_"))
    procs = []
    for i in range(n):
        with open(logs / f"w{i}.log", "w") as out:
            procs.append(subprocess.Popen(
                [CELERY, "-A", "workers.celery_app", "worker", "-n", f"{tag}w{i}@%h", "-c", "1",
                 "-Q", queues, "-l", "INFO", "--without-gossip", "--without-mingle"],
                cwd=ROOT, env={**env, "PGAPPNAME": f"statesweep-w{i}"}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                "ready" in (logs / f"w{i}.log").read_text() for i in range(n)):
            time.sleep(0.2)
        yield env, logs
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
