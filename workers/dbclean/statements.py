"""Every statement ``db-clean`` runs, built from a rule (:mod:`workers.dbclean.rules`) and the
live table, each commented with why.

The rules these statements keep:
- a chunk's archive and delete are one transaction: a crash leaves both or neither, so no row
  is lost and none is archived twice;
- every DELETE repeats the whole rule (recency, extra filters, keep-last, dag ids), so a row
  that stopped being eligible after its chunk was cut (a dag run that became its dag's last, a
  callback running again) survives;
- a chunk is a keyset range of the primary key, ``lo`` exclusive, ``hi`` inclusive, holding at
  most ``batch_size`` rows that were eligible when it was cut.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    Table,
    and_,
    column,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    table,
    tuple_,
)
from sqlalchemy.sql.util import find_tables

from workers.cleanup import UNFINISHED_DAG_RUN_STATES
from workers.dbclean.rules import TableRule

Key = tuple[Any, ...]

#: Airflow's CallbackState values of a callback that is done (TERMINAL_STATES), and the state of
#: one waiting on its deadline.
CALLBACK_TERMINAL = ("failed", "success")
CALLBACK_SCHEDULED = "scheduled"


def reflect(conn: Connection, name: str) -> Table:
    """The live table, as the database has it (names, types, primary key).

    Only this table: the statements name other tables by ``table()``/``column()`` and the
    cascade reads foreign keys from the catalog (cascade.ForeignKeys), so the tables its foreign
    keys refer to are not reflected too (``resolve_fks``), which made reflecting task_instance
    read dag_run, dag_version, trigger, dag, … again each time: 0.6 s of catalog reads for
    task_instance's cascade tree, 1.6 s for dag_run's, in one open transaction."""
    return Table(name, MetaData(), autoload_with=conn, resolve_fks=False)


def is_mysql(bind: Connection | Engine) -> bool:
    return bind.dialect.name in ("mysql", "mariadb")


def bind_time(conn: Connection, when: dt.datetime) -> dt.datetime:
    # Airflow keeps MySQL times as naive UTC (the session zone is pinned to UTC by make_engine);
    # PostgreSQL's timestamptz takes the aware value.
    return when.astimezone(dt.UTC).replace(tzinfo=None) if is_mysql(conn) else when


def _extra_filter(name: str, t: Table) -> Any:
    """Airflow's extra_filters, by name (rules keeps names, not SQL)."""
    if name == "callback_finished":
        # Deleting a callback cascades to its deadline: only finished or stateless callbacks
        # go, and a SCHEDULED one only once no deadline references it.
        deadline = table("deadline", column("callback_id"))
        return or_(t.c.state.in_(CALLBACK_TERMINAL), t.c.state.is_(None),
                   and_(t.c.state == CALLBACK_SCHEDULED,
                        ~exists().where(deadline.c.callback_id == t.c.id)))
    if name == "partition_dag_run_gone":
        # No foreign key: a log row whose partition dag run is gone is an orphan; one whose run
        # exists is evidence the scheduler still reads. NOT IN, as Airflow (NULL stays).
        apdr = table("asset_partition_dag_run", column("id"))
        return t.c.asset_partition_dag_run_id.not_in(select(apdr.c.id))
    if name == "connection_test_done":
        return t.c.state.in_(("success", "failed"))
    if name == "not_in_working_set":
        return t.c.working_set.is_(None)
    if name == "dag_run_finished":
        # As cleanup's check (workers.cleanup.unfinished_run): the unfinished runs once per
        # statement, spelled one equality per state so PostgreSQL reads them from Airflow's
        # partial indexes (state IN (...) scanned all of dag_run for every chunk); a row with
        # no dag run belongs to no unfinished one and goes, as NOT EXISTS let it.
        dag_run = table("dag_run", column("id"), column("state"))
        unfinished = select(dag_run.c.id).where(
            or_(*(dag_run.c.state == s for s in UNFINISHED_DAG_RUN_STATES)))
        return or_(t.c.dag_run_id.is_(None), t.c.dag_run_id.not_in(unfinished))
    raise ValueError(f"unknown extra filter {name!r}")


