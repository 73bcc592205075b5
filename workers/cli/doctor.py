"""`statesweep doctor`: is everything a cleanup run needs there and answering?

Each check is independent and bounded by short timeouts, so a dead Redis or database is
reported in seconds. A failure makes the command's exit code unhealthy; a warning does not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
from workers.settings import Settings, is_redis, is_redis_store, mask_url

if TYPE_CHECKING:
    from celery import Celery

    from workers.identity import DatabaseIdentity

CONTROL_TIMEOUT = 1.5  # seconds workers get to answer a ping or an inspect
IDENTITY_TIMEOUT = 5.0  # seconds the workers that consume the queues get to say their database


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or getattr(exc, "orig", None) or exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


#: The planners that read the expires_at index: expiry walks it, walk and ids find the expired
#: ids' bounds on it, auto estimates the regime on it. blocks cuts page ranges from the catalog
#: (only its estimate and dry runs read the index).
PLANNERS_ON_THE_INDEX = ("auto", "expiry", "walk", "ids")


def index_check(engine: Engine, tables: Tables, planner: str = "auto") -> Check:
    """The index the configured planner uses: an index led by expires_at. Missing, the planner
    that walks it cannot (a failure); for blocks, only estimates and dry runs scan (a warning)."""
    table = tables.task_state.name
    for ix in inspect(engine).get_indexes(table):
        if ix["column_names"] and ix["column_names"][0] == "expires_at":
            return Check("expires_at index", "ok", f"{ix['name']} on {table}(expires_at), "
                         f"which the {planner} planner uses (STATESWEEP_PLANNER)")
    concurrently = "CONCURRENTLY " if engine.dialect.name == "postgresql" else ""
    create = f"CREATE INDEX {concurrently}idx_{table}_expires_at ON {table} (expires_at);"
    if planner in PLANNERS_ON_THE_INDEX:
        return Check("expires_at index", "fail",
                     f"no index on {table}.expires_at, which STATESWEEP_PLANNER={planner} "
                     f"reads; every run would scan the table. Create it: {create}")
    return Check("expires_at index", "warn",
                 f"no index on {table}.expires_at; STATESWEEP_PLANNER={planner} cuts page "
                 f"ranges without it, but estimates and dry runs scan the table. Create it: "
                 f"{create}")


def privilege_checks(engine: Engine, tables: Tables) -> list[Check]:
    """SELECT and DELETE on each state table for the configured user (a read-only user would
    fail every chunk): one line per table."""
    from workers.privileges import (
        STATE_TABLE_PRIVILEGES,
        current_user,
        describe,
        missing_privileges,
    )

    if engine.dialect.name == "sqlite":
        return [Check("privileges", "ok", "SQLite: no database users")]
    with engine.connect() as conn:
        user = current_user(conn)
    checks = []
    for table in (tables.task_state, tables.asset_state):
        missing = missing_privileges(engine, [table])
        if missing:
            checks.append(Check("privileges", "fail", describe(missing, engine.dialect.name)))
        else:
            checks.append(Check("privileges", "ok", f"{user!r} may "
                                f"{' and '.join(STATE_TABLE_PRIVILEGES)} on {table.name}"))
    return checks


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


def database_checks(settings: Settings, found: list[DatabaseIdentity] | None = None
                    ) -> list[Check]:
    """The database, its tables, layout, index and privileges; its identity is appended to
    *found* for the workers' check."""
    from workers.identity import read_identity

    where = settings.database_origin
    try:
        with database(settings) as (engine, tables):
            version = ".".join(str(v) for v in (engine.dialect.server_version_info or ()))
            with engine.connect() as conn:
                identity = read_identity(conn, tables.naming)
            if found is not None:
                found.append(identity)
            return [
                Check("database", "ok", f"{where} ({engine.dialect.name} {version}): "
                      f"{identity}"),
                Check("table naming", "ok",
                      f"{tables.naming}: {tables.task_state.name}, {tables.asset_state.name} "
                      f"(STATESWEEP_TABLE_NAMING={settings.table_naming})"),
                layout_check(engine, tables, settings),
                index_check(engine, tables, settings.planner),
                *privilege_checks(engine, tables),
            ]
    except Exception as exc:
        from workers.exceptions import SchemaError

        if isinstance(exc, SchemaError):
            return [Check("database", "ok", where), Check("table naming", "fail", str(exc))]
        return [Check("database", "fail", f"{where} unreachable: {_reason(exc)}")]


