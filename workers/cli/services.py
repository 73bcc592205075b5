"""How the CLI reaches the database, the broker and the run store: with short timeouts and few
retries, so an unreachable service is a clear error in seconds, never a hang.

Workers keep Celery's patient reconnects (workers.celery_app); a person at a terminal wants to
know now that Redis is down.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from workers.exceptions import SchemaError, StatesweepError
from workers.runs import RunRegistry, registry_for
from workers.settings import Settings, is_redis, is_redis_store, mask_url

if TYPE_CHECKING:  # dispatching a run needs neither Celery's worker side nor the database
    from celery import Celery
    from sqlalchemy import Engine

    from workers.identity import DatabaseIdentity
    from workers.schema import Tables

CONNECT_TIMEOUT = 3.0
# One quick retry: enough to ride out a blip, short enough to fail in seconds.
QUICK_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}


class ServiceUnavailable(StatesweepError):
    """A database, broker or run store could not be reached; the message names which."""


@contextmanager
def database(settings: Settings) -> Iterator[tuple[Engine, Tables]]:
    """An engine with a short connect timeout and the resolved tables; disposed on exit.

    Errors name the database (masked) and where its URL came from. Every command using this
    needs the tables to exist, so none creates a SQLite file that is not there (dry runs,
    status and doctor only read; `db upgrade` and `seed` create on purpose, without this)."""
    from sqlalchemy.exc import OperationalError

    from workers.db import make_engine
    from workers.schema import resolve_tables

    refuse_missing_sqlite_file(settings)
    engine = make_engine(settings.database_url, **_connect_args(settings.database_url))
    try:
        try:
            tables = resolve_tables(engine, settings.table_naming)
        except OperationalError as exc:
            raise ServiceUnavailable(
                f"the database {settings.database_origin} is unreachable") from (exc.orig or exc)
        except OSError as exc:  # e.g. the driver's TLS set-up: an ssl_ca file that is not there
            raise ServiceUnavailable(
                f"the database {settings.database_origin} cannot be reached") from exc
        except SchemaError as exc:
            raise SchemaError(f"{exc} (database {settings.database_origin})") from None
        yield engine, tables
    finally:
        engine.dispose()


def own_identity(settings: Settings) -> DatabaseIdentity:
    """The identity of the database this CLI's settings name (workers.identity), read before a
    run is sent so the coordinator can refuse one meant for another database. One line, with
    the URL masked, when the database does not exist or holds no state tables: nothing is
    sent, rather than a run the workers make on their own database."""
    from sqlalchemy.exc import DBAPIError

    from workers.db import make_engine
    from workers.identity import read_identity

    refuse_missing_sqlite_file(settings)
    engine = make_engine(settings.database_url, **_connect_args(settings.database_url))
    try:
        with engine.connect() as conn:
            identity = read_identity(conn, settings.table_naming)
    except DBAPIError as exc:
        cause = str(exc.orig or exc).strip().splitlines()
        if _no_such_database(exc):
            raise SchemaError(
                f"the database {settings.database_origin} does not exist on its server; point "
                "STATESWEEP_DATABASE_URL at the Airflow metadata database the workers clean; "
                "nothing was sent") from None
        raise ServiceUnavailable(
            f"the database {settings.database_origin} is unreachable: "
            f"{cause[0] if cause else type(exc.orig or exc).__name__}; nothing was sent"
        ) from None
    except OSError as exc:
        raise ServiceUnavailable(f"the database {settings.database_origin} cannot be reached: "
                                 f"{exc}; nothing was sent") from None
    finally:
        engine.dispose()
    if not identity.tables:
        raise SchemaError(
            f"the database {settings.database_origin} ({identity}) holds no "
            f"{'task_state or task_state_store' if settings.table_naming == 'auto' else 'state'}"
            " table to clean; point STATESWEEP_DATABASE_URL at the Airflow metadata database "
            "the workers clean (or set STATESWEEP_TABLE_NAMING); nothing was sent")
    return identity


def _no_such_database(exc: Exception) -> bool:
    """PostgreSQL's invalid_catalog_name (3D000; at connect psycopg gives no SQLSTATE, only the
    message) and MySQL/MariaDB's 1049 Unknown database."""
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) == "3D000":
        return True
    args = getattr(orig, "args", ())
    if args and args[0] == 1049:
        return True
    return re.search(r'database "[^"]*" does not exist', str(orig or exc)) is not None