def _keep_last_filter(name: str, t: Any) -> Any:
    if name == "not_manual":
        return t.c.run_type != "manual"
    raise ValueError(f"unknown keep-last filter {name!r}")


#: The columns of a legacy (xcom_v1) row that name its task instance, as legacy_task_data_owner
#: keeps them.
LEGACY_COORDINATES = ("dag_id", "task_id", "run_id", "map_index")


def _shadowed_by_xcom_v2(conn: Connection, t: Any, before: dt.datetime,
                         dag_ids: Sequence[str], exclude_dag_ids: Sequence[str]) -> Any:
    """Airflow 3.4's ``_shadowed_legacy_xcom_query``: an xcom_v1 row shadowed by an xcom_v2 row
    that xcom_v2's own rule deletes (recency and dag scope, read now): the same key, and the
    task instance that legacy_task_data_owner maps the row's coordinates to. Its own timestamp
    does not matter."""
    from workers.dbclean.rules import RULES

    owner = table("legacy_task_data_owner", *[column(c) for c in LEGACY_COORDINATES],
                  column("task_instance_id"))
    v2 = table("xcom_v2", column("task_instance_id"), column("key"),
               column("timestamp")).alias("shadowing")
    v2_rule = RULES["3.4"]["xcom_v2"]
    return (exists().select_from(owner.join(v2, owner.c.task_instance_id
                                            == v2.c.task_instance_id))
            .where(*[owner.c[c] == t.c[c] for c in LEGACY_COORDINATES], v2.c.key == t.c.key,
                   *_own_rule(conn, v2_rule, v2, before, dag_ids, exclude_dag_ids)))


#: Conditions under which a row goes whatever its own rule says (TableRule.also), by name.
ALSO_ELIGIBLE = {"shadowed_by_xcom_v2": _shadowed_by_xcom_v2}


def missing_columns(rule: TableRule, t: Table, filtered_by_dag: bool) -> list[str]:
    """Columns the rule needs that the live table lacks (Airflow's statement would fail on it
    and its table be skipped; statesweep skips it up front and says why)."""
    need = [rule.recency, *rule.keep_last_group_by]
    if rule.keep_last_filters:
        need.append("run_type")
    if filtered_by_dag and rule.dag_id:
        need.append(rule.dag_id)
    if filtered_by_dag and rule.dag_scope:
        need.append(rule.dag_scope.fk)
    for name in rule.extra_filters:
        need += {"callback_finished": ["state", "id"], "connection_test_done": ["state"],
                 "partition_dag_run_gone": ["asset_partition_dag_run_id"],
                 "not_in_working_set": ["working_set"], "dag_run_finished": ["dag_run_id"]}[name]
    if rule.skip_if_referenced:
        need.append(rule.referenced_pk)
    if "shadowed_by_xcom_v2" in rule.also:
        need += [*LEGACY_COORDINATES, "key"]
    return [c for c in dict.fromkeys(need) if c not in t.c]


def eligible(conn: Connection, rule: TableRule, t: Table, before: dt.datetime,
             dag_ids: Sequence[str] = (), exclude_dag_ids: Sequence[str] = (),
             protect_unfinished: bool = True) -> list[Any]:
    """The rule as conditions on *t*: Airflow's ``_build_query`` WHERE clause, with keep-last as
    NOT EXISTS instead of its outer join (the same rows; a DELETE cannot outer-join); with the
    rule's ``also`` conditions, one condition: the rule OR any of them (or only them, for
    ``also_only``)."""
    cond = _own_rule(conn, rule, t, before, dag_ids, exclude_dag_ids, protect_unfinished)
    if not rule.also:
        return cond
    also = [ALSO_ELIGIBLE[name](conn, t, before, dag_ids, exclude_dag_ids) for name in rule.also]
    return [or_(*also)] if rule.also_only else [or_(and_(*cond), *also)]


