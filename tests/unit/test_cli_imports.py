"""An empty `statesweep cleanup --wait` is mostly process start and imports (bench/fixed_cost.py
times it): the CLI's path to dispatching a run imports neither SQLAlchemy nor the pipeline, and
Celery only when it sends. These tests check what is imported, in a fresh interpreter each;
they time nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from workers import db, db_urls

#: What dispatching and following a run never needs: the database and the pipeline.
DATABASE_AND_PIPELINE = ("sqlalchemy", "psycopg", "pymysql", "workers.schema", "workers.db",
                         "workers.cleanup", "workers.coordinator", "workers.window",
                         "workers.chunk", "workers.planners.blocks", "workers.planners.expiry",
                         "workers.store", "fakeredis")

ENV = {"STATESWEEP_DATABASE_URL": "postgresql://airflow:secret@db.example:5432/airflow",
       "STATESWEEP_BROKER_URL": "redis://127.0.0.1:6379/0",
       "STATESWEEP_RESULT_BACKEND": "redis://127.0.0.1:6379/0"}


def imported_after(code: str, watch: tuple[str, ...]) -> list[str]:
    """Which of *watch* are in sys.modules after running *code* in a fresh interpreter."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps([m for m in {watch!r} if m in sys.modules]))")
    env = {"PATH": "/usr/bin:/bin", **ENV}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_importing_the_cli_imports_no_database_celery_or_redis() -> None:
    found = imported_after("import workers.cli",
                           (*DATABASE_AND_PIPELINE, "celery", "kombu", "redis", "structlog",
                            "workers.cli.doctor", "workers.cli.status", "importlib.metadata"))
    assert found == []


def test_the_dispatch_path_imports_no_database() -> None:
    """What `cleanup --wait` loads before its first message: settings for a PostgreSQL URL
    (the driver looked up, not imported; the built-in state backend not imported), the
    command, dispatching, following, rendering, the watch and the Celery client."""
    code = ("from workers.settings import Settings\n"
            "Settings.from_env()\n"
            "import workers.cli.cleanup, workers.cli.dispatch, workers.cli.progress\n"
            "import workers.cli.render, workers.cli.stalls, workers.cli.watch\n"
            "import workers.cli.services, workers.run_ids, workers.selection\n"
            "from workers.selection import Selection\n"
            "Selection.from_args(clean_before_timestamp='2026-01-01T00:00:00')\n"
            "from workers.cli.services import client_app\n"
            "from workers.settings import get_settings\n"
            "client_app(get_settings())\n")
    assert imported_after(code, DATABASE_AND_PIPELINE) == []


def test_a_command_imports_its_own_module_only() -> None:
    code = ("from workers.cli import main\n"
            "try:\n    main(['cleanup', '--help'])\nexcept SystemExit:\n    pass\n")
    found = imported_after(code, ("workers.cli.cleanup", "workers.cli.doctor",
                                  "workers.cli.status", "workers.cli.demo", "sqlalchemy"))
    assert found == ["workers.cli.cleanup"]


def test_every_command_is_found_by_name_without_listing_them_all() -> None:
    from workers.cli import COMMANDS, LazyGroup, cli

    fresh = LazyGroup(name="t")
    import click

    for name in sorted(cli.commands):
        command = fresh.get_command(click.Context(fresh), name)
        assert command is cli.commands[name]
    assert fresh.get_command(click.Context(fresh), "no-such-command") is None
    assert {m for m, _ in COMMANDS} <= fresh._loaded


def test_the_built_in_state_backend_settings_skip_importing_is_a_backend() -> None:
    """Settings trust statesweep's own backend without importing it; this holds it to the
    check they skip: a class with cleanup()."""
    from workers.settings import METASTORE_BACKEND, import_string

    backend = import_string(METASTORE_BACKEND)
    assert isinstance(backend, type) and callable(backend.cleanup)


URLS = [
    "postgresql://u:p@h:5432/airflow", "postgres://u@h/airflow", "postgresql+psycopg2://h/a",
    "postgresql://u:p%40ss@[::1]:5432/airflow", "mysql://u:p@h:3306/airflow",
    "mariadb+mysqldb://u@h/a", "mysql+mysqlconnector://h/a", "sqlite:////tmp/state.db",
    "sqlite:///relative.db", "sqlite:///:memory:", "sqlite://", "postgresql://h:5432/",
    "postgresql://h:54x2/airflow", "postgresql://h:/airflow", "oracle://h/db",
    "postgresql+asyncpg://h/db", "not a url", "postgresql://h/a?sslmode=require",
    "postgresql://h/a?nosuchoption=1", "mysql://u@h/a?charset=utf8mb4", "postgresql:///a",
]


@pytest.mark.parametrize("url", URLS)
def test_the_plain_url_check_agrees_with_the_full_one(url: str) -> None:
    """check_database_url skips SQLAlchemy for plain URLs; every URL gets the verdict (and
    the message) the full check gives."""
    def verdict(check: object) -> str:
        try:
            check(url)  # type: ignore[operator]
        except ValueError as exc:
            return f"error: {exc}"
        return "ok"

    assert verdict(db_urls.check_database_url) == verdict(db.check_connect_options)


def test_a_missing_driver_is_named_on_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pymysql" else real(name, *a))
    with pytest.raises(ValueError, match="needs PyMySQL"):
        db_urls.check_database_url("mariadb://u:secret@db/airflow")
