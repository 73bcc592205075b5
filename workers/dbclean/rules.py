"""Airflow's ``airflow db clean`` rules, as data: which tables, by which recency column, with
which extra filters, and in which order.

Transcribed from ``airflow/utils/db_cleanup.py`` (``config_list``) of apache-airflow-core 3.3.2
and 3.4.0b2. The version is read from the schema (the task-state layout, see
:func:`workers.schema.detect_layout`), never from a setting. The SQL each rule becomes is built
in :mod:`workers.dbclean.statements`; here are only names.

What Airflow does with them, and so statesweep too:
- a row is eligible when ``recency < --clean-before-timestamp`` and every extra filter holds;
- ``keep_last`` keeps, per ``keep_last_group_by`` group, the rows whose recency equals the
  group's newest among rows passing ``keep_last_filters`` (dag_run: the newest non-manual run
  of each dag; a manual run that started at that same instant is kept too, as Airflow's join
  keeps it);
- ``dependants`` are cleaned before the table itself (their own rule each), so the FK cascade a
  parent's DELETE triggers finds little left; ``after`` names tables cleaned first when they are
  cleaned at all (dag_run before callback: its cascade removes deadlines that keep callbacks);
- ``--dag-ids`` / ``--exclude-dag-ids`` filter on the table's dag id column, or through a foreign
  key (``dag_scope``); a table without either ignores them. Excluding keeps NULL dag ids
  eligible, as Airflow does.

Airflow 3.4 adds two things (db_cleanup.py of 3.4.0b2):
- cleaning ``xcom_v2`` first deletes the ``xcom_v1`` rows it shadows (``_cleanup_table`` and
  ``_shadowed_legacy_xcom_query``): a legacy row whose task instance coordinates are, through
  ``legacy_task_data_owner``, those of an ``xcom_v2`` row being deleted, with the same key,
  whatever its own timestamp. Here: :data:`SHADOWS`, which :func:`effective_tables` turns into
  an ``also`` condition of xcom_v1's rule (xcom_v1 cleaned just before xcom_v2, with its own
  rule or, when only xcom_v2 was asked for, for the shadowed rows alone);
- a ``task_instance`` or ``dag_run`` delete archives the rows its cascade removes from the
  attempt tables (``_archive_cascading_attempt_data``): :data:`CASCADE_ARCHIVED`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sqlalchemy import Connection, Engine, inspect

from workers.exceptions import InvalidArgument, SchemaError

#: Airflow's prefix of archive tables: ``_airflow_deleted__<table>__<YYYYmmddHHMMSS>``.
ARCHIVE_PREFIX = "_airflow_deleted__"


@dataclass(frozen=True)
class DagScope:
    """How a table without a dag id column reaches its dag: ``fk`` -> ``table``.``pk``."""

    fk: str
    table: str
    pk: str = "id"
    dag_id: str = "dag_id"


@dataclass(frozen=True)
class TableRule:
    table: str
    recency: str
    dag_id: str | None = None
    dag_scope: DagScope | None = None
    keep_last: bool = False
    keep_last_group_by: tuple[str, ...] = ()
    #: Names of the keep-last filters (statements.KEEP_LAST_FILTERS): ``not_manual``.
    keep_last_filters: tuple[str, ...] = ()
    dependants: tuple[str, ...] = ()
    #: Names of extra filters (statements.EXTRA_FILTERS), ANDed with the recency test.
    extra_filters: tuple[str, ...] = ()
    #: (referencing table, fk column): rows still referenced (ON DELETE RESTRICT) are skipped.
    skip_if_referenced: tuple[tuple[str, str], ...] = ()
    referenced_pk: str = "id"
    #: Only cleaned when named in --tables (Airflow 3.4's task_instance_history).
    only_when_named: bool = False
    #: Tables cleaned before this one when they are cleaned at all: the ones whose cascades
    #: change what this rule's filters read. Airflow leaves this order to Python's set order,
    #: which changes with each process's hash seed (so does its result); statesweep fixes it.
    after: tuple[str, ...] = ()
    #: Names of conditions (statements.ALSO_ELIGIBLE) under which a row goes whatever this
    #: table's own rule says, ORed with it: 3.4's xcom_v1 rows shadowed by xcom_v2 rows.
    also: tuple[str, ...] = ()
    #: Only the ``also`` conditions: the table was not asked for, another table's rule brings it.
    also_only: bool = False
    #: A row's cascade is bounded (a task instance's own XComs, reschedules, rendered fields,
    #: notes, …: a handful of rows, not a dag run's thousands of task instances), so each
    #: slice's DELETE carries it, in a transaction sized by time like any other; only the rows
    #: Airflow archives with the cascade are moved first (workers.dbclean.run.pre_deleted).
    cascade_in_slices: bool = False


def _common() -> list[TableRule]:
    """The rules 3.3.2 and 3.4.0b2 share."""
    return [
        TableRule("job", "latest_heartbeat", dag_id="dag_id"),
        TableRule("dag", "last_parsed_time", dag_id="dag_id",
                  dependants=("dag_version", "deadline")),
        TableRule("dag_run", "start_date", dag_id="dag_id", keep_last=True,
                  keep_last_group_by=("dag_id",), keep_last_filters=("not_manual",),
                  dependants=("task_instance", "task_state_store", "deadline")),
        # A dag run's delete cascades to its asset_partition_dag_run rows, orphaning log rows.
        TableRule("partitioned_asset_key_log", "created_at",
                  extra_filters=("partition_dag_run_gone",), after=("dag_run",)),
        TableRule("import_error", "timestamp"),
        TableRule("log", "dttm", dag_id="dag_id"),
        # statesweep's protected-live-work rule (invariant 14) holds here too: state of a dag
        # run that is queued or running stays (STATESWEEP_PROTECT_UNFINISHED_DAG_RUNS=false
        # drops it, for Airflow's exact rule).
        TableRule("task_state_store", "expires_at", dag_id="dag_id",
                  extra_filters=("dag_run_finished",)),
        TableRule("_xcom_archive", "timestamp", dag_id="dag_id"),
        # A dag run's delete cascades to its deadlines, freeing scheduled callbacks.
        TableRule("callback", "created_at", extra_filters=("callback_finished",),
                  dependants=("deadline",), after=("dag_run",)),
        TableRule("celery_taskmeta", "date_done"),
        TableRule("celery_tasksetmeta", "date_done"),
        TableRule("trigger", "created_date", dependants=("task_instance",)),
        TableRule("dag_version", "created_at", dag_id="dag_id", keep_last=True,
                  keep_last_group_by=("dag_id",), dependants=("task_instance", "dag_run"),
                  skip_if_referenced=(("task_instance", "dag_version_id"),)),
        TableRule("revoked_token", "exp"),
        TableRule("connection_test_request", "updated_at",
                  extra_filters=("connection_test_done",)),
    ]


def _rules_33() -> list[TableRule]:
    return [*_common(),
            TableRule("asset_event", "timestamp", dag_id="dag_id"),
            TableRule("task_instance", "start_date", dag_id="dag_id",
                      dependants=("task_instance_history", "xcom"), cascade_in_slices=True),
            TableRule("task_instance_history", "start_date", dag_id="dag_id"),
            TableRule("task_reschedule", "start_date", dag_id="dag_id"),
            TableRule("xcom", "timestamp", dag_id="dag_id"),
            TableRule("deadline", "deadline_time", dag_id="dag_id")]


def _rules_34() -> list[TableRule]:
    return [*_common(),
            TableRule("asset_event", "timestamp", dag_id="source_dag_id"),
            TableRule("task_instance", "start_date", dag_id="dag_id",
                      dependants=("xcom_v1", "xcom_v2", "task_reschedule"),
                      cascade_in_slices=True),
            TableRule("task_instance_history", "start_date", dag_id="dag_id",
                      extra_filters=("not_in_working_set",), only_when_named=True),
            TableRule("task_reschedule", "start_date",
                      dag_scope=DagScope("ti_id", "task_instance")),
            TableRule("xcom_v1", "timestamp", dag_id="dag_id"),
            # Its shadowed xcom_v1 rows go first (SHADOWS), while its rows still show them.
            TableRule("xcom_v2", "timestamp",
                      dag_scope=DagScope("task_instance_id", "task_instance"),
                      after=("xcom_v1",)),
            TableRule("deadline", "deadline_time",
                      dag_scope=DagScope("dagrun_id", "dag_run"))]


RULES: dict[str, dict[str, TableRule]] = {
    "3.3": {r.table: r for r in _rules_33()},
    "3.4": {r.table: r for r in _rules_34()},
}
#: Cleaning the key table first deletes rows of another table that its own eligible rows
#: shadow: {version: {table: (shadowed table, ALSO_ELIGIBLE condition)}}.
SHADOWS: dict[str, dict[str, tuple[str, str]]] = {
    "3.3": {}, "3.4": {"xcom_v2": ("xcom_v1", "shadowed_by_xcom_v2")}}
#: Airflow 3.4 (``_ATTEMPT_UUID_CHILDREN``, ``_ATTEMPT_ARCHIVE_TABLES``): the tables whose rows a
#: task_instance or dag_run delete cascades to and that it archives first, unless
#: --skip-archive. For dag_run, the task instances themselves and their dynamic regions too.
_ATTEMPT = frozenset({"legacy_task_data_owner", "xcom_v2", "rtif_v2", "task_instance_note",
                      "task_reschedule", "hitl_detail", "xcom_v1", "rtif_v1"})
CASCADE_ARCHIVED: dict[str, dict[str, frozenset[str]]] = {
    "3.3": {},
    "3.4": {"task_instance": _ATTEMPT,
            "dag_run": _ATTEMPT | {"task_instance", "dynamic_region"}},
}
#: Names --tables takes that stand for others (3.4 split xcom in two).
ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "3.3": {}, "3.4": {"xcom": ("xcom_v1", "xcom_v2")}}


def airflow_version(bind: Engine | Connection) -> str:
    """``3.3`` or ``3.4``: the release whose rules apply, read from the task-state layout (the
    one schema difference statesweep already detects); a database that is not Airflow's is a
    SchemaError naming what is missing."""
    from workers.schema import detect_layout

    names = set(inspect(bind).get_table_names())
    missing = [t for t in ("dag_run", "task_instance", "task_state_store") if t not in names]
    if missing:
        raise SchemaError("db-clean needs an Airflow 3.3 or 3.4 metadata database; this one has "
                          f"no {', '.join(missing)}")
    return detect_layout(bind, "airflow")


def effective_tables(version: str, names: tuple[str, ...] = ()) -> list[TableRule]:
    """The rules to run, dependants first (Airflow's ``_effective_table_names``), for *names*
    (all tables when empty). An unknown name is an InvalidArgument naming it and the choices."""
    rules, aliases = RULES[version], ALIASES[version]
    if names:
        wanted: list[str] = []
        for name in names:
            expanded = aliases.get(name, (name,))
            for n in expanded:
                if n not in rules:
                    choices = ", ".join(sorted({*rules, *aliases}))
                    raise InvalidArgument(f"--tables: unknown table {name!r} for Airflow "
                                          f"{version}; choose from {choices}")
                if n not in wanted:
                    wanted.append(n)
    else:
        wanted = sorted(n for n, r in rules.items() if not r.only_when_named)
    order: list[str] = []
    visited: set[str] = set()
    selected = set(wanted)
    for name in wanted:  # what the run cleans, dependants included
        stack = [name]
        while stack:
            for dep in rules[stack.pop()].dependants:
                if dep not in selected:
                    selected.add(dep)
                    stack.append(dep)
    rules = dict(rules)
    for key, (shadowed, condition) in SHADOWS[version].items():
        if key in selected and shadowed in rules:
            rules[shadowed] = replace(rules[shadowed], also=(condition,),
                                      also_only=shadowed not in selected)
            selected.add(shadowed)

    def visit(name: str) -> None:
        if name in visited:
            return
        visited.add(name)
        for dep in rules[name].dependants:
            visit(dep)
        for first in rules[name].after:
            if first in selected:
                visit(first)
        order.append(name)

    for name in sorted(wanted):
        visit(name)
    return [rules[n] for n in order]


def parse_tables(value: str | None) -> tuple[str, ...]:
    """--tables as Airflow takes it: comma-separated names."""
    if not value:
        return ()
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise InvalidArgument(f"--tables must name tables (comma-separated), got {value!r}")
    return names


def cascade_archived(version: str, table: str) -> frozenset[str]:
    """The tables whose rows a delete of *table* cascades to that Airflow *version* archives
    with it (none but for 3.4's task_instance and dag_run)."""
    return CASCADE_ARCHIVED[version].get(table, frozenset())
