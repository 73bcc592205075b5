"""Archive tables (``_airflow_deleted__<table>__<time>``): list, export (CSV, JSON), drop; what
Airflow's ``db export-archived`` and ``db drop-archived`` do. Names come from the database's own
catalog and are only ever used through SQLAlchemy's Table objects, never pasted into SQL."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, Table, func, inspect, select

from workers.dbclean.rules import ARCHIVE_PREFIX

#: Tables Airflow's own migrations archived into (the 2 -> 3 XCom move); Airflow lists them too.
MIGRATION_ARCHIVES = ("_xcom_archive",)
FETCH = 500


@dataclass(frozen=True)
class Archive:
    name: str
    source: str  # the table its rows came from
    rows: int


def source_of(name: str) -> str:
    """``_airflow_deleted__dag_run__20260601000000`` -> ``dag_run``."""
    if name in MIGRATION_ARCHIVES:
        return name
    return name[len(ARCHIVE_PREFIX):].rsplit("__", 1)[0]


def list_archives(engine: Engine, tables: tuple[str, ...] = ()) -> list[Archive]:
    """Archive tables in the database, of *tables* when given (by their source table)."""
    names = sorted(n for n in inspect(engine).get_table_names()
                   if n.startswith(ARCHIVE_PREFIX) or n in MIGRATION_ARCHIVES)
    out = []
    with engine.connect() as conn:
        for name in names:
            if tables and source_of(name) not in tables:
                continue
            t = Table(name, MetaData(), autoload_with=conn)
            rows = int(conn.execute(select(func.count()).select_from(t)).scalar_one())
            out.append(Archive(name, source_of(name), rows))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return value


def export(engine: Engine, archive: str, path: Path, fmt: str) -> int:
    """Write *archive* to *path* as ``csv`` (a header row, then rows) or ``json`` (a list of
    objects), streaming; returns the rows written."""
    n = 0
    with engine.connect() as conn, path.open("w", newline="") as f:
        t = Table(archive, MetaData(), autoload_with=conn)
        result = conn.execution_options(stream_results=True).execute(select(t))
        names = list(result.keys())
        writer = csv.writer(f) if fmt == "csv" else None
        if writer is not None:
            writer.writerow(names)
        else:
            f.write("[")
        while rows := result.fetchmany(FETCH):
            for row in rows:
                values = [_plain(v) for v in row]
                if writer is not None:
                    writer.writerow(values)
                else:
                    f.write(("," if n else "") + "\n" + json.dumps(dict(zip(names, values,
                                                                            strict=True))))
                n += 1
        if writer is None:
            f.write("\n]\n")
    return n


def drop(engine: Engine, archive: str) -> None:
    if not (archive.startswith(ARCHIVE_PREFIX) or archive in MIGRATION_ARCHIVES):
        raise ValueError(f"{archive} is not an archive table")  # never drop a live table
    with engine.begin() as conn:
        Table(archive, MetaData(), autoload_with=conn).drop(conn)
