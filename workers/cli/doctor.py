"""`statesweep doctor`: is everything a cleanup run needs there and answering?

Each check is independent and bounded by short timeouts, so a dead Redis or database is
reported in seconds. A failure makes the command's exit code unhealthy; a warning does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy import Engine, inspect

from workers.cli.base import FORMAT, echo_json, is_verbose, load_settings
from workers.cli.services import (
    ServiceUnavailable,
    check_broker,
    client_app,
    database,
    ping_redis,
)
from workers.schema import Tables
from workers.settings import Settings, is_redis, mask_url

if TYPE_CHECKING:
    from celery import Celery

CONTROL_TIMEOUT = 1.5  # seconds workers get to answer a ping or an inspect


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or getattr(exc, "orig", None) or exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def index_check(engine: Engine, tables: Tables) -> Check:
    """Planning and dry runs walk the expires_at index; without it every run scans the table."""
    table = tables.task_state.name
    for ix in inspect(engine).get_indexes(table):
        if ix["column_names"] and ix["column_names"][0] == "expires_at":
            return Check("expires_at index", "ok", f"{ix['name']} on {table}(expires_at)")
    concurrently = "CONCURRENTLY " if engine.dialect.name == "postgresql" else ""
    return Check("expires_at index", "warn",
                 f"no index on {table}.expires_at; every run will scan the table. Create it: "
                 f"CREATE INDEX {concurrently}idx_{table}_expires_at ON {table} (expires_at);")


def layout_check(engine: Engine, tables: Tables, settings: Settings) -> Check:
    """Which Airflow the task-state columns (and the alembic revision) say this is, and whether
    state of unfinished dag runs is protected."""
    from sqlalchemy import text

    revision = ""
    if "alembic_version" in inspect(engine).get_table_names():
        with engine.connect() as conn:
            revision = str(conn.execute(text("SELECT version_num FROM alembic_version"))
                           .scalar() or "")
    airflow = {"3.3": "Airflow 3.3 (map_index)",
               "3.4": "Airflow 3.4 (region_index, region_id)"}[tables.layout]
    protect = ("state of queued and running dag runs is kept (dag_run.state)"
               if tables.has_run_state and settings.protect_unfinished_dag_runs
               else "no dag_run.state: nothing protected" if not tables.has_run_state
               else "STATESWEEP_PROTECT_UNFINISHED_DAG_RUNS=false: nothing protected")
    at = f", alembic revision {revision}" if revision else ""
    return Check("task state layout", "ok", f"{airflow}{at}; {protect}")


def database_checks(settings: Settings) -> list[Check]:
    where = settings.database_origin
    try:
        with database(settings) as (engine, tables):
            version = ".".join(str(v) for v in (engine.dialect.server_version_info or ()))
            return [
                Check("database", "ok", f"{where} ({engine.dialect.name} {version})".strip()),
                Check("table naming", "ok",
                      f"{tables.naming}: {tables.task_state.name}, {tables.asset_state.name} "
                      f"(STATESWEEP_TABLE_NAMING={settings.table_naming})"),
                layout_check(engine, tables, settings),
                index_check(engine, tables),
            ]
    except Exception as exc:
        from workers.exceptions import SchemaError

        if isinstance(exc, SchemaError):
            return [Check("database", "ok", where), Check("table naming", "fail", str(exc))]
        return [Check("database", "fail", f"{where} unreachable: {_reason(exc)}")]


def run_store_check(settings: Settings) -> Check:
    url = settings.effective_run_store_url
    if not is_redis(url):
        return Check("run store", "warn", f"{url}: runs and the single-flight lock live in one "
                     "process only; workers on other hosts do not share them")
    try:
        ping_redis(url, "run store")
    except ServiceUnavailable as exc:
        return Check("run store", "fail", f"{mask_url(url)} unreachable: {_reason(exc)}")
    return Check("run store", "ok", mask_url(url))


def worker_checks(app: Celery, settings: Settings) -> list[Check]:
    """Which workers answer, and whether each statesweep queue has a consumer."""
    pongs = app.control.ping(timeout=CONTROL_TIMEOUT) or []
    queues: dict[str, list[dict[str, Any]]] = (
        app.control.inspect(timeout=CONTROL_TIMEOUT).active_queues() or {})
    ours = (settings.control_queue, settings.chunk_queue)
    consuming = {host: sorted(q["name"] for q in qs if q.get("name") in ours)
                 for host, qs in queues.items()}
    consuming = {host: names for host, names in consuming.items() if names}
    others = sorted({h for p in pongs for h in p} - set(consuming))
    checks = [Check("worker", "ok", f"{host} consumes {', '.join(names)}")
              for host, names in sorted(consuming.items())]
    for queue in ours:
        if not any(queue in names for names in consuming.values()):
            checks.append(Check("queue", "fail", f"no worker consumes {queue}; start one with: "
                                f"celery -A workers worker -Q {','.join(ours)}"))
    if others:
        names = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        checks.append(Check("other workers", "ok", f"{names} answered the ping but consume "
                            "none of these queues"))
    return checks


def backend_check(settings: Settings) -> Check | None:
    """Airflow naming a custom state backend: every run skips, which doctor should say."""
    if not settings.airflow_custom_backend:
        return None
    return Check("state backend", "warn",
                 f"custom backend configured — cleanup skips: {settings.state_backend} (from "
                 f"{settings.source_of('state_backend')}) keeps Airflow's state elsewhere")


def run_checks(settings: Settings) -> list[Check]:
    checks = database_checks(settings)
    backend = backend_check(settings)
    if backend is not None:
        checks.append(backend)
    app = client_app(settings)
    try:
        try:
            check_broker(app, settings)
        except ServiceUnavailable as exc:
            checks.append(Check("broker", "fail",
                                f"{mask_url(settings.broker_url)} unreachable: {_reason(exc)}"))
            checks.append(Check("workers", "skip", "not asked: the broker is unreachable"))
        else:
            checks.append(Check("broker", "ok", mask_url(settings.broker_url)))
            checks += _guarded("workers", lambda: worker_checks(app, settings))
        if is_redis(settings.result_backend) and (
                settings.result_backend != settings.effective_run_store_url):
            checks += _guarded("result backend", lambda: _ping_backend(settings))
        store = run_store_check(settings)
        checks.append(store)
        if store.status == "ok":
            checks += _guarded("beat", lambda: trigger_checks(settings))
    finally:
        app.close()
    return checks


def trigger_checks(settings: Settings) -> list[Check]:
    """Beat triggering recently (and only one beat), the last triggers, the pause."""
    from workers.cli.beat_checks import beat_checks
    from workers.runs import registry_for

    registry = registry_for(settings.effective_run_store_url, settings.key_prefix)
    return [Check(*c) for c in beat_checks(settings, registry)]


def _ping_backend(settings: Settings) -> list[Check]:
    ping_redis(settings.result_backend, "result backend")
    return [Check("result backend", "ok", mask_url(settings.result_backend))]


def _guarded(name: str, check: Callable[[], list[Check]]) -> list[Check]:
    try:
        return check()
    except Exception as exc:
        return [Check(name, "fail", _reason(exc))]


def healthy(checks: list[Check]) -> bool:
    return not any(c.status == "fail" for c in checks)


def report(checks: list[Check], settings: Settings) -> dict[str, Any]:
    """The checks, and each setting (masked) with where it came from."""
    import os

    from workers.airflow_config import config_path

    path, _ = config_path(os.environ)
    masked = settings.masked()
    return {"healthy": healthy(checks), "checks": [asdict(c) for c in checks],
            "settings": masked,
            "sources": {name: settings.source_of(name) for name in masked
                        if name != "effective_run_store_url"},
            "airflow_cfg": (f"{path} ({'read' if path.is_file() else 'not found'})"
                            if path else "none")}


def render(data: dict[str, Any]) -> str:
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
    width = max(len(c["name"]) for c in data["checks"])
    lines = [f"{marks[c['status']]}  {c['name']:<{width}}  {c['detail']}" for c in data["checks"]]
    lines.append(f"airflow.cfg: {data['airflow_cfg']}")
    lines.append("settings (secrets masked; where each came from on the right):")
    pairs = [(f"{k} = {v}", data["sources"].get(k, "derived"))
             for k, v in data["settings"].items()]
    left = max(len(p) for p, _ in pairs)
    lines += [f"  {p:<{left}}  [{where}]" for p, where in pairs]
    fails = sum(c["status"] == "fail" for c in data["checks"])
    warns = sum(c["status"] == "warn" for c in data["checks"])
    verdict = "healthy" if data["healthy"] else "UNHEALTHY"
    lines.append(f"{verdict}: {fails} failed, {warns} warnings")
    return "\n".join(lines)


@click.command("doctor")
@FORMAT
@click.pass_context
def doctor(ctx: click.Context, fmt: str) -> None:
    """Check database, schema, index, broker, workers and run store; show settings (masked)."""
    from workers.exit_codes import EXIT_UNHEALTHY

    settings = load_settings(is_verbose(ctx))
    data = report(run_checks(settings), settings)
    echo_json(data) if fmt == "json" else click.echo(render(data))
    if not data["healthy"]:
        ctx.exit(EXIT_UNHEALTHY)
