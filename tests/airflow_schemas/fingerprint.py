"""Proving a schema unchanged: ``schema_fingerprint`` is the server's own dump of every table
(pg_dump --schema-only, or SHOW CREATE TABLE) followed by SQLAlchemy's inspector view, so any
change to a table, column, index or constraint changes it; rows and counters do not.

    before = schema_fingerprint(engine)
    ...
    assert schema_fingerprint(engine) == before
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

from sqlalchemy import Engine, inspect
from sqlalchemy.engine import make_url


def _family(engine: Engine) -> str:
    return "mysql" if engine.dialect.name in ("mysql", "mariadb") else engine.dialect.name



def schema_fingerprint(engine: Engine) -> str:
    """A text that changes whenever the schema does: the server's own dump of every table
    (pg_dump --schema-only, or SHOW CREATE TABLE) followed by SQLAlchemy's inspector view."""
    return server_schema_dump(engine) + "\n" + inspector_view(engine)


def server_schema_dump(engine: Engine) -> str:
    """The server's own description of the schema; data (rows, counters) left out."""
    if _family(engine) == "postgresql":
        return _pg_dump_schema(engine)
    return _mysql_show_create(engine)


def inspector_view(engine: Engine) -> str:
    insp = inspect(engine)
    lines: list[str] = []
    for table in sorted(insp.get_table_names()):
        lines.append(f"table {table}")
        for col in insp.get_columns(table):
            lines.append(f"  column {col['name']} {col['type']!r} nullable={col['nullable']} "
                         f"default={col.get('default')!r}")
        lines.append(f"  pk {insp.get_pk_constraint(table)!r}")
        for key in ("foreign_keys", "indexes", "unique_constraints"):
            items: list[dict[str, Any]] = getattr(insp, f"get_{key}")(table)
            for item in sorted(items, key=lambda i: str(i.get("name"))):
                lines.append(f"  {key} {sorted(item.items())!r}")
    return "\n".join(lines)


def _pg_dump_schema(engine: Engine) -> str:
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise RuntimeError("pg_dump is not installed; it is needed to compare schemas")
    url = make_url(engine.url.render_as_string(hide_password=False)).set(
        drivername="postgresql")
    out = subprocess.run(
        [pg_dump, "--schema-only", "--no-owner", "--no-privileges",
         "-d", url.render_as_string(hide_password=False)],
        check=True, capture_output=True, text=True, timeout=60,
    )
    # \restrict / \unrestrict carry a random key per dump (pg_dump 15.14+); not schema.
    return "\n".join(line for line in out.stdout.splitlines()
                     if not line.startswith(("\\restrict", "\\unrestrict")))


def _mysql_show_create(engine: Engine) -> str:
    with engine.connect() as conn:
        tables = sorted(r[0] for r in conn.exec_driver_sql("SHOW TABLES"))
        dumps = [str(conn.exec_driver_sql(f"SHOW CREATE TABLE `{t}`").one()[1]) for t in tables]
    # The AUTO_INCREMENT counter is data (it moves with every insert), not schema.
    return "\n".join(re.sub(r" AUTO_INCREMENT=\d+", "", d) for d in dumps)
