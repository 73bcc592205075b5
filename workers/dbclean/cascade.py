"""Bounded cascades: a parent chunk's dependants are deleted before it, in batches of at most
``batch_size`` rows, each batch a transaction of its own, so the parent's DELETE cascades into
(almost) nothing and no transaction grows with a parent's fan-out (a dag run's task instances,
their XComs, …).

The dependants are what ``ON DELETE CASCADE`` would delete, read from the live schema's foreign
keys: the cascade tree under the parent table. A batch deletes only rows whose ancestor row is
in the parent chunk's range and satisfies the parent's rule at that moment (a join down from
the chunk's rows, re-evaluated by every batch), so a parent that stopped being eligible (a dag run
that became its dag's last) keeps its dependants from then on.

Airflow 3.4 archives what a ``task_instance`` or ``dag_run`` delete cascades to in the attempt
tables (rules.CASCADE_ARCHIVED); so does a batch given the run's archive of its table: it copies
the rows it deletes into it in the same transaction, so a crash leaves each row in its table or
in the archive, never both. :func:`cascade_archives` makes those archives, one per table per run.

A parent table with a referrer that can refuse its delete (``ON DELETE RESTRICT`` or ``NO
ACTION``: ``task_instance.dag_version_id`` under ``dag``, ``callback.trigger_id``) anywhere in its
tree is not pre-cleaned: a refused delete would leave the parent in place without the dependants
already deleted. Its chunks cascade inside their own transaction, as Airflow's do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    Table,
    and_,
    exists,
    func,
    inspect,
    literal_column,
    or_,
    select,
)
from sqlalchemy.exc import DBAPIError

from workers.dbclean import statements as sql
from workers.dbclean.rules import ARCHIVE_PREFIX, cascade_archived

#: ON DELETE actions that remove or detach the referrer: a delete of the parent never fails.
YIELDING = ("CASCADE", "SET NULL", "SET DEFAULT")


@dataclass(frozen=True)
class Edge:
    """``child.child_cols`` references ``parent.parent_cols``."""

    parent: str
    child: str
    child_cols: tuple[str, ...]
    parent_cols: tuple[str, ...]
    ondelete: str | None


Path = tuple[Edge, ...]


class ForeignKeys:
    """The live schema's foreign keys, by referred table (one catalog read)."""

    def __init__(self, bind: Engine | Connection) -> None:
        self.referrers: dict[str, list[Edge]] = {}
        for (_schema, child), fks in inspect(bind).get_multi_foreign_keys().items():
            for fk in fks:
                ondelete = (fk.get("options") or {}).get("ondelete")
                edge = Edge(fk["referred_table"], child, tuple(fk["constrained_columns"]),
                            tuple(fk["referred_columns"]), ondelete.upper() if ondelete else None)
                self.referrers.setdefault(edge.parent, []).append(edge)

    def cascade_paths(self, table: str) -> list[Path] | None:
        """Every path of CASCADE edges down from *table*, deepest first (a grandchild's path
        before its parent's); None when a referrer anywhere in the tree can refuse the delete."""
        paths: list[Path] = []

        def walk(name: str, path: Path, seen: frozenset[str]) -> bool:
            for edge in self.referrers.get(name, []):
                if edge.ondelete not in YIELDING:
                    return False
                if edge.ondelete != "CASCADE" or edge.child in seen:
                    continue
                if not walk(edge.child, (*path, edge), seen | {edge.child}):
                    return False
                paths.append((*path, edge))
            return True

        return paths if walk(table, (), frozenset({table})) else None


def descends_from_chunk(tables: dict[str, Table], path: Path, target: Any,
                        root_cond: list[Any]) -> Any:
    """Condition on *target* (the path's last table): its ancestor row in the root table
    satisfies *root_cond* (the parent chunk's range and rule), now."""
    cond = root_cond
    # From the root down: each level is EXISTS (parent row of this row, satisfying the level
    # above); the last level is correlated to *target*.
    for i, edge in enumerate(path):
        parent = tables[edge.parent]
        child = target if i == len(path) - 1 else tables[edge.child]
        joined = [parent.c[p] == child.c[c]
                  for c, p in zip(edge.child_cols, edge.parent_cols, strict=True)]
        cond = [exists().select_from(parent).where(*joined, *cond)]
    return cond[0]


