"""Real worker processes for acceptance tests: ``celery -A workers worker`` as a subprocess,
with its environment, its log file, and a bounded stop (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from workers.runs import RunRecord, registry_for

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """os.environ minus any STATESWEEP_/AIRFLOW_ variables (AIRFLOW__*, AIRFLOW_HOME,
    AIRFLOW_CONFIG: a developer's airflow.cfg must not configure the test), plus *env*."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("STATESWEEP_", "AIRFLOW_"))}
    base.update(env)
    base.setdefault("PYTHONUNBUFFERED", "1")
    return base


@dataclass
class WorkerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (main process and pool children)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20) -> None:
        """Celery's warm shutdown: SIGTERM to the main process only, which lets the pool
        finish its tasks. A TERM to the whole group would also reach the pool's children, and
        a child ends at once on it: between a chunk's FINISH and its log line, say. Whatever
        is left of the group after the main process exits (or after *timeout*) is killed."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        self.kill()


def start_worker(env: Mapping[str, str], log_dir: Path, name: str, *, concurrency: int = 2,
                 pool: str = "prefork", queues: str | None = None, ready_timeout: float = 30,
                 wrap: Callable[[list[str]], list[str]] | None = None) -> WorkerProcess:
    """Start a worker and wait until it logs that it is ready. *wrap* turns the command into
    the one to run (a network namespace's ``ip netns exec``)."""
    log_path = log_dir / f"{name}.log"
    cmd = [CELERY, "-A", "workers", "worker", "-n", f"{name}@%h", "-c", str(concurrency),
           "-P", pool, "-l", "INFO", "--without-gossip", "--without-mingle"]
    if queues:
        cmd += ["-Q", queues]
    if wrap is not None:
        cmd = wrap(cmd)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    worker = WorkerProcess(name, proc, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker {name} exited with {proc.returncode}:\n{worker.log()}")
        if "ready." in worker.log():
            return worker
        time.sleep(0.2)
    worker.stop()
    raise RuntimeError(f"worker {name} not ready in {ready_timeout}s:\n{worker.log()}")


@contextmanager
def workers(env: Mapping[str, str], log_dir: Path, count: int = 1,
            **kwargs: object) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        for i in range(count):
            started.append(start_worker(env, log_dir, f"w{i + 1}", **kwargs))  # type: ignore[arg-type]
        yield started
    finally:
        for w in started:
            w.stop()


def wait_for_run(env: Mapping[str, str], run_id: str, timeout: float = 120) -> RunRecord:
    """Poll the run store until run *run_id* is finished or failed; raise on timeout."""
    url = env.get("STATESWEEP_RUN_STORE_URL") or env["STATESWEEP_RESULT_BACKEND"]
    registry = registry_for(url, env["STATESWEEP_KEY_PREFIX"])
    deadline = time.monotonic() + timeout
    record = None
    while time.monotonic() < deadline:
        record = registry.get(run_id)
        if record is not None and record.state in ("finished", "failed"):
            return record
        time.sleep(0.2)
    raise TimeoutError(f"run {run_id} did not finish in {timeout}s: {record}")