def _own_rule(conn: Connection, rule: TableRule, t: Any, before: dt.datetime,
              dag_ids: Sequence[str] = (), exclude_dag_ids: Sequence[str] = (),
              protect_unfinished: bool = True) -> list[Any]:
    cond: list[Any] = [t.c[rule.recency] < bind_time(conn, before)]
    cond += [_extra_filter(name, t) for name in rule.extra_filters
             if protect_unfinished or name != "dag_run_finished"]
    for ref_name, ref_fk in rule.skip_if_referenced:
        # ON DELETE RESTRICT: a referenced row cannot go; skip it rather than fail the chunk.
        referencing = table(ref_name, column(ref_fk))
        cond.append(~exists().where(referencing.c[ref_fk] == t.c[rule.referenced_pk]))
    if rule.dag_id is not None and (dag_ids or exclude_dag_ids):
        col = t.c[rule.dag_id]
        if dag_ids:
            cond.append(col.in_(dag_ids))
        if exclude_dag_ids:
            # A NULL dag id belongs to no excluded dag and stays eligible, as in Airflow.
            cond.append(or_(col.is_(None), col.not_in(exclude_dag_ids)))
    elif rule.dag_scope is not None and (dag_ids or exclude_dag_ids):
        s = rule.dag_scope
        ref = table(s.table, column(s.pk), column(s.dag_id))
        fk = t.c[s.fk]
        if dag_ids:
            cond.append(fk.in_(select(ref.c[s.pk]).where(ref.c[s.dag_id].in_(dag_ids))))
        if exclude_dag_ids:
            cond.append(or_(fk.is_(None), fk.not_in(
                select(ref.c[s.pk]).where(ref.c[s.dag_id].in_(exclude_dag_ids)))))
    if rule.keep_last:
        cond.append(~_is_last(rule, t))
    return cond


def _is_last(rule: TableRule, t: Table) -> Any:
    """The row's recency equals its group's newest among rows passing the keep-last filters:
    read at the moment of the statement, so a run that became its dag's last is kept."""
    src = t.alias("keep_last_src")
    groups = [src.c[g] for g in rule.keep_last_group_by]
    latest = (select(*groups, func.max(src.c[rule.recency]).label("newest"))
              .where(*[_keep_last_filter(f, src) for f in rule.keep_last_filters])
              .group_by(*groups).subquery("keep_last"))
    return (exists().select_from(latest)
            .where(*[latest.c[g] == t.c[g] for g in rule.keep_last_group_by],
                   latest.c.newest == t.c[rule.recency]))


# --- chunks -------------------------------------------------------------------------------------


def key_columns(t: Table) -> list[Column[Any]]:
    return list(t.primary_key.columns)


def key_expr(cols: list[Column[Any]]) -> Any:
    """A key's columns as one expression to compare: the column, or a row of them."""
    return cols[0] if len(cols) == 1 else tuple_(*cols)


def key_value(key: Key) -> Any:
    """A key's values, as :func:`key_expr` compares them."""
    return key[0] if len(key) == 1 else tuple_(*key)


def in_range(t: Table, lo: Key | None, hi: Key | None) -> list[Any]:
    """``lo < key <= hi`` on the primary key (a row comparison for a composite one); None is
    open-ended.

    A composite key's bounds also bound its first column (``first >= lo[0]``, ``first <=
    hi[0]``): the same rows, but MariaDB's range optimizer does not read a row comparison, and
    without them scanned the whole table for every statement of a chunk (xcom's, 100,000 rows:
    about 40 ms a statement, whatever its rows)."""
    cols = key_columns(t)
    k = key_expr(cols)
    cond = []
    if lo is not None:
        cond.append(k > key_value(lo))
        if len(cols) > 1:
            cond.append(cols[0] >= lo[0])
    if hi is not None:
        cond.append(k <= key_value(hi))
        if len(cols) > 1:
            cond.append(cols[0] <= hi[0])
    return cond


