"""Every setting with a bad value stops the CLI at start-up, and one of each kind of check (a
number, a URL, a cross-setting bound, a schedule, beat's selection, an import, an Airflow
variable) stops the worker and beat too, which read their settings through the same check: a
non-zero exit, one clear line naming the variable and its value (password masked), no
traceback, and nothing deleted — though a coordinator message waits on the queue and the CLI
command used (`statesweep cleanup --local`) deletes when its settings are good."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine

from tests.processes import CELERY, ROOT, child_env
from tests.reliability.conftest import Scenario, Seeder
from tests.reliability.faults import own_redis
from tests.reliability.pipeline import Counts, Pipeline, counts, pipeline_env, seed_database
from tests.services import fresh_postgres_database, unique
from workers.schema import Tables
from workers.seed import SeedSpec

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(90)]

STATESWEEP = str(Path(CELERY).with_name("statesweep"))
EXIT_SETTINGS = 3
SECRET = "Pw-not-for-output"

# (variable, bad value, what the message must say)
BAD_SETTINGS = [
    ("STATESWEEP_CLEANUP_BATCH_SIZE", "-5", "must not be negative"),
    ("STATESWEEP_LOCK_TTL_SECONDS", "ten", "must be a whole number"),
    ("STATESWEEP_CHUNK_TIME_LIMIT", "2.5", "must be a whole number"),
    ("STATESWEEP_LOCK_TIMEOUT_MS", "0", "must be a positive integer"),
    ("STATESWEEP_DEFAULT_RETENTION_DAYS", "-1", "must not be negative"),
    ("STATESWEEP_CHUNK_QUEUE", "", "must not be empty"),
    ("STATESWEEP_KEY_PREFIX", "my prefix", "must be a non-empty name"),
    ("STATESWEEP_DATABASE_URL", "postgres//127.0.0.1/db", "is not a database URL"),
    ("STATESWEEP_DATABASE_URL", f"oracle://sw:{SECRET}@127.0.0.1/db", "is not supported"),
    ("STATESWEEP_BROKER_URL", f"redis://sw:{SECRET}@127.0.0.1:port/0", "is not a URL"),
    ("STATESWEEP_RUN_STORE_URL", "http://127.0.0.1:6379/0", "must be a redis://"),
    ("STATESWEEP_STATE_BACKEND", "no_such_module.Backend", "cannot be imported"),
    ("STATESWEEP_COORDINATOR_SCHEDULE", "every tuesday", "five-field crontab"),
    ("STATESWEEP_VISIBILITY_TIMEOUT", "50", "at least twice"),
    ("STATESWEEP_LOG_LEVEL", "LOUD", "must be one of"),
    ("AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE", "1e3", "must be a whole number"),
    # Issue: these passed validation and `inf` crashed beat with an OverflowError.
    ("STATESWEEP_COORDINATOR_SCHEDULE", "inf", "finite"),
    ("STATESWEEP_ORPHAN_SCHEDULE", "nan", "finite"),
    ("STATESWEEP_COORDINATOR_SCHEDULE", "1e309", "finite"),
    # Beat's selection: refused at start, not at the first trigger.
    ("STATESWEEP_CLEAN_GRACE", "soon", "must be a duration"),
    ("STATESWEEP_DAG_IDS", "etl,,billing", "must name dag ids"),
]


#: The bad settings also given to a worker and to beat (one of each kind of check).
EVERY_PROCESS = {
    ("STATESWEEP_CLEANUP_BATCH_SIZE", "-5"),
    ("STATESWEEP_DATABASE_URL", f"oracle://sw:{SECRET}@127.0.0.1/db"),
    ("STATESWEEP_BROKER_URL", f"redis://sw:{SECRET}@127.0.0.1:port/0"),
    ("STATESWEEP_RUN_STORE_URL", "http://127.0.0.1:6379/0"),
    ("STATESWEEP_STATE_BACKEND", "no_such_module.Backend"),
    ("STATESWEEP_VISIBILITY_TIMEOUT", "50"),
    ("AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE", "1e3"),
    ("STATESWEEP_COORDINATOR_SCHEDULE", "inf"),
    ("STATESWEEP_CLEAN_GRACE", "soon"),
}
assert EVERY_PROCESS <= {(v, x) for v, x, _ in BAD_SETTINGS}


@dataclass
class Deployment:
    env: dict[str, str]
    engine: Engine
    tables: Tables
    redis_url: str
    control_queue: str

    def counts(self) -> Counts:
        return counts(self.engine, self.tables)

    def pending(self) -> int:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return int(client.llen(self.control_queue))
        finally:
            client.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A seeded database and a private broker holding one coordinator message that any
    worker which (wrongly) started would consume and run."""
    with fresh_postgres_database() as url, own_redis() as server:
        spec = SeedSpec(rows=5000)
        engine, tables = seed_database(url, spec)
        isolation = {"STATESWEEP_KEY_PREFIX": f"sw:{unique('bad')}",
                     "STATESWEEP_CONTROL_QUEUE": "sw.bad.control",
                     "STATESWEEP_CHUNK_QUEUE": "sw.bad.chunks"}
        env = pipeline_env(url, server.url, isolation)
        p = Pipeline(env, engine, tables, spec, tmp_path_factory.mktemp("bad"))
        with p.client() as app:
            p.trigger(app, source="beat")
        try:
            yield Deployment(env, engine, tables, server.url, p.settings.control_queue)
        finally:
            engine.dispose()