def under_chunk(tables: dict[str, Table], path: Path, target: Any, root_cond: list[Any]) -> Any:
    """The keys of *target* (the path's last table) under the parent chunk, each with its root
    row's key (labelled ``root_<n>``, after the target's key columns): a join from the root
    table down the path's foreign keys, filtered by *root_cond* (the chunk's key range and rule).

    The join starts from the chunk's key range on the root's primary key and follows each
    level's foreign key through the child's index on it (task_instance's ti_dag_run, xcom's
    idx_xcom_task_instance, xcom_v2's xcom_v2_ti_key_uq, …; InnoDB indexes every foreign key,
    Airflow's PostgreSQL schema all but two small tables'), so a batch reads the rows under the
    chunk, not the dependant table. Each level refers to a unique key of the level above, so a
    row is joined to at most one ancestor and listed once."""
    root = tables[path[0].parent]
    joined: Any = root
    for i, edge in enumerate(path):
        parent = tables[edge.parent]
        child = target if i == len(path) - 1 else tables[edge.child]
        joined = joined.join(child, and_(*[parent.c[p] == child.c[c] for c, p
                                           in zip(edge.child_cols, edge.parent_cols,
                                                  strict=True)]))
    keys = [target.c[c.name] for c in sql.key_columns(tables[path[-1].child])]
    roots = [c.label(f"root_{i}") for i, c in enumerate(sql.key_columns(root))]
    return select(*keys, *roots).select_from(joined).where(*root_cond)


def batch_query(conn: Connection, tables: dict[str, Table], path: Path, root_cond: list[Any],
                batch_size: int, after: sql.Key | None = None,
                until: sql.Key | None = None) -> Any:
    """The SELECT that picks a batch's keys and their root keys (what delete_batch_from runs, and
    what EXPLAIN shows), from the root key *after* on and up to *until* (both inclusive) when
    given.

    PostgreSQL: locks the dependant's rows only (``FOR UPDATE OF candidate``), not the ancestors
    it joins. MySQL/MariaDB: unlocked (MariaDB has no ``FOR UPDATE OF``, and a locking join
    would lock the ancestors' rows too); delete_batch_from then locks the keys it found."""
    root_keys = sql.key_columns(tables[path[0].parent])
    key = sql.key_expr(root_keys)
    if after is not None:
        root_cond = [*root_cond, key >= sql.key_value(after)]
    if until is not None:
        root_cond = [*root_cond, key <= sql.key_value(until)]
    if sql.is_mysql(conn):
        query = under_chunk(tables, path, tables[path[-1].child], root_cond)
    else:
        # An alias: the batch's rows, named apart from the DELETE's own table.
        candidate = tables[path[-1].child].alias("candidate")
        query = under_chunk(tables, path, candidate, root_cond).with_for_update(of=candidate)
    if batch_size <= 0:
        return query
    # In the root's key order: without it, PostgreSQL reads a LIMIT as "stop early" and scans
    # the dependant table from its start, costed as if the chunk's rows were spread evenly
    # through it (they are together, often at its end, behind the rows earlier batches
    # deleted); ordered, the cheap plan is the root's key index down the foreign keys'.
    return query.order_by(*root_keys).limit(batch_size)


def find_batch(conn: Connection, tables: dict[str, Table], path: Path, root_cond: list[Any],
               batch_size: int, after: sql.Key | None = None,
               until: sql.Key | None = None) -> list[tuple[Any, ...]]:
    """MySQL/MariaDB: a batch's keys, each followed by its root key, as batch_query finds them
    (unlocked, in the root's key order): what delete_batch_from takes as *found*."""
    return [tuple(r) for r in conn.execute(batch_query(conn, tables, path, root_cond, batch_size,
                                                       after, until))]


def delete_batch_from(conn: Connection, tables: dict[str, Table], path: Path,
                      root_cond: list[Any], batch_size: int, archive: Table | None = None,
                      after: sql.Key | None = None, until: sql.Key | None = None,
                      found: list[tuple[Any, ...]] | None = None) -> tuple[int, sql.Key | None]:
    """Delete at most *batch_size* rows of the path's last table whose ancestor satisfies
    *root_cond* (and whose root key is *after* or later, and *until* or earlier), in the
    caller's transaction, copying
    them into *archive* first when given; their keys are locked first. Returns the rows deleted
    and the root key of the last row found (None: none found), where the next batch starts: the
    rows under earlier roots are gone, and a search from the chunk's start would walk past
    their dead index entries again, batch after batch (a dag_run chunk's xcom batches, shrunk
    by their time to 100 rows, grew slower with every one).

    PostgreSQL: one statement (:func:`_move_batch`). MySQL/MariaDB (no FOR UPDATE OF, no DML in
    a CTE): the same join, unlocked; then the rule, once, on the root rows it found (``SELECT
    root key … WHERE root key IN (those) AND <root_cond>``); then ``SELECT key … WHERE key IN
    (those) AND <EXISTS chain up to a root that passed> FOR UPDATE`` (primary key lookups: locks
    the rows and re-checks that they still descend from an eligible row of the chunk), then the
    INSERT into the archive and the DELETE of the keys locked. With *found* (find_batch's rows,
    searched before this transaction began: workers.dbclean.run does, so the search's join
    holds no transaction open) the search is not run again; the check and the locks judge
    them as they judge their own search's.

    The rule once per batch, not in every key list's EXISTS chain: dag_run's keep-last is a
    GROUP BY over dag_run, which MariaDB computed again in each of a 1,000-row xcom batch's ten
    locking statements (21-37 ms each; the batch took 345 ms, 220 ms checking once). Neither
    reads the root rows with a lock (MariaDB locks only the rows a locking SELECT returns), and
    under REPEATABLE READ both read the snapshot of the batch's first statement: the same
    answer, computed once."""
    target = tables[path[-1].child]
    if not sql.is_mysql(conn):
        return _move_batch(conn, batch_query(conn, tables, path, root_cond, batch_size, after,
                                             until), target, archive)
    cols = sql.key_columns(target)
    if found is None:
        found = find_batch(conn, tables, path, root_cond, batch_size, after, until)
    if not found:
        return 0, None
    n = len(cols)
    keys, last = [k[:n] for k in found], found[-1][n:]
    root_cols = sql.key_columns(tables[path[0].parent])
    roots = [tuple(r) for chosen in sql.keys_in(root_cols, list(dict.fromkeys(
        k[n:] for k in found))) for r in conn.execute(select(*root_cols).where(chosen,
                                                                                *root_cond))]
    if not roots:
        return 0, last
    ancestor = descends_from_chunk(tables, path, target, [or_(*sql.keys_in(root_cols, roots))])
    locked = [tuple(r) for chosen in sql.keys_in(cols, keys) for r in conn.execute(
        select(*cols).where(chosen, ancestor).with_for_update())]
    return sql.move_keys(conn, target, archive, locked), last