def next_bound(conn: Connection, t: Table, cond: list[Any], lo: Key | None,
               batch_size: int) -> Key | None:
    """The key of the batch_size-th eligible row after *lo* (a chunk's inclusive upper end), or
    None when fewer remain (the chunk runs to the end). One ordered read of the key index."""
    if batch_size <= 0:
        return None
    cols = key_columns(t)
    row = conn.execute(select(*cols).where(*cond, *in_range(t, lo, None))
                       .order_by(*cols).offset(batch_size - 1).limit(1)).first()
    return tuple(row) if row is not None else None


def count(conn: Connection, t: Table, cond: list[Any]) -> int:
    return int(conn.execute(select(func.count()).select_from(t).where(*cond)).scalar_one())


def create_archive(conn: Connection, source: Table, archive: str) -> Table:
    """An empty archive table with *source*'s columns (names, types, order) and no constraints,
    made once per table per run, before its chunks, from the reflected columns by SQLAlchemy's
    own DDL: Airflow's ``CREATE TABLE … AS SELECT … WHERE false`` (``… LIKE`` on MySQL) makes
    the same columns, and no SQL text is assembled here. No primary key or foreign key: an
    archive holds copies, and must never block or cascade."""
    md = MetaData()
    arch = Table(archive, md, *[Column(c.name, c.type, nullable=True) for c in source.c])
    arch.create(conn)
    return arch


def move_chunk(conn: Connection, t: Table, archive: Table | None, cond: list[Any],
               lo: Key | None, hi: Key | None) -> int:
    """Archive (unless *archive* is None) and delete one chunk's eligible rows, in the caller's
    transaction; returns the rows deleted.

    PostgreSQL: one statement, ``WITH moved AS (DELETE … RETURNING *) INSERT INTO archive
    SELECT * FROM moved`` (counted by a third CTE): the rows archived are exactly the rows
    deleted.
    MySQL/MariaDB (no DML in a CTE, and a DELETE may not read its own table in a subquery):
    ``SELECT key … FOR UPDATE`` with the rule locks the eligible rows, then ``INSERT … SELECT``
    and ``DELETE`` of those keys (:func:`move_keys`); the locks hold both to the same rows
    until commit. Where the rule reads the row alone and the transaction is REPEATABLE READ,
    the INSERT and the DELETE repeat the range and the rule instead (the locking read locked
    the range's rows and gaps). Without an archive, one ``DELETE`` with the rule, as on
    PostgreSQL, unless the rule reads its own table.
    """
    where = [*cond, *in_range(t, lo, hi)]
    if not is_mysql(conn):
        return move_where(conn, t, archive, where)
    if archive is None and not _reads_itself(t, where):
        # Nothing to copy: the DELETE with the rule, as on PostgreSQL.
        return int(conn.execute(delete(t).where(*where)).rowcount)
    cols = key_columns(t)
    keys = [tuple(r) for r in conn.execute(select(*cols).where(*where).with_for_update())]
    if keys and _reads_only_itself(t, where) and \
            conn.get_isolation_level() in ("REPEATABLE READ", "SERIALIZABLE"):
        # The locking read above locked every row of the range it scanned, and the gaps
        # between them: no row of the range can change or appear until commit, and the rule
        # reads nothing else, so the range and the rule select the locked rows again, without
        # a list of their keys (a third of the time for 4,000 xcom rows on MariaDB).
        return _copy_then_delete(conn, t, archive, where)
    return move_keys(conn, t, archive, keys)


def _copy_then_delete(conn: Connection, t: Table, archive: Table | None,
                      where: list[Any]) -> int:
    """MySQL/MariaDB: ``INSERT INTO archive SELECT … WHERE`` (unless *archive* is None), then
    ``DELETE … WHERE``, of rows the caller has locked; returns the rows deleted."""
    if archive is not None:
        names = [c.name for c in archive.c]
        conn.execute(insert(archive).from_select(names, select(*[t.c[n] for n in names])
                                                 .where(*where)))
    return int(conn.execute(delete(t).where(*where)).rowcount)


