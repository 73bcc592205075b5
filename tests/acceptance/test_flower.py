"""A cleanup triggered through Flower's HTTP API, watched through Flower, as an operator would.

Real processes: `celery -A workers flower` with basic auth and a `celery -A workers worker`,
against the test Redis and a fresh PostgreSQL database. The run is started with
POST /api/task/async-apply/statesweep.coordinate (the README's command), followed on
/api/tasks until the coordinator and every chunk show SUCCESS with their arguments and
results, and checked in the database. /metrics must carry Flower's Prometheus metrics.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import BROKERS, Broker
from tests.conftest import create_schema, database_now
from tests.processes import CELERY, ROOT, child_env, start_worker, wait_for_run
from tests.services import unique
from workers.seed import SeedSpec, expected_survivors, seed, task_state_rows

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(90)]

USER, PASSWORD = "operator", "flower-test-pass"
ROWS, BATCH = 20_000, 2_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, *, method: str = "GET", body: Any = None,
         auth: tuple[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of one request; HTTP errors are answers here, not exceptions."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@contextmanager
def flower(env: Mapping[str, str], log_dir: Path, port: int,
           cmd: list[str] | None = None) -> Iterator[str]:
    """Flower on 127.0.0.1:*port*; yields its base URL once /healthcheck answers."""
    log_path = log_dir / "flower.log"
    cmd = cmd or [CELERY, "-A", "workers", "flower", f"--port={port}", "--address=127.0.0.1",
                  f"--basic-auth={USER}:{PASSWORD}"]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"flower exited {proc.returncode}:\n{log_path.read_text()}")
            try:
                if http(f"{base}/healthcheck")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"flower not up in 30 s:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def wait_for_tasks(base: str, coordinator_id: str, timeout: float = 60) -> dict[str, Any]:
    """Poll /api/tasks until the coordinator and all its chunks are SUCCESS in Flower.

    Flower shows every task on the broker's event stream, other tests' too (as it would show
    other deployments sharing a Redis database), so the chunks are the coordinator's
    children: their parent_id is its task id."""
    deadline = time.monotonic() + timeout
    tasks: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, text = http(f"{base}/api/tasks", auth=(USER, PASSWORD))
        assert status == 200, text
        tasks = {k: t for k, t in json.loads(text).items()
                 if coordinator_id in (k, t.get("parent_id"))}
        chunks = [t for t in tasks.values() if t.get("name") == "statesweep.delete_chunk"]
        coordinator = tasks.get(coordinator_id, {})
        if coordinator.get("state") == "SUCCESS" and all(
                t.get("state") == "SUCCESS" for t in chunks):
            if len(chunks) == _literal(coordinator["result"])["chunks"]:
                return tasks
        time.sleep(0.5)
    raise TimeoutError(f"tasks not all SUCCESS in Flower after {timeout}s: {tasks}")


def _literal(text: str) -> Any:
    """Flower shows results and kwargs as Python reprs of JSON-like values."""
    import ast

    return ast.literal_eval(text)


def metric(metrics: str, name: str, **labels: str) -> float:
    """The value of the sample *name* whose labels include *labels*; 0 when there is none."""
    for line in metrics.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.partition("{")[0] == name and all(
                f'{k}="{v}"' in sample for k, v in labels.items()):
            return float(value)
    return 0.0


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_cleanup_through_flower_api(pg_url: str, redis_url: str, isolation: dict[str, str],
                                    tmp_path: Path, broker: Broker) -> None:
    engine, tables = create_schema(pg_url)
    spec = SeedSpec(rows=ROWS)
    counts = seed(engine, tables, spec, database_now(engine))
    env = {"STATESWEEP_DATABASE_URL": pg_url, "STATESWEEP_BROKER_URL": broker.url,
           "STATESWEEP_RESULT_BACKEND": redis_url, "STATESWEEP_CLEANUP_BATCH_SIZE": str(BATCH),
           **isolation}
    control, chunk_queue = (isolation["STATESWEEP_CONTROL_QUEUE"],
                            isolation["STATESWEEP_CHUNK_QUEUE"])
    # A node name of its own, so its metrics are told apart from other tests' workers.
    name = unique("flower")
    apply_url = "/api/task/async-apply/statesweep.coordinate"
    body = {"kwargs": {"source": "flower"}}
    worker = start_worker(env, tmp_path, name, queues=f"{control},{chunk_queue}")
    try:
        with flower(env, tmp_path, free_port()) as base:
            # No credentials, or wrong ones: refused, and nothing is sent.
            assert http(base + apply_url, method="POST", body=body)[0] == 401
            assert http(base + apply_url, method="POST", body=body,
                        auth=(USER, "wrong"))[0] == 401
            assert http(f"{base}/api/tasks")[0] == 401
            assert http(f"{base}/api/tasks", auth=("intruder", PASSWORD))[0] == 401
            assert len(task_state_rows(engine, tables)) == ROWS

            status, text = http(base + apply_url, method="POST", body=body,
                                auth=(USER, PASSWORD))
            assert status == 200, text
            coordinator_id = json.loads(text)["task-id"]

            tasks = wait_for_tasks(base, coordinator_id)
            coordinator = tasks.pop(coordinator_id)
            summary = _literal(coordinator["result"])
            assert summary["status"] in ("started", "finished")
            assert _literal(coordinator["kwargs"]) == {"source": "flower"}
            # Sent with no queue option: the app's task routes put it on the control queue.
            assert coordinator["routing_key"] == control
            assert coordinator["worker"] == f"{name}@{socket.gethostname()}"

            # The coordinator's children: the first window (here the whole run fits in it).
            assert len(tasks) == summary["chunks"] > 0
            for task in tasks.values():
                kwargs, result = _literal(task["kwargs"]), _literal(task["result"])
                assert task["name"] == "statesweep.delete_chunk"
                # Workers send no task-sent events (the routing key is in those); the chunk
                # was taken from the chunk queue by this test's worker.
                assert task["worker"] == f"{name}@{socket.gethostname()}"
                assert kwargs["run_id"] == result["run_id"] == summary["run_id"]
                assert kwargs["cutoff"] == summary["cutoff"]
                assert kwargs["chunk"] == result["chunk"] and result["status"] == "deleted"
                assert kwargs["kind"] in ("blocks", "ids", "walk")
            assert sum(_literal(t["result"])["rows"] for t in tasks.values()) == counts.expired

            # The README's way to see one run among everything Flower shows: search its id.
            status, text = http(f"{base}/api/tasks?search={summary['run_id']}",
                                auth=(USER, PASSWORD))
            assert status == 200, text
            assert set(json.loads(text)) == {coordinator_id, *tasks}

            record = wait_for_run(env, summary["run_id"], timeout=30)
            assert record.state == "finished" and record.rows_deleted == counts.expired
            assert task_state_rows(engine, tables) == expected_survivors(spec)

            status, metrics = http(f"{base}/metrics", auth=(USER, PASSWORD))
            assert status == 200
            # As the README warns: Flower 2.2 serves /metrics without credentials.
            assert http(f"{base}/metrics")[0] == 200
            node = coordinator["worker"]
            assert metric(metrics, "flower_events_total", worker=node, type="task-succeeded",
                          task="statesweep.delete_chunk") == len(tasks)
            assert metric(metrics, "flower_events_total", worker=node, type="task-succeeded",
                          task="statesweep.coordinate") == 1
            assert metric(metrics, "flower_task_runtime_seconds_count", worker=node,
                          task="statesweep.delete_chunk") == len(tasks)
            # The gauge follows worker-online/heartbeat events (every 2 s), which can reach
            # Flower after the task events on a loaded machine: wait for one, bounded.
            deadline = time.monotonic() + 20
            while metric(metrics, "flower_worker_online", worker=node) != 1:
                assert time.monotonic() < deadline, "no worker heartbeat reached Flower in 20 s"
                time.sleep(0.5)
                metrics = http(f"{base}/metrics", auth=(USER, PASSWORD))[1]
    finally:
        worker.stop()
        engine.dispose()


STATESWEEP = str(Path(CELERY).with_name("statesweep"))


def test_statesweep_flower_refuses_to_start_without_auth(tmp_path: Path) -> None:
    """Issue: run by hand with FLOWER_USER/FLOWER_PASSWORD (compose's names), Flower answered
    / and /tasks with 200 to anyone; Flower's own variable is FLOWER_BASIC_AUTH."""
    port = free_port()
    env = {"FLOWER_USER": USER, "FLOWER_PASSWORD": PASSWORD, "AIRFLOW_HOME": str(tmp_path)}
    done = subprocess.run([STATESWEEP, "flower", f"--port={port}"], cwd=ROOT,
                          env=child_env(env), capture_output=True, text=True, timeout=60)
    assert done.returncode == 5, done.stderr  # EXIT_REFUSED
    assert "refusing to start Flower without authentication" in done.stderr
    assert "FLOWER_BASIC_AUTH=user:password" in done.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "nothing may listen"


def test_statesweep_flower_with_basic_auth_asks_for_credentials(
        isolation: dict[str, str], tmp_path: Path) -> None:
    from tests.services import REDIS_URL

    port = free_port()
    env = {**isolation, "STATESWEEP_BROKER_URL": REDIS_URL, "STATESWEEP_RESULT_BACKEND": REDIS_URL,
           "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}", "AIRFLOW_HOME": str(tmp_path)}
    with flower(env, tmp_path, port, [STATESWEEP, "flower", f"--port={port}"]) as base:
        for path in ("/", "/tasks", "/api/tasks"):
            assert http(f"{base}{path}")[0] == 401, path
            assert http(f"{base}{path}", auth=(USER, "wrong"))[0] == 401, path
            assert http(f"{base}{path}", auth=(USER, PASSWORD))[0] == 200, path
        # The password travels in Flower's environment, not in its argv for `ps` to show.
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
        assert f"--port={port}" in ps.stdout and PASSWORD not in ps.stdout