def run_store_check(settings: Settings, info_of: Callable[[str], Mapping[str, Any]] | None = None
                    ) -> list[Check]:
    """The run store answers, and its Redis can hold runs: version >= 7, maxmemory-policy
    noeviction (workers.startup; a worker or beat refuses to start otherwise). *info_of*
    reads INFO from a URL (a seam for tests)."""
    from workers.startup import redis_info, redis_info_problems, run_store_source

    url = settings.effective_run_store_url
    if not is_redis_store(url):
        return [Check("run store", "warn", f"{url}: runs and the single-flight lock live in one "
                      "process only; workers on other hosts do not share them")]
    try:
        ping_redis(url, "run store")
        info = (info_of or redis_info)(url)
    except Exception as exc:  # ServiceUnavailable, or INFO cut off by a redis error
        return [Check("run store", "fail", f"{mask_url(url)} unreachable: {_reason(exc)}")]
    where = f"{run_store_source(settings)}={mask_url(url)}"
    problems = redis_info_problems(info)
    if problems:
        return [Check("run store", "fail", f"{where}: {problem}") for problem in problems]
    return [Check("run store", "ok", f"{mask_url(url)} (Redis {info.get('redis_version')}, "
                  f"maxmemory-policy {info.get('maxmemory_policy')})")]


def worker_checks(app: Celery, settings: Settings,
                  own: DatabaseIdentity | None = None) -> list[Check]:
    """Which workers answer, whether each statesweep queue has a consumer, and (with *own*,
    doctor's database identity) whether each of those workers cleans the same database."""
    pongs = app.control.ping(timeout=CONTROL_TIMEOUT) or []
    hosts = sorted({h for p in pongs for h in p})
    # Only the workers that answered are asked for their queues, and the answer is taken as
    # soon as each has given it (limit): no worker, no second wait of CONTROL_TIMEOUT.
    queues: dict[str, list[dict[str, Any]]] = (
        app.control.inspect(destination=hosts, timeout=CONTROL_TIMEOUT,
                            limit=len(hosts)).active_queues() or {} if hosts else {})
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
    if own is not None and consuming:
        checks += identity_checks(app, sorted(consuming), own)
    return checks


def identity_checks(app: Celery, hosts: list[str], own: DatabaseIdentity) -> list[Check]:
    """Each worker's database identity (read at its start, workers.identity) against doctor's:
    a worker cleaning another database would refuse every run this CLI sends."""
    from workers.celery_app import IDENTITY_COMMAND
    from workers.identity import DatabaseIdentity

    # Waits only until every worker asked has answered (limit): a busy one gets longer.
    replies = app.control.broadcast(IDENTITY_COMMAND, destination=hosts, reply=True,
                                    timeout=IDENTITY_TIMEOUT, limit=len(hosts)) or []
    answers = {host: body for reply in replies for host, body in reply.items()}
    checks = []
    for host in hosts:
        body = answers.get(host)
        if not isinstance(body, dict) or not isinstance(body.get("database"), dict):
            checks.append(Check("worker database", "warn",
                                f"{host} did not say which database it cleans (an older "
                                "statesweep, or it did not answer in time)"))
            continue
        theirs = DatabaseIdentity.decode(body["database"])
        if theirs == own:
            checks.append(Check("worker database", "ok", f"{host} cleans {theirs}"))
        else:
            checks.append(Check("worker database", "fail",
                                f"{host} cleans {theirs}, but these settings name {own}: runs "
                                "sent from here are refused; point STATESWEEP_DATABASE_URL of "
                                "both at the same database"))
    return checks


def backend_check(settings: Settings) -> Check | None:
    """Airflow naming a custom state backend: every run skips, which doctor should say."""
    if not settings.airflow_custom_backend:
        return None
    return Check("state backend", "warn",
                 f"custom backend configured — cleanup skips: {settings.state_backend} (from "
                 f"{settings.source_of('state_backend')}) keeps Airflow's state elsewhere")


def batch_check(settings: Settings) -> Check | None:
    """An explicit batch size of 0 (one unbounded transaction per run) is loud; Airflow's
    shipped 0 ("no batching"), which statesweep does not adopt, is said here once, with why."""
    from workers.settings import PREFIX

    where = settings.source_of("cleanup_batch_size")
    if settings.cleanup_batch_size == 0:
        return Check("batch size", "warn",
                     f"{where}=0: every run deletes ALL expired rows in ONE transaction "
                     "(long row locks, bloat and replication lag on a large backlog); unset "
                     f"it for statesweep's batches of {Settings().cleanup_batch_size:,} rows")
    airflow = settings.not_adopted.get("cleanup_batch_size")
    if airflow is not None:
        return Check("batch size", "ok",
                     f"{settings.cleanup_batch_size:,} rows per chunk: {airflow} means no "
                     "batching in Airflow (its shipped default), which statesweep does not "
                     f"adopt; {PREFIX}CLEANUP_BATCH_SIZE sets statesweep's own")
    return None


