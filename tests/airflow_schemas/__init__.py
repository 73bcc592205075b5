"""Real Airflow metadata schemas, made by Airflow's own ``airflow db migrate`` and dumped by the
servers' own tools (``make airflow-schemas`` regenerates them; see generate.py). Tests load one
into a fresh database and run statesweep against Airflow's exact tables, indexes and types.

    with airflow_schema_database("postgresql", "3.4.0b2") as url:
        ...
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import make_url

from tests.services import fresh_mariadb_database, fresh_postgres_database

HERE = Path(__file__).parent
#: (Airflow version, statesweep's name for its task-state layout), oldest first.
VERSIONS = [("3.3.2", "3.3"), ("3.4.0b2", "3.4")]
DIALECTS = {"postgresql": "postgresql", "mariadb": "mysql", "mysql": "mysql"}


def dump_path(dialect: str, version: str) -> Path:
    return HERE / f"airflow-{version}-{DIALECTS[dialect]}.sql"


def _client(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                            check=False).stdout.strip()
    for name in names:
        candidate = Path(bindir) / name
        if bindir and candidate.exists():
            return str(candidate)
    raise FileNotFoundError(f"none of {', '.join(names)} is installed")


def load(url: str, version: str) -> None:
    """Execute the dump of *version* into the empty database at *url* with the server's own
    client (psql, or the mariadb/mysql client); a failure raises with the client's stderr."""
    u = make_url(url)
    dialect = "postgresql" if u.get_backend_name() == "postgresql" else "mysql"
    path = dump_path(dialect, version)
    env = dict(os.environ)
    if dialect == "postgresql":
        cmd = [_client("psql"), "-v", "ON_ERROR_STOP=1", "-q", "-X", "-h", u.host or "127.0.0.1",
               "-p", str(u.port or 5432), "-U", u.username or "postgres", "-d", str(u.database),
               "-f", str(path)]
        stdin = None
        if u.password:
            env["PGPASSWORD"] = u.password
    else:
        cmd = [_client("mariadb", "mysql"), "--protocol=TCP", "-h", u.host or "127.0.0.1",
               "-P", str(u.port or 3306), "-u", u.username or "root", str(u.database)]
        stdin = path.read_text()
        if u.password:
            env["MYSQL_PWD"] = u.password
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"loading {path.name} into {u.database} failed "
                           f"(exit {proc.returncode}): {proc.stderr.strip()}")


@contextmanager
def airflow_schema_database(dialect: str, version: str) -> Iterator[str]:
    """A fresh database (``postgresql``, or ``mysql``/``mariadb``: the MariaDB server) holding
    Airflow *version*'s schema; dropped afterwards."""
    fresh = fresh_postgres_database if dialect == "postgresql" else fresh_mariadb_database
    with fresh() as url:
        load(url, version)
        yield url