def _start_up(env: dict[str, str], tmp: Path, only: tuple[str, ...] = ("worker", "beat", "cli"),
              ) -> dict[str, subprocess.CompletedProcess[str]]:
    """Start worker, beat and CLI (or those *only* names) side by side; each must exit on its
    own within 30 s."""
    every = {
        "worker": [CELERY, "-A", "workers", "worker", "-P", "solo", "--without-gossip",
                   "--without-mingle", "-Q", env["STATESWEEP_CONTROL_QUEUE"]],
        "beat": [CELERY, "-A", "workers", "beat", "-s", str(tmp / "beat-schedule"),
                 "--pidfile", str(tmp / "beat.pid")],
        "cli": [STATESWEEP, "cleanup", "--local"],
    }
    commands = {name: cmd for name, cmd in every.items() if name in only}
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=child_env(env), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, cmd in commands.items()}
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=30)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return done


@pytest.mark.parametrize(("variable", "value", "says"), BAD_SETTINGS,
                         ids=[f"{v}={x!r}"[:60] for v, x, _ in BAD_SETTINGS])
def test_bad_setting_stops_worker_beat_and_cli_before_anything_is_deleted(
        deployment: Deployment, variable: str, value: str, says: str, tmp_path: Path,
        scenario: Scenario) -> None:
    before = deployment.counts()
    scenario.before(before)
    env = {**deployment.env, variable: value}
    results = _start_up(env, tmp_path, ("worker", "beat", "cli")
                        if (variable, value) in EVERY_PROCESS else ("cli",))
    after = deployment.counts()
    scenario.after(after)
    scenario.note(exit_codes={k: r.returncode for k, r in results.items()})
    for name, r in results.items():
        output = r.stdout + r.stderr
        assert r.returncode == EXIT_SETTINGS, f"{name}: exit {r.returncode}\n{output}"
        assert f"{variable}=" in output, f"{name} does not name {variable}:\n{output}"
        assert says in output, f"{name}:\n{output}"
        assert "Traceback" not in output, f"{name} printed a traceback:\n{output}"
        assert SECRET not in output, f"{name} printed the password:\n{output}"
    assert after == before
    assert deployment.pending() == 1, "the queued coordinator message must not be consumed"


def test_the_same_cli_command_deletes_with_good_settings(
        pg_url: str, seeded: Seeder, scenario: Scenario, tmp_path: Path) -> None:
    """The control: with good settings `statesweep cleanup --local` does delete, so an
    unchanged row count above is the settings check's doing."""
    engine, tables = seeded(SeedSpec(rows=5000))
    env = pipeline_env(pg_url, "memory://", {}, run_store_url="memory://")
    before = counts(engine, tables)
    scenario.before(before)
    r = subprocess.run([STATESWEEP, "cleanup", "--local"], cwd=ROOT, env=child_env(env),
                       capture_output=True, text=True, timeout=60)
    after = counts(engine, tables)
    scenario.after(after)
    assert r.returncode == 0, r.stdout + r.stderr
    assert before.expired > 0 and after.expired == 0
    assert after.live == before.live



# Every bad URL, the Airflow way: (where it is set, URL, what the line says).
BAD_AIRFLOW_URLS = [
    ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"mssql+pyodbc://sa:{SECRET}@127.0.0.1/airflow",
     "scheme 'mssql' is not supported"),
    ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"postgresql+asyncpg://a:{SECRET}@127.0.0.1/airflow",
     "driver 'asyncpg' is not supported"),
    ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"mysql+mysqldb://a:{SECRET}@127.0.0.1:33o6/airflow",
     "is not a database URL"),
    ("airflow.cfg", f"postgresql+psycopg2://a:{SECRET}@127.0.0.1:5432", "names no database"),
    ("airflow.cfg", f"oracle+cx_oracle://a:{SECRET}@127.0.0.1/airflow",
     "scheme 'oracle' is not supported"),
]


@pytest.mark.parametrize(("where", "url", "says"), BAD_AIRFLOW_URLS,
                         ids=[f"{w}:{s}"[:60] for w, _, s in BAD_AIRFLOW_URLS])
def test_every_bad_airflow_url_is_one_line_from_worker_beat_and_cli(
        deployment: Deployment, where: str, url: str, says: str, tmp_path: Path,
        scenario: Scenario) -> None:
    """Airflow's connection string (its variable, or airflow.cfg) with a scheme, driver, port
    or database statesweep cannot serve: one line naming it (masked) and what is supported,
    the settings exit code, no traceback, from all three; nothing consumed or deleted."""
    before = deployment.counts()
    scenario.before(before)
    env = {k: v for k, v in deployment.env.items() if k != "STATESWEEP_DATABASE_URL"}
    env["AIRFLOW_HOME"] = str(tmp_path)
    if where == "airflow.cfg":
        (tmp_path / "airflow.cfg").write_text(f"[database]\nsql_alchemy_conn = {url}\n")
        where = f"airflow.cfg {tmp_path / 'airflow.cfg'} [database] sql_alchemy_conn"
    else:
        env[where] = url
    results = _start_up(env, tmp_path)
    after = deployment.counts()
    scenario.after(after)
    for name, r in results.items():
        output = (r.stdout + r.stderr).strip()
        assert r.returncode == EXIT_SETTINGS, f"{name}: exit {r.returncode}\n{output}"
        assert len(output.splitlines()) == 1, f"{name} printed more than one line:\n{output}"
        assert f"{where}={url.replace(SECRET, '***')!r}" in output, f"{name}:\n{output}"
        assert says in output, f"{name}:\n{output}"
        if "not supported" in says:  # the line says what is supported
            assert "statesweep serves postgresql://" in output, f"{name}:\n{output}"
        assert "Traceback" not in output and SECRET not in output, f"{name}:\n{output}"
    assert after == before
    assert deployment.pending() == 1, "the queued coordinator message must not be consumed"