def run_checks(settings: Settings) -> list[Check]:
    found: list[DatabaseIdentity] = []
    checks = database_checks(settings, found)
    for extra in (backend_check(settings), batch_check(settings)):
        if extra is not None:
            checks.append(extra)
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
            checks += _guarded("workers", lambda: worker_checks(
                app, settings, found[0] if found else None))
        if is_redis(settings.result_backend) and (
                settings.result_backend != settings.effective_run_store_url):
            checks += _guarded("result backend", lambda: _ping_backend(settings))
        store = run_store_check(settings)
        checks += store
        if all(c.status == "ok" for c in store):
            checks += _guarded("beat", lambda: trigger_checks(settings))
    finally:
        app.close()
    return checks


def trigger_checks(settings: Settings) -> list[Check]:
    """Beat triggering recently (and only one beat), the last triggers, the pause."""
    from workers.cli.beat_checks import beat_checks
    from workers.runs import registry_for

    registry = registry_for(settings.effective_run_store_url, settings.key_prefix)
    checks = [Check(*c) for c in beat_checks(settings, registry)]
    if not any(c.name == "second beat" for c in checks):
        interleaved = interleave_check(settings, registry.beat_trigger_times())
        if interleaved is not None:
            checks.insert(1, interleaved)
    return checks


# One beat on a seconds schedule triggers a period apart (a restart only lengthens a gap); a
# gap under this share of the period is a second beat's trigger between the first's. Below 1
# leaves room for a trigger that waited behind other work on the control queue.
INTERLEAVED_SHARE = 0.75


def interleave_check(settings: Settings, beats: list[float]) -> Check | None:
    """A second beat, from the first trigger of it that falls between two of the first beat's:
    at once, not only when two triggers happen to come within half a period (two beats half a
    period apart never do). Crontab schedules have uneven gaps and are left to beat_checks."""
    from workers.settings import parse_schedule

    period = parse_schedule(settings.coordinator_schedule)
    if not isinstance(period, float):
        return None
    gaps = [a - b for a, b in zip(beats, beats[1:], strict=False)]
    short = [g for g in gaps if g < INTERLEAVED_SHARE * period]
    if not short:
        return None
    return Check("second beat", "warn",
                 f"beat triggers came {min(short):.1f}s apart where one beat triggers every "
                 f"{period:g}s (STATESWEEP_COORDINATOR_SCHEDULE): a second beat is probably "
                 "running; run exactly one")


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
            "configured": {name: _show(name, raw) for name, raw in settings.configured.items()},
            "not_adopted": dict(settings.not_adopted),
            "airflow_cfg": (f"{path} ({'read' if path.is_file() else 'not found'})"
                            if path else "none")}


def _show(name: str, raw: str) -> str:
    from workers.settings import _URL_FIELDS

    return mask_url(raw) if name in _URL_FIELDS else raw


# Settings whose empty or zero value turns a rule off: shown as "off", not "0.0" or nothing.
OFF_WHEN_EMPTY = {"max_run_seconds", "max_replica_lag_seconds", "target_chunk_seconds",
                  "chunk_rate_limit", "active_hours"}


def shown_value(name: str, value: Any) -> str:
    """A setting as text: a rule that is off reads "off", an empty one "unset"."""
    if name in OFF_WHEN_EMPTY and not value:
        return "off"
    if value == "":
        return "unset"
    return str(value)


def shown_setting(data: dict[str, Any], name: str, value: Any) -> tuple[str, str]:
    """(value, source) for one settings line: what was configured where statesweep reads it
    as something else (Airflow's metastore backend), and why."""
    from workers.settings import METASTORE_BACKEND

    where = data["sources"].get(name, "derived")
    configured = data.get("configured", {}).get(name)
    if configured is None:
        return shown_value(name, value), where
    if name == "state_backend":
        return configured, (f"{where}; Airflow's metastore backend: statesweep cleans its "
                            f"tables as its own {METASTORE_BACKEND}")
    return f"{configured} (used as {shown_value(name, value)})", where


def render(data: dict[str, Any]) -> str:
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
    width = max(len(c["name"]) for c in data["checks"])
    lines = [f"{marks[c['status']]}  {c['name']:<{width}}  {c['detail']}" for c in data["checks"]]
    lines.append(f"airflow.cfg: {data['airflow_cfg']}")
    lines.append("settings (secrets masked; where each came from on the right):")
    pairs = [(f"{k} = {v}", where) for k, v, where in
             ((k, *shown_setting(data, k, v)) for k, v in data["settings"].items())]
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
    """Check database, schema, index, privileges, broker, workers and run store; show settings
    (masked)."""
    from workers.exit_codes import EXIT_UNHEALTHY

    settings = load_settings(is_verbose(ctx))
    data = report(run_checks(settings), settings)
    echo_json(data) if fmt == "json" else click.echo(render(data))
    if not data["healthy"]:
        ctx.exit(EXIT_UNHEALTHY)
