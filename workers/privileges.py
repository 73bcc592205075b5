"""Whether the database user may do what a run does: SELECT and DELETE on the state tables.

A read-only user (a reporting role, a replica's credentials) used to reach the first DELETE and
end in a driver traceback. These checks read catalogs or run a DELETE that matches nothing, in
a transaction rolled back, so they change nothing and take no row lock:

- PostgreSQL: ``has_table_privilege(table, privilege)`` for the current user (catalog only).
- MySQL/MariaDB: the statement itself, ``... WHERE 1 = 0``: the server checks privileges before
  it reads a row (error 1142) and grants can come from a role, a wildcard or a column list,
  which parsing SHOW GRANTS would have to replicate.
- SQLite has no users.

:func:`denied` turns a privilege error that a statement hit anyway (a grant revoked mid-run)
into the same one line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, Table, false, func, literal, select

from workers.exceptions import SchemaError

#: What a run needs on each state table: it reads (plans, counts) and deletes.
STATE_TABLE_PRIVILEGES = ("SELECT", "DELETE")
MYSQL_TABLE_ACCESS_DENIED = 1142  # ER_TABLEACCESS_DENIED_ERROR
POSTGRES_INSUFFICIENT_PRIVILEGE = "42501"


@dataclass(frozen=True)
class Missing:
    """One privilege the database user lacks on one table."""

    user: str
    privilege: str
    table: str


class PrivilegeError(SchemaError):
    """The database user lacks a privilege a run needs; nothing was deleted."""


def describe(missing: list[Missing], dialect: str, where: str = "") -> str:
    """One line naming the user, each missing privilege and table, and the GRANT to run."""
    user = missing[0].user
    lacks = ", ".join(f"{m.privilege} on table {m.table}" for m in missing)
    tables = sorted({m.table for m in missing})
    privileges = ", ".join(p for p in STATE_TABLE_PRIVILEGES
                           if any(m.privilege == p for m in missing)) or \
        ", ".join(sorted({m.privilege for m in missing}))
    if dialect == "postgresql":
        grantee = f'"{user}"'
    else:  # CURRENT_USER() reads name@host; GRANT takes 'name'@'host'
        name, _, host = user.partition("@")
        grantee = f"'{name}'@'{host}'" if host else f"'{name}'"
    grants = "; ".join(f"GRANT {privileges} ON {t} TO {grantee}" for t in tables)
    at = f" ({where})" if where else ""
    return (f"database user {user!r} lacks {lacks}{at}; nothing was deleted. Grant it (as the "
            f"table's owner or an admin): {grants}")


def current_user(conn: Connection) -> str:
    """PostgreSQL: the role; MySQL/MariaDB: the account the grants are on, ``name@host``."""
    return str(conn.execute(select(func.current_user())).scalar_one())


def missing_privileges(engine: Engine, tables: Iterable[Table],
                       privileges: tuple[str, ...] = STATE_TABLE_PRIVILEGES) -> list[Missing]:
    """Each of *privileges* the connecting user lacks on each of *tables*; [] on SQLite."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        return []
    found: list[Missing] = []
    with engine.connect() as conn:
        user = current_user(conn)
        conn.rollback()
        for table in tables:
            for privilege in privileges:
                if not _has(conn, dialect, table, privilege):
                    found.append(Missing(user, privilege, table.name))
    return found


def _has(conn: Connection, dialect: str, table: Table, privilege: str) -> bool:
    if dialect == "postgresql":
        quoted = conn.dialect.identifier_preparer.format_table(table)
        return bool(conn.execute(select(func.has_table_privilege(quoted, privilege)))
                    .scalar_one())
    from sqlalchemy.exc import DBAPIError

    probe = (select(literal(1)).select_from(table).where(false()) if privilege == "SELECT"
             else table.delete().where(false()))  # matches no row, rolled back below
    try:
        conn.execute(probe)
    except DBAPIError as exc:
        if _mysql_code(exc) == MYSQL_TABLE_ACCESS_DENIED:
            return False
        raise
    finally:
        conn.rollback()  # the DELETE matched nothing; nothing to keep either way
    return True


def check_privileges(engine: Engine, tables: Iterable[Table], where: str = "") -> None:
    """PrivilegeError (one line) when the user lacks SELECT or DELETE on one of *tables*."""
    missing = missing_privileges(engine, tables)
    if missing:
        raise PrivilegeError(describe(missing, engine.dialect.name, where))


def _mysql_code(exc: BaseException) -> int | None:
    args = getattr(getattr(exc, "orig", None), "args", ())
    return args[0] if args and isinstance(args[0], int) else None


_PG_TABLE = re.compile(r"permission denied for (?:table|relation) (\S+)")
# MariaDB: DELETE command denied to user 'ro'@'10.0.0.5' for table `airflow`.`task_state`
_MYSQL_DENIED = re.compile(r"(\w+) command denied to user '([^']*)'@'[^']*' for table (\S+)")


def denied(exc: BaseException, user: str = "") -> str | None:
    """The one line for a privilege error a statement hit (*exc* from SQLAlchemy), or None if
    *exc* is no such error. *user* is the configured one, for PostgreSQL's message lacks it."""
    orig = getattr(exc, "orig", None)
    if orig is None:
        return None
    if getattr(orig, "sqlstate", None) == POSTGRES_INSUFFICIENT_PRIVILEGE:
        match = _PG_TABLE.search(str(orig))
        statement = str(getattr(exc, "statement", "") or "").lstrip()
        verb = statement.split(None, 1)[0].upper() if statement else ""
        privilege = verb if verb in ("SELECT", "DELETE", "UPDATE", "INSERT") else "access"
        table = match.group(1) if match else "a table"
        return describe([Missing(user or "(the configured user)", privilege, table)],
                        "postgresql")
    if _mysql_code(exc) == MYSQL_TABLE_ACCESS_DENIED:
        found = _MYSQL_DENIED.search(str(orig))
        if found is None:
            return None
        privilege, who, qualified = found.groups()
        table = qualified.rstrip("\"'),").split(".")[-1].strip("`'\"")
        return describe([Missing(who, privilege.upper(), table)], "mysql")
    return None