def refuse_missing_sqlite_file(settings: Settings) -> None:
    """SQLite creates a missing file on connect; a command that only reads must not."""
    from sqlalchemy.engine import make_url

    from workers.db import normalise_url

    url = make_url(normalise_url(settings.database_url))
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise SchemaError(f"the SQLite database file {url.database} does not exist (database "
                          f"{settings.database_origin}); nothing was created")


def _connect_args(url: str) -> dict[str, Any]:
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme in ("postgresql", "postgres", "mysql", "mariadb"):
        return {"connect_args": {"connect_timeout": int(CONNECT_TIMEOUT)}}
    return {}


def client_app(settings: Settings) -> Celery:
    """A Celery client (no tasks, no database) that gives up on a dead broker in seconds."""
    from workers.celery_app import build_app

    app = build_app(settings, include_tasks=False)
    conf = app.conf
    app.conf.update(
        broker_connection_timeout=CONNECT_TIMEOUT,
        task_publish_retry_policy=QUICK_RETRY,
        redis_socket_connect_timeout=CONNECT_TIMEOUT,
        broker_transport_options={**conf.broker_transport_options,
                                  "socket_connect_timeout": CONNECT_TIMEOUT},
        result_backend_transport_options={**conf.result_backend_transport_options,
                                          "retry_policy": QUICK_RETRY},
    )
    return app


def check_broker(app: Celery, settings: Settings, connection: Any = None) -> None:
    """Connect to the broker once (on *connection*, a producer's that will send, where one is
    given: one connection, not two); ServiceUnavailable naming it (password masked) if not."""
    try:
        if connection is not None:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5,
                                         timeout=CONNECT_TIMEOUT)
            return
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5,
                                   timeout=CONNECT_TIMEOUT)
    except Exception as exc:
        raise ServiceUnavailable(
            f"the broker STATESWEEP_BROKER_URL={mask_url(settings.broker_url)} is unreachable"
        ) from exc


def ping_redis(url: str, what: str) -> None:
    """PING a Redis server with short timeouts; ServiceUnavailable naming *what* if it fails."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT,
                                  socket_timeout=CONNECT_TIMEOUT)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"the {what}={mask_url(url)} is unreachable") from exc
    finally:
        client.close()


def check_result_backend(settings: Settings) -> None:
    """PING a Redis result backend, unless it is the run store, which answered already."""
    if (is_redis(settings.result_backend)
            and settings.result_backend != settings.effective_run_store_url):
        ping_redis(settings.result_backend, "result backend STATESWEEP_RESULT_BACKEND")


def run_store_variable(settings: Settings) -> str:
    """The variable the run store's URL comes from, for error messages."""
    if settings.run_store_url:
        return "STATESWEEP_RUN_STORE_URL"
    if is_redis(settings.result_backend):
        return "STATESWEEP_RESULT_BACKEND"
    return "STATESWEEP_BROKER_URL" if is_redis(settings.broker_url) else "STATESWEEP_RUN_STORE_URL"


def run_store(settings: Settings) -> RunRegistry:
    """The run registry the workers use, after checking it answers."""
    url = settings.effective_run_store_url
    if is_redis_store(url):
        ping_redis(url, f"run store {run_store_variable(settings)}")
    return registry_for(url, settings.key_prefix)


def shared_run_store(settings: Settings) -> RunRegistry:
    """The run store, refusing ``memory://``: another process's runs are invisible there."""
    if not is_redis_store(settings.effective_run_store_url):
        raise ServiceUnavailable(
            "runs are recorded in memory:// (one process only), so this command cannot see the "
            "workers' runs; set STATESWEEP_RUN_STORE_URL (or STATESWEEP_RESULT_BACKEND) to the "
            "Redis the workers use")
    return run_store(settings)
