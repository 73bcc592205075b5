"""Which database a process cleans: the server as the server sees itself, the database's name
and the state tables, read in one cheap query.

The CLI reads its own before it sends a run and the coordinator compares it with its own: a URL
that names another database (a typo, a staging URL, a database the workers do not reach) is a
refused run naming both, not a run that "cleaned" the workers' database while the caller meant
another. The identity never holds a password: it is read from the server, not the URL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.exc import DBAPIError

from workers.exceptions import InvalidArgument, SchemaError
from workers.schema import TABLE_NAMES

_CANDIDATES = tuple(name for pair in TABLE_NAMES.values() for name in pair)

# PostgreSQL: the cluster's system identifier (shared by its physical standbys, unlike any
# address) when pg_control_system() may be called; the address and port otherwise.
_PG = text(
    "SELECT (SELECT system_identifier FROM pg_control_system())::text, "
    "host(inet_server_addr()), inet_server_port(), current_database(), "
    "ARRAY(SELECT n FROM unnest(CAST(:names AS text[])) AS n WHERE to_regclass(n) IS NOT NULL)")
_PG_NO_CONTROL = text(
    "SELECT NULL, host(inet_server_addr()), inet_server_port(), current_database(), "
    "ARRAY(SELECT n FROM unnest(CAST(:names AS text[])) AS n WHERE to_regclass(n) IS NOT NULL)")
# MariaDB has no server_uuid; MySQL does. Both: the host name and port the server reports.
_MARIADB = text(
    "SELECT NULL, @@hostname, @@port, DATABASE(), (SELECT GROUP_CONCAT(table_name) FROM "
    "information_schema.tables WHERE table_schema = DATABASE() AND table_name IN :names)"
).bindparams(bindparam("names", expanding=True))
_MYSQL = text(
    "SELECT @@server_uuid, @@hostname, @@port, DATABASE(), (SELECT GROUP_CONCAT(table_name) "
    "FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name IN :names)"
).bindparams(bindparam("names", expanding=True))
_SQLITE = text(
    "SELECT NULL, (SELECT file FROM pragma_database_list WHERE name = 'main'), NULL, 'main', "
    "(SELECT group_concat(name) FROM sqlite_master WHERE type = 'table' AND name IN :names)"
).bindparams(bindparam("names", expanding=True))


@dataclass(frozen=True)
class DatabaseIdentity:
    """A database as its server names it. *tables* is the task and asset state tables of the
    naming in use, "" when the database holds neither naming's task state table."""

    server: str
    database: str
    tables: str

    def __str__(self) -> str:
        return (f"database {self.database!r} on {self.server}, tables "
                f"{self.tables or '(no state tables)'}")

    def encode(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def decode(cls, value: Any) -> DatabaseIdentity:
        """The identity a task argument carries; InvalidArgument when it is not one."""
        if not isinstance(value, dict) or set(value) != {"server", "database", "tables"} or (
                not all(isinstance(v, str) for v in value.values())):
            raise InvalidArgument(f"expect_database must be a database identity "
                                  f"{{server, database, tables}}, got {value!r}")
        return cls(**value)


def other_database(expected: DatabaseIdentity, ours: DatabaseIdentity) -> str:
    """Why a task meant for *expected* is refused by a worker cleaning *ours*: both named."""
    return (f"the caller's database is {expected} but the workers clean {ours}; point "
            "STATESWEEP_DATABASE_URL of the CLI and the workers at the same database")


def read_identity(conn: Connection, naming: str = "auto") -> DatabaseIdentity:
    """This connection's database identity, in one query. *naming* is STATESWEEP_TABLE_NAMING
    or a naming already resolved: 'auto' takes the one whose task state table exists (both is
    the SchemaError every process gives)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        row = _pg_row(conn)
    elif dialect in ("mysql", "mariadb"):
        mariadb = bool(getattr(conn.dialect, "is_mariadb", False))
        row = conn.execute(_MARIADB if mariadb else _MYSQL, {"names": _CANDIDATES}).one()
        dialect = "mariadb" if mariadb else "mysql"
    else:
        row = conn.execute(_SQLITE, {"names": _CANDIDATES}).one()
    system_id, host, port, database, found = row
    present = set(found) if isinstance(found, list) else set(str(found or "").split(","))
    if system_id:
        server = f"{dialect} server {system_id}"
    elif dialect == "sqlite":
        server = f"sqlite file {host or '(in memory)'}"
    else:
        server = f"{dialect} server {host or 'local socket'}:{port}"
    return DatabaseIdentity(server, str(database or ""), _tables(present, naming))


def _pg_row(conn: Connection) -> Any:
    try:
        with conn.begin_nested():
            return conn.execute(_PG, {"names": list(_CANDIDATES)}).one()
    except DBAPIError as exc:  # pg_control_system() revoked from this user: the address
        if getattr(exc.orig, "sqlstate", "") != "42501":
            raise
    return conn.execute(_PG_NO_CONTROL, {"names": list(_CANDIDATES)}).one()


def _tables(present: set[str], naming: str) -> str:
    if naming == "auto":
        found = [n for n, (task, _) in TABLE_NAMES.items() if task in present]
        if len(found) > 1:
            raise SchemaError("the database holds both task_state and task_state_store; set "
                              "STATESWEEP_TABLE_NAMING to 'seed' or 'airflow' to say which one "
                              "to clean")
        if not found:
            return ""
        naming = found[0]
    task, asset = TABLE_NAMES[naming]
    return f"{task}, {asset}" if task in present else ""
