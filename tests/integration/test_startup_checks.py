"""What a worker and beat check at start, with real `celery worker` / `celery beat` processes.

- No run store they can share (issue 21, repro 3): RabbitMQ as broker, a result backend that is
  not Redis and no STATESWEEP_RUN_STORE_URL. Before, each process silently got its own memory://
  store, so triggers started several runs and chunks hit NotFound. The CLI's embedded mode
  (`cleanup --local`, one process) keeps working on the same settings.
- A run store Redis that cannot hold runs (issue 21, repros 6 and 7): older than 7 (the run
  scripts use EXPIRE ... GT; no such Redis here, so the version goes through the INFO seam), or
  a maxmemory-policy that may evict (a private redis-server with allkeys-lru). Before, both
  failed or lost work mid-run.
- Settings that contradict each other stop a worker at import, exit 3; a unix:// run store and a
  Redis Cluster hash-tag key prefix work end to end.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from tests.brokers import Broker, free_port
from tests.conftest import seed_postgres
from tests.processes import CELERY, ROOT, child_env, start_worker
from tests.reliability.faults import own_redis
from tests.services import CI, REDIS_URL, require
from workers.exit_codes import EXIT_OK, EXIT_SETTINGS, EXIT_UNAVAILABLE
from workers.settings import Settings
from workers.startup import (
    StartupRefused,
    check_run_store,
    check_run_store_redis,
    parse_version,
    redis_info,
    redis_info_problems,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STATESWEEP = str(Path(CELERY).with_name("statesweep"))
START_TIMEOUT = 30  # a refusing process exits in a few seconds; a started one runs on


@pytest.fixture
def rabbit_env(pg_url: str, isolation: dict[str, str], broker: Broker) -> Iterator[dict[str, str]]:
    """RabbitMQ as broker, rpc:// results (not Redis), no run store: a seeded database, so
    nothing but the run store stands between these settings and a running worker."""
    db = seed_postgres(pg_url, isolation, 2000)
    try:
        yield {"STATESWEEP_DATABASE_URL": pg_url, "STATESWEEP_BROKER_URL": broker.url,
               "STATESWEEP_RESULT_BACKEND": "rpc://", **isolation}
    finally:
        db.engine.dispose()


def _one_line_refusal(output: str, role: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    refusal = [line for line in lines if f"statesweep: {role} not started" in line]
    assert len(refusal) == 1, output
    line = refusal[0]
    assert "STATESWEEP_RUN_STORE_URL is unset" in line and "set STATESWEEP_RUN_STORE_URL" in line
    assert "STATESWEEP_RESULT_BACKEND='rpc://'" in line, line
    assert "amqp://guest:***@" in line and "guest:guest" not in output, line
    assert "Traceback" not in output, output


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_worker_refuses_an_implicit_per_process_run_store(
        rabbit_env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as refused:
        worker = start_worker(rabbit_env, tmp_path, "implicit", ready_timeout=START_TIMEOUT)
        worker.stop()  # it started: the test fails below, without leaving a worker behind
    assert f"exited with {EXIT_SETTINGS}" in str(refused.value), str(refused.value)
    _one_line_refusal(str(refused.value), "worker")


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_beat_refuses_an_implicit_per_process_run_store(
        rabbit_env: dict[str, str], tmp_path: Path) -> None:
    cmd = [CELERY, "-A", "workers", "beat", "-l", "INFO",
           "-s", str(tmp_path / "beat-schedule")]
    try:
        beat = subprocess.run(cmd, cwd=ROOT, env=child_env(rabbit_env), capture_output=True,
                              text=True, timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"beat started on a per-process run store (still running after "
                    f"{START_TIMEOUT}s): {exc.stderr!r}")
    output = beat.stdout + beat.stderr
    assert beat.returncode == EXIT_SETTINGS, output
    _one_line_refusal(output, "beat")


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_cli_local_run_keeps_its_embedded_run_store(rabbit_env: dict[str, str]) -> None:
    """One process plans and deletes: its memory:// store is shared by all it runs."""
    cli = subprocess.run([STATESWEEP, "cleanup", "--local"], cwd=ROOT,
                         env=child_env(rabbit_env), capture_output=True, text=True, timeout=60)
    assert cli.returncode == EXIT_OK, cli.stdout + cli.stderr


