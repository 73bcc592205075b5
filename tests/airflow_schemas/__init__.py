"""Real Airflow metadata schemas, made by Airflow's own ``airflow db migrate`` and dumped by the
servers' own tools (``make airflow-schemas`` regenerates them; see generate.py). Tests load one
into a fresh database and run statesweep against Airflow's exact tables, indexes and types.

    with airflow_schema_database("postgresql", "3.4.0b2") as url:
        ...
"""

from __future__ import annotations

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
    """Execute the dump of *version* into the empty database at *url*."""
    u = make_url(url)
    dialect = "postgresql" if u.get_backend_name() == "postgresql" else "mysql"
    sql = dump_path(dialect, version).read_text()
    if dialect == "postgresql":
        cmd = [_client("psql"), "-v", "ON_ERROR_STOP=1", "-q", "-X", "-h", u.host or "127.0.0.1",
               "-p", str(u.port or 5432), "-U", u.username or "postgres", "-d", str(u.database)]
    else:
        cmd = [_client("mariadb", "mysql"), "--protocol=TCP", "-h", u.host or "127.0.0.1",
               "-P", str(u.port or 3306), "-u", u.username or "root", str(u.database)]
    proc = subprocess.run(cmd, input=sql, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"loading {dump_path(dialect, version).name} failed: {proc.stderr}")


@contextmanager
def airflow_schema_database(dialect: str, version: str) -> Iterator[str]:
    """A fresh database (``postgresql`` or ``mariadb``) holding Airflow *version*'s schema."""
    fresh = fresh_postgres_database if dialect == "postgresql" else fresh_mariadb_database
    with fresh() as url:
        load(url, version)
        yield url