def _move_batch(conn: Connection, query: Any, target: Table,
                archive: Table | None) -> tuple[int, sql.Key | None]:
    """PostgreSQL: a batch in one statement, no key crossing the client::

        WITH batch AS (SELECT candidate.ctid, root key … ORDER BY root key LIMIT n
                       FOR UPDATE OF candidate),
             moved AS (DELETE FROM target WHERE ctid IN (SELECT ctid FROM batch) RETURNING *)
             [, archived AS (INSERT INTO archive SELECT * FROM moved RETURNING …)]
        SELECT (SELECT count(*) FROM moved|archived), root key FROM batch
        ORDER BY root key DESC LIMIT 1

    The DELETE finds each row by its ctid (a TID scan per row), which the batch's row lock holds
    still until commit: nothing can update or move a locked row. (Sending the keys back as
    ``(dag_run_id, task_id, map_index, key) IN ((…), …)`` made PostgreSQL test every row
    against every key: 220-320 ms for 1,000 xcom rows, 19 ms this way.) A row that another
    transaction changed while the batch waited for its lock is locked in its new version, which
    this statement's snapshot does not see: it stays, and the last pass over the chunk's roots
    (workers.dbclean.run._delete_dependants) finds it."""
    prep = conn.dialect.identifier_preparer
    batch = query.add_columns(literal_column(f"{prep.quote('candidate')}.ctid").label("tid")) \
        .cte("batch")
    moved = sql.moved_rows(target, archive, [literal_column(f"{prep.format_table(target)}.ctid")
                                             .in_(select(batch.c.tid))])
    roots = [c for c in batch.c if c.name.startswith("root_")]
    row = conn.execute(select(select(func.count()).select_from(moved).scalar_subquery(), *roots)
                       .order_by(*[r.desc() for r in roots]).limit(1)).first()
    if row is None:
        return 0, None
    return int(row[0]), tuple(row[1:])


def archive_table(name: str, source: Table) -> Table:
    """The archive *name* of *source*, as sql.create_archive makes it (the same columns), without
    reading the catalog."""
    return Table(name, MetaData(), *[Column(c.name, c.type, nullable=True) for c in source.c])


def cascade_archives(engine: Engine, version: str, table: str, parent_archive: str,
                     targets: Iterable[Table]) -> dict[str, Table]:
    """This run's archive of each dependant table (of *targets*, the tables a chunk of *table*
    deletes first) whose rows Airflow *version* archives with the cascade (3.4: the attempt
    tables under task_instance and dag_run), by table name; none for other tables and versions.

    One archive per table per run: ``_airflow_deleted__<target>__<time>``, the time of the
    parent's own archive (*parent_archive*, made first), so the rows of xcom_v2 that its own rule
    and task_instance's and dag_run's cascades move share one table. Each is made when missing,
    in a transaction of its own before any batch (MySQL's DDL commits whatever is open); one
    that another process of the run made meanwhile is taken as it is."""
    wanted = cascade_archived(version, table)
    when = parent_archive.rsplit("__", 1)[1]
    out: dict[str, Table] = {}
    for source in targets:
        if source.name not in wanted or source.name in out:
            continue
        name = f"{ARCHIVE_PREFIX}{source.name}__{when}"
        if not inspect(engine).has_table(name):
            try:
                with engine.begin() as conn:
                    sql.create_archive(conn, source, name)
            except DBAPIError:
                if not inspect(engine).has_table(name):
                    raise
        out[source.name] = archive_table(name, source)
    return out