# --- the run store's Redis: version and maxmemory-policy --------------------------------------


def test_the_real_run_store_redis_passes_and_reports_its_version() -> None:
    require("Redis", "127.0.0.1", 6379)
    info = redis_info(REDIS_URL)
    assert parse_version(str(info["redis_version"]))[:2] >= (7, 0), info["redis_version"]
    assert info["maxmemory_policy"] == "noeviction"
    assert redis_info_problems(info) == []
    check_run_store(Settings.from_env({"STATESWEEP_RUN_STORE_URL": REDIS_URL}))


@pytest.mark.parametrize(("version", "refused"), [
    ("6.2.14", True), ("6.0.0", True), ("5.0.7", True), ("7.0.0", False), ("7.2.4", False),
    ("8.0.1", False), ("6.2.6-v3", True), ("", True),
])
def test_a_redis_older_than_7_is_refused_naming_the_url_and_version(
        version: str, refused: bool) -> None:
    """The real INFO of the machine's Redis, its version replaced (the one seam)."""
    require("Redis", "127.0.0.1", 6379)
    url = REDIS_URL.replace("redis://", "redis://:s3cret@") if "@" not in REDIS_URL else REDIS_URL
    settings = Settings.from_env({"STATESWEEP_RUN_STORE_URL": url})

    def info_of(_: str) -> dict[str, Any]:
        return {**redis_info(REDIS_URL), "redis_version": version}

    if not refused:
        check_run_store_redis(settings, info_of)
        return
    with pytest.raises(StartupRefused) as err:
        check_run_store_redis(settings, info_of)
    msg = str(err.value)
    assert err.value.code == EXIT_SETTINGS and "\n" not in msg
    assert "STATESWEEP_RUN_STORE_URL=redis://:***@" in msg and "s3cret" not in msg
    assert f"Redis {version or '(no redis_version in INFO)'} is older than 7.0" in msg


def _evicting_env(env: dict[str, str], url: str) -> dict[str, str]:
    return {**env, "STATESWEEP_BROKER_URL": url, "STATESWEEP_RESULT_BACKEND": url,
            "STATESWEEP_RUN_STORE_URL": url}


def test_worker_and_beat_refuse_a_redis_that_may_evict(
        pg_url: str, isolation: dict[str, str], tmp_path: Path) -> None:
    db = seed_postgres(pg_url, isolation, 2000)
    try:
        with own_redis(password="s3cret") as server:
            redis.Redis.from_url(server.url).config_set("maxmemory-policy", "allkeys-lru")
            env = _evicting_env(db.env, server.url)
            with pytest.raises(RuntimeError) as refused:
                start_worker(env, tmp_path, "evicting", ready_timeout=START_TIMEOUT).stop()
            beat = _run_beat(env, tmp_path)
    finally:
        db.engine.dispose()
    worker_out = str(refused.value)
    assert f"exited with {EXIT_SETTINGS}" in worker_out, worker_out
    assert beat.returncode == EXIT_SETTINGS, beat.stdout + beat.stderr
    for role, output in (("worker", worker_out), ("beat", beat.stdout + beat.stderr)):
        line = _the_line(output, role)
        assert f"run store STATESWEEP_RUN_STORE_URL=redis://:***@127.0.0.1:{server.port}/0" \
            in line
        assert "maxmemory-policy allkeys-lru may evict" in line
        assert "set maxmemory-policy noeviction" in line
        assert "s3cret" not in output and "Traceback" not in output, output


def test_worker_refuses_an_unreachable_run_store(
        pg_url: str, isolation: dict[str, str], tmp_path: Path) -> None:
    db = seed_postgres(pg_url, isolation, 2000)
    gone = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    try:
        with pytest.raises(RuntimeError) as refused:
            start_worker({**db.env, "STATESWEEP_RUN_STORE_URL": gone}, tmp_path, "nostore",
                         ready_timeout=START_TIMEOUT).stop()
    finally:
        db.engine.dispose()
    output = str(refused.value)
    assert f"exited with {EXIT_UNAVAILABLE}" in output, output
    line = _the_line(output, "worker")
    assert "run store STATESWEEP_RUN_STORE_URL=redis://:***@127.0.0.1:" in line
    assert "is unreachable: ConnectionError" in line and "s3cret" not in output


