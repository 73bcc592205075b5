"""Passwords in the database and broker URLs never leave the process that needs them: not in
worker or beat logs (at DEBUG), not in CLI output (doctor, status, cleanup, errors), not in task
arguments or results in the result backend, not in the run store."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.processes import CELERY, ROOT, WorkerProcess, child_env, start_worker, wait_for_run
from tests.reliability.conftest import Scenario
from tests.reliability.faults import own_redis
from tests.reliability.pipeline import Pipeline, client, pipeline_env, seed_database
from tests.services import unique
from workers.seed import SeedSpec
from workers.settings import Settings

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(90)]

STATESWEEP = str(Path(CELERY).with_name("statesweep"))


@pytest.fixture
def secret_pg_url(pg_url: str) -> Iterator[str]:
    """This test's database, reached as a role with a password (pg_hba may trust 127.0.0.1 and
    ignore it; what matters is that the password is in the URL statesweep is given)."""
    role, password = unique("sw_secret"), "Pw-" + unique("pg")
    admin = create_engine(make_url(pg_url).set(drivername="postgresql+psycopg"),
                          isolation_level="AUTOCOMMIT")
    database = make_url(pg_url).database
    with admin.connect() as conn:
        # Identifiers and the password are generated above, never taken from input.
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        conn.execute(text(f'GRANT ALL ON DATABASE "{database}" TO {role}'))
        conn.execute(text(f"GRANT ALL ON SCHEMA public TO {role}"))
    try:
        yield make_url(pg_url).set(username=role, password=password).render_as_string(
            hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


def _redis_dump(url: str) -> str:
    """Every key and value in the private Redis: queues, results (with args), run store."""
    r = redis.Redis.from_url(url, decode_responses=True)
    parts: list[str] = []
    try:
        for key in r.scan_iter(count=1000):
            kind = str(r.type(key))
            value: object = (r.get(key) if kind == "string" else r.hgetall(key) if kind == "hash"
                             else r.lrange(key, 0, -1) if kind == "list"
                             else r.smembers(key) if kind == "set" else r.zrange(key, 0, -1))
            parts.append(f"{key!r} {value!r}")
    finally:
        r.close()
    return "\n".join(parts)


def _cli(env: dict[str, str], *args: str) -> str:
    r = subprocess.run([STATESWEEP, *args], cwd=ROOT, env=child_env(env), capture_output=True,
                       text=True, timeout=60)
    return f"$ statesweep {' '.join(args)} (exit {r.returncode})\n{r.stdout}{r.stderr}"


def test_passwords_never_appear_in_logs_output_or_task_messages(
        secret_pg_url: str, isolation: dict[str, str], tmp_path: Path, scenario: Scenario,
        request: pytest.FixtureRequest) -> None:
    pg_password = make_url(secret_pg_url).password
    assert pg_password
    redis_password = "Pw-" + unique("redis")
    spec = SeedSpec(rows=20_000)
    engine, tables = seed_database(secret_pg_url, spec)
    request.addfinalizer(engine.dispose)
    with own_redis(password=redis_password) as server:
        env = pipeline_env(secret_pg_url, server.url, isolation, log_level="DEBUG",
                           cleanup_batch_size=1000, coordinator_schedule=1)
        p = Pipeline(env, engine, tables, spec, tmp_path)
        scenario.before(p.counts())
        started: list[WorkerProcess] = []
        outputs: list[str] = []
        beat_log = tmp_path / "beat.log"
        try:
            started += [start_worker(env, tmp_path, "a"), start_worker(env, tmp_path, "b")]
            outputs.append(_cli(env, "doctor"))
            outputs.append(_cli(env, "cleanup", "--dry-run"))
            outputs.append(_cli(env, "cleanup", "--wait"))
            outputs.append(_cli(env, "status"))
            with client(Settings.from_env(env)) as app:
                # A failing task: its error and arguments land in the result backend too.
                failed = p.send_chunk(app, run_id="nope", chunk=1, kind="ids", lo=1, hi=10,
                                      cutoff="x")
                with pytest.raises(Exception, match="cutoff"):
                    failed.get(timeout=30)
            with open(beat_log, "wb") as out:
                beat = subprocess.Popen(
                    [CELERY, "-A", "workers", "beat", "-l", "DEBUG", "-s",
                     str(tmp_path / "beat-schedule"), "--pidfile", str(tmp_path / "beat.pid")],
                    cwd=ROOT, env=child_env(env), stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            try:
                time.sleep(4)  # a few beats: each sends a coordinator, skipped or run
            finally:
                os.killpg(beat.pid, signal.SIGTERM)
                beat.wait(timeout=20)
            run_id = p.registry.recent(1)[0].run_id
            wait_for_run(env, run_id, timeout=60)
            # Errors print URLs too: a database and a broker that do not answer.
            broken = {**env, "STATESWEEP_DATABASE_URL": secret_pg_url.replace(":5432/", ":1/"),
                      "STATESWEEP_BROKER_URL": server.url.replace(str(server.port), "1")}
            outputs.append(_cli(broken, "doctor"))
            outputs.append(_cli(broken, "cleanup", "--local"))
            dump = _redis_dump(server.url)
        finally:
            for w in started:
                w.stop()
        logs = p.worker_logs() + beat_log.read_text(errors="replace")
    after = p.counts()
    scenario.after(after)
    everything = "\n".join([logs, *outputs, dump])
    scenario.note(bytes_scanned=len(everything))
    assert "chunk_deleted" in logs and "celery-task-meta-" in dump  # there was plenty to leak
    assert "Sending due task" in logs, "beat ran and logged"
    assert ":***@" in outputs[0], "doctor shows the URLs, masked"
    for secret in (pg_password, redis_password):
        leaks = [line for line in everything.splitlines() if secret in line]
        assert leaks == [], f"password leaked in {len(leaks)} lines, e.g. {leaks[:3]}"
    assert after.expired == 0


# Passwords in the two URL forms kombu, psycopg and redis-py accept beyond userinfo: a query
# option (?password=) and a ;-separated failover list with a password per URL.
QUERY_PW, FAILOVER_PW1, FAILOVER_PW2 = "Pw-query-7f3", "Pw-first-9a1", "Pw-second-c42"


@pytest.mark.parametrize(("url", "masked"), [
    (f"postgresql://postgres@host/db?password={QUERY_PW}",
     "postgresql://postgres@host/db?password=***"),
    (f"redis://h:6379/0?socket_timeout=3&password={QUERY_PW}&db=1",
     "redis://h:6379/0?socket_timeout=3&password=***&db=1"),
    (f"amqp://u:{FAILOVER_PW1}@h1//;amqp://u:{FAILOVER_PW2}@h2//",
     "amqp://u:***@h1//;amqp://u:***@h2//"),
    (f"redis://:{FAILOVER_PW1}@h1:6379/0;redis://h2:6379/0?password={FAILOVER_PW2}",
     "redis://:***@h1:6379/0;redis://h2:6379/0?password=***"),
    (f"postgresql://u:{QUERY_PW}@h:bad/x?password={FAILOVER_PW1}",
     "postgresql://u:***@h:bad/x?password=***"),
    # An underscore in the scheme: urlsplit then parses no netloc, so no password either.
    (f"oracle+cx_oracle://u:{QUERY_PW}@h/airflow", "oracle+cx_oracle://u:***@h/airflow"),
])
def test_mask_url_masks_query_string_passwords_and_every_failover_url(url: str,
                                                                     masked: str) -> None:
    from workers.settings import mask_secrets, mask_url

    assert mask_url(url) == masked
    assert mask_secrets(f"error: cannot reach {url} now") == f"error: cannot reach {masked} now"


def test_query_string_and_failover_passwords_never_appear_in_cli_output(
        pg_url: str, isolation: dict[str, str], tmp_path: Path) -> None:
    """doctor (settings and checks), a dry run, and the errors of unreachable services: every
    place a URL is shown, with the password in the query string and in each failover URL."""
    db_url = f"{pg_url}?password={QUERY_PW}"  # PostgreSQL trusts 127.0.0.1: it connects
    env = {**isolation, "STATESWEEP_DATABASE_URL": db_url,
           "STATESWEEP_BROKER_URL": (f"redis://:{FAILOVER_PW1}@127.0.0.1:1/0;"
                                     f"redis://:{FAILOVER_PW2}@127.0.0.1:2/0"),
           "STATESWEEP_RESULT_BACKEND": f"redis://127.0.0.1:1/0?password={QUERY_PW}",
           "STATESWEEP_RUN_STORE_URL": f"redis://127.0.0.1:1/0?password={QUERY_PW}",
           "AIRFLOW_HOME": str(tmp_path)}
    broken_db = {**env, "STATESWEEP_DATABASE_URL": db_url.replace(":5432/", ":1/")}
    outputs = [_cli(env, "doctor"), _cli(env, "doctor", "--format", "json"),
               _cli(env, "cleanup", "--dry-run"), _cli(broken_db, "cleanup", "--dry-run"),
               _cli(env, "cleanup"), _cli(env, "status"),
               _cli({**env, "STATESWEEP_BATCH_SIZE": "5"}, "status")]
    everything = "\n".join(outputs)
    assert "password=***" in outputs[0] and ":***@127.0.0.1:2/0" in outputs[0], outputs[0]
    assert "is unreachable" in outputs[3], outputs[3]
    for secret in (QUERY_PW, FAILOVER_PW1, FAILOVER_PW2):
        leaks = [line for line in everything.splitlines() if secret in line]
        assert leaks == [], f"password leaked in {len(leaks)} lines, e.g. {leaks[:3]}"