def _tables(where: list[Any]) -> list[Any]:
    return find_tables(and_(*where), include_aliases=True, include_selects=True)


def _reads_itself(t: Table, where: list[Any]) -> bool:
    """Whether *where* reads *t* again in a subquery (keep-last): MySQL refuses a DELETE whose
    subquery reads the table it deletes from."""
    def source(x: Any) -> Any:  # an alias's table
        return getattr(x, "element", x)

    return any(x is not t and getattr(source(x), "name", None) == t.name
               for x in _tables(where))


def _reads_only_itself(t: Table, where: list[Any]) -> bool:
    """Whether *where* reads *t*'s own row and nothing else (no subquery, no other table)."""
    return all(x is t for x in _tables(where))


def move_where(conn: Connection, t: Table, archive: Table | None, where: list[Any]) -> int:
    """PostgreSQL: delete the rows *where* selects, copying each into *archive* (unless None)
    in the same statement; returns the rows deleted."""
    if archive is None:
        return int(conn.execute(delete(t).where(*where)).rowcount)
    # The count comes from the INSERT's own RETURNING: a DML statement whose WITH holds a
    # DELETE reports no row count through the driver.
    return int(conn.execute(select(func.count()).select_from(moved_rows(t, archive, where)))
               .scalar_one())


def moved_rows(t: Table, archive: Table | None, where: list[Any]) -> Any:
    """PostgreSQL: a CTE that deletes the rows *where* selects, copying each into *archive*
    (unless None) in the same statement (``WITH moved AS (DELETE … RETURNING *) INSERT INTO
    archive SELECT * FROM moved RETURNING …``): one row per row moved, to count. A statement
    that reads it runs the DELETE whole, however little of it the statement reads."""
    names = ([c.name for c in archive.c] if archive is not None
             else [(key_columns(t) or list(t.c))[0].name])
    moved = delete(t).where(*where).returning(*[t.c[n] for n in names]).cte("moved")
    if archive is None:
        return moved
    return (insert(archive).from_select(names, select(*[moved.c[n] for n in names]))
            .returning(archive.c[names[0]]).cte("archived"))


def move_keys(conn: Connection, t: Table, archive: Table | None, keys: list[Key]) -> int:
    """MySQL/MariaDB: copy the rows of *keys* (locked by the caller's SELECT … FOR UPDATE)
    into *archive* (unless None), then delete them, a bounded list of keys a statement
    (:func:`keys_in`); returns the rows deleted."""
    return sum(_copy_then_delete(conn, t, archive, [chosen])
               for chosen in keys_in(key_columns(t), keys))


#: MariaDB plans a row constructor list, ``(a, b, c, d) IN ((…), …)``, in time that grows faster
#: than the list: deleting 1,000 locked xcom rows by their keys took 195-234 ms in one
#: statement, 49 ms in ten of 100 (4,000: 257 ms, 188 ms in forty). A one-column list is
#: read as a sorted array: 1,000 task instance ids locked in 27-30 ms in one or two
#: statements, 114 ms in ten; it stays under 1,000 values, where MariaDB turns the list into a
#: subquery (in_predicate_conversion_threshold).
KEYS_PER_STATEMENT = 100
IDS_PER_STATEMENT = 999


def keys_in(cols: list[Column[Any]], keys: list[Key]) -> list[Any]:
    """``key IN (…)`` conditions covering *keys*: :data:`IDS_PER_STATEMENT` keys each for a
    one-column key, :data:`KEYS_PER_STATEMENT` for a composite one."""
    step = IDS_PER_STATEMENT if len(cols) == 1 else KEYS_PER_STATEMENT
    out = []
    for i in range(0, len(keys), step):
        part = keys[i:i + step]
        out.append(cols[0].in_([k[0] for k in part]) if len(cols) == 1
                   else tuple_(*cols).in_(part))
    return out