def _run_beat(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [CELERY, "-A", "workers", "beat", "-l", "INFO", "-s", str(tmp_path / "beat-schedule")]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=child_env(env), capture_output=True, text=True,
                              timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"beat started (still running after {START_TIMEOUT}s): {exc.stderr!r}")


def _the_line(output: str, role: str) -> str:
    refusal = [line for line in output.splitlines() if f"statesweep: {role} not started" in line]
    assert len(refusal) == 1, output
    return refusal[0]


# --- settings that contradict each other; the run store forms now accepted ---------------------


def test_worker_with_a_lock_ttl_past_the_visibility_timeout_exits_3(
        isolation: dict[str, str], tmp_path: Path) -> None:
    require("Redis", "127.0.0.1", 6379)
    env = {"STATESWEEP_BROKER_URL": REDIS_URL, "STATESWEEP_RESULT_BACKEND": REDIS_URL,
           "STATESWEEP_LOCK_TTL_SECONDS": "600", "STATESWEEP_RUN_TIMEOUT_SECONDS": "3600",
           **isolation}
    with pytest.raises(RuntimeError) as refused:
        start_worker(env, tmp_path, "ttl", ready_timeout=START_TIMEOUT).stop()
    output = str(refused.value)
    assert f"exited with {EXIT_SETTINGS}" in output, output
    lines = [line for line in output.splitlines() if "STATESWEEP_LOCK_TTL_SECONDS" in line]
    assert len(lines) == 1 and "'600'" in lines[0] and "VISIBILITY_TIMEOUT=90" in lines[0]
    assert "Traceback" not in output, output


@contextmanager
def socket_redis(tmp_path: Path) -> Iterator[str]:
    """A private redis-server listening only on a unix socket; yields its unix:// URL."""
    server = shutil.which("redis-server")
    if server is None:
        if CI:
            pytest.fail("redis-server is not installed (CI=true: a missing service fails)")
        pytest.skip("redis-server is not installed")
    path = tmp_path / "redis.sock"
    proc = subprocess.Popen([server, "--port", "0", "--unixsocket", str(path),
                             "--unixsocketperm", "700", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server not up"
            time.sleep(0.05)
        yield f"unix://{path}?db=0"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_unix_socket_run_store_serves_a_local_run(
        pg_url: str, isolation: dict[str, str], tmp_path: Path) -> None:
    db = seed_postgres(pg_url, isolation, 2000)
    try:
        with socket_redis(tmp_path) as url:
            env = {**db.env, "STATESWEEP_RUN_STORE_URL": url}
            check_run_store(Settings.from_env(env))  # a worker or beat would start on it
            run = subprocess.run([STATESWEEP, "cleanup", "--local"], cwd=ROOT,
                                 env=child_env(env), capture_output=True, text=True, timeout=60)
            keys = redis.Redis.from_url(url, decode_responses=True).keys(
                f"{isolation['STATESWEEP_KEY_PREFIX']}:*")
    finally:
        db.engine.dispose()
    assert run.returncode == EXIT_OK, run.stdout + run.stderr
    assert f"{isolation['STATESWEEP_KEY_PREFIX']}:runs" in keys, keys


def test_a_hash_tag_prefix_keeps_every_run_key_in_one_cluster_slot(
        pg_url: str, isolation: dict[str, str]) -> None:
    """Redis Cluster runs a script only on keys of one slot; a prefix with a hash tag hashes
    every key statesweep makes by the tag alone."""
    prefix = "{" + isolation["STATESWEEP_KEY_PREFIX"].replace(":", "_") + "}"
    db = seed_postgres(pg_url, {**isolation, "STATESWEEP_KEY_PREFIX": prefix}, 2000)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        run = subprocess.run([STATESWEEP, "cleanup", "--local"], cwd=ROOT,
                             env=child_env(db.env), capture_output=True, text=True, timeout=60)
        keys = client.keys(f"{prefix}*")
    finally:
        db.engine.dispose()
        for key in client.keys(f"{prefix}*"):
            client.delete(key)
    assert run.returncode == EXIT_OK, run.stdout + run.stderr
    assert len(keys) >= 3 and f"{prefix}:runs" in keys, keys
    assert len({key_slot(k.encode()) for k in keys}) == 1, keys
