"""Shared fixtures: a fresh database per test on each dialect, Redis, settings built per test.

Each test gets its own database (PostgreSQL, MariaDB) or file (SQLite), its own Redis key
prefix and its own Celery queue names, so tests never see each other's rows or messages. That is
what lets `make test` run the suite on several processes (pytest-xdist, ``--dist loadgroup``).
The tests that kill, partition or restart processes and wait for recovery (tests/reliability,
and any test marked ``serial``) run one at a time in one lane, the group ``serial``, beside the
rest: they load the machine most, and one of them at a time keeps their recovery bounds honest.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.brokers import broker  # noqa: F401 - the broker fixture, for every suite
from tests.mariadb_replica import mariadb_replica  # noqa: F401 - private primary + replica
from tests.services import (
    REDIS_URL,
    fresh_mariadb_database,
    fresh_postgres_database,
    require,
    unique,
)
from tests.standby import standby  # noqa: F401 - a real primary + streaming standby fixture
from workers.db import db_now, make_engine
from workers.schema import Tables, build_tables, upgrade
from workers.seed import SeedCounts, SeedSpec, seed
from workers.settings import Settings

DIALECTS = ["sqlite", "postgresql", "mariadb"]
SERIAL_DIRS = ("reliability",)
# Modules of tests/reliability that neither kill, partition nor restart anything, nor wait on a
# recovery bound: they check input, settings, secrets and SQL, and run beside the rest.
PARALLEL_MODULES = ("test_bad_input.py", "test_bad_settings.py", "test_secrets.py",
                    "test_sql_safety.py")


def _layout_combination_runs(item: pytest.Item) -> bool:
    """Whether a test's (naming, layout) parameters are a combination it runs: statesweep's own
    (seed) schema has only the 3.3 layout; a test marked ``newest_airflow_layout`` (a planner
    or a flow that reads no column 3.4 changed) runs Airflow's tables in 3.4's layout only, and
    leaves 3.3's to the tests that read the changed columns (schema, store, cleanup SQL) and to
    each planner's whole-run test."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    naming, layout = params.get("naming"), params.get("layout")
    if layout is None:
        return True
    if naming == "seed":
        return bool(layout == "3.3")
    if naming == "airflow" and layout == "3.3":
        return not (item.get_closest_marker("newest_airflow_layout")
                    and not item.get_closest_marker("every_airflow_layout"))
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the (naming, layout) combinations a test does not run (_layout_combination_runs).
    Put every test of SERIAL_DIRS, and every test marked ``serial``, in the one serial lane
    (an xdist group runs on a single process, in order), first: the lane is the longest unit of
    work, so it starts at once while the other processes share the rest."""
    dropped = [i for i in items if not _layout_combination_runs(i)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        gone = set(map(id, dropped))
        items[:] = [i for i in items if id(i) not in gone]
    serial = [i for i in items
              if i.get_closest_marker("serial") or (i.path.parent.name in SERIAL_DIRS
                                                     and i.path.name not in PARALLEL_MODULES)]
    for item in serial:
        item.add_marker(pytest.mark.xdist_group("serial"))
    chosen = set(map(id, serial))
    items[:] = serial + [i for i in items if id(i) not in chosen]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    with fresh_mariadb_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture(params=DIALECTS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL, once per dialect."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
    elif request.param == "postgresql":
        with fresh_postgres_database() as url:
            yield url
    else:
        with fresh_mariadb_database() as url:
            yield url


@pytest.fixture(params=["seed", "airflow"])
def naming(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["3.3", "3.4"])
def layout(request: pytest.FixtureRequest) -> str:
    """Airflow's task-state layout: 3.3 (map_index) or 3.4 (region_index + region_id). Only
    Airflow's tables come in 3.4's; statesweep's own (seed) schema is 3.3's alone (the seed-3.4
    combination is deselected: pytest_collection_modifyitems)."""
    return str(request.param)


@pytest.fixture
def redis_url() -> str:
    require("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    """Settings.from_env over an explicit dict: ``make_settings(database_url=..., ...)``."""
    def build(**overrides: object) -> Settings:
        env = {f"STATESWEEP_{k.upper()}": str(v) for k, v in overrides.items()}
        return Settings.from_env(env)
    return build


@pytest.fixture
def isolation() -> dict[str, str]:
    """Per-test Redis key prefix and queue names, as STATESWEEP_* environment entries."""
    tag = unique("t")
    return {
        "STATESWEEP_KEY_PREFIX": f"sw:{tag}",
        "STATESWEEP_CONTROL_QUEUE": f"sw.{tag}.control",
        "STATESWEEP_CHUNK_QUEUE": f"sw.{tag}.chunks",
    }


def create_schema(url: str, naming: str = "seed", layout: str = "3.3") -> tuple[Engine, Tables]:
    engine = make_engine(url)
    upgrade(engine, naming, layout)
    return engine, build_tables(naming, layout)


def database_now(engine: Engine) -> dt.datetime:
    with engine.connect() as conn:
        return db_now(conn)


@dataclass(frozen=True)
class SeededPostgres:
    """A fresh PostgreSQL database seeded with *spec*, and the STATESWEEP_* env that points
    workers and the CLI at it and at the test Redis, with this test's prefix and queues."""

    env: dict[str, str]
    engine: Engine
    tables: Tables
    spec: SeedSpec
    counts: SeedCounts


def seed_postgres(pg_url: str, isolation: dict[str, str], rows: int) -> SeededPostgres:
    require("Redis", "127.0.0.1", 6379)
    engine, tables = create_schema(pg_url)
    spec = SeedSpec(rows=rows)
    counts = seed(engine, tables, spec, database_now(engine))
    env = {"STATESWEEP_DATABASE_URL": pg_url, "STATESWEEP_BROKER_URL": REDIS_URL,
           "STATESWEEP_RESULT_BACKEND": REDIS_URL, **isolation}
    return SeededPostgres(env, engine, tables, spec, counts)


@pytest.fixture(autouse=True)
def no_airflow_config_of_the_developer(monkeypatch: pytest.MonkeyPatch,
                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    """Settings read Airflow's configuration too: a developer's AIRFLOW__* variables or
    ~/airflow/airflow.cfg must not configure a test. Tests that want one set their own."""
    import os

    for name in [n for n in os.environ if n.startswith("AIRFLOW_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path_factory.getbasetemp() / "no-airflow-home"))
