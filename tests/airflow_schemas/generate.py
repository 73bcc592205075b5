"""Regenerate the schema dumps from a real Airflow: ``make airflow-schemas``.

For each Airflow version: install ``apache-airflow-core`` into a virtualenv of its own (never
statesweep's; mysqlclient there needs Debian's default-libmysqlclient-dev and pkg-config), run
``airflow db migrate`` on a fresh PostgreSQL and a fresh MariaDB database, and dump the schema
with the servers' own tools, plus the alembic_version row. The dumps are cleaned of client
meta-commands so that psql and the mariadb client load them as they are.

    python -m tests.airflow_schemas.generate [--version 3.4.0b2] [--venvs /opt]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from tests.airflow_schemas import VERSIONS, _client, dump_path

PG = ("127.0.0.1", "5432", "postgres")
MY = ("127.0.0.1", "3306", "root")


def run(cmd: list[str], **kw: object) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} … failed:\n{proc.stderr[-2000:]}")
    return str(proc.stdout)


def airflow_venv(version: str, root: Path) -> Path:
    venv = root / f"af-{version}"
    if not (venv / "bin" / "airflow").exists():
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "pip"), "install", "-q", f"apache-airflow-core=={version}",
             "psycopg2-binary", "asyncpg", "mysqlclient", "aiomysql"])
    return venv


def migrate(venv: Path, conn: str) -> None:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "AIRFLOW_HOME": home, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": conn,
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
        run([str(venv / "bin" / "airflow"), "db", "migrate"], env=env)


def postgres_dump(venv: Path) -> str:
    name = f"af_{uuid.uuid4().hex[:8]}"
    psql = [_client("psql"), "-X", "-q", "-h", PG[0], "-p", PG[1], "-U", PG[2]]
    run([*psql, "-d", "postgres", "-c", f'CREATE DATABASE "{name}"'])
    try:
        migrate(venv, f"postgresql+psycopg2://{PG[2]}@{PG[0]}:{PG[1]}/{name}")
        args = ["-h", PG[0], "-p", PG[1], "-U", PG[2], "-d", name]
        schema = run([_client("pg_dump"), "--schema-only", "--no-owner", "--no-privileges",
                      *args])
        rows = run([_client("pg_dump"), "--data-only", "--table=alembic_version",
                    "--inserts", *args])
    finally:
        run([*psql, "-d", "postgres", "-c", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'])
    # Meta-commands of newer pg_dumps (\restrict) and settings older servers do not know.
    keep = [line for line in (schema + rows).splitlines()
            if not line.startswith("\\") and not line.startswith("SET transaction_timeout")]
    return "\n".join(keep) + "\n"


def mysql_dump(venv: Path) -> str:
    name = f"af_{uuid.uuid4().hex[:8]}"
    client = [_client("mariadb", "mysql"), "--protocol=TCP", "-h", MY[0], "-P", MY[1],
              "-u", MY[2]]
    run([*client, "-e", f"CREATE DATABASE {name} CHARACTER SET utf8mb4 "
                        "COLLATE utf8mb4_unicode_ci"])
    try:
        migrate(venv, f"mysql+mysqldb://{MY[2]}@{MY[0]}:{MY[1]}/{name}")
        dump = [_client("mariadb-dump", "mysqldump"), "--protocol=TCP", "-h", MY[0],
                "-P", MY[1], "-u", MY[2], "--skip-comments", "--skip-dump-date"]
        schema = run([*dump, "--no-data", "--skip-add-drop-table", name])
        rows = run([*dump, "--no-create-info", name, "alembic_version"])
    finally:
        run([*client, "-e", f"DROP DATABASE IF EXISTS {name}"])
    text = re.sub(r"/\*!50017 DEFINER=[^*]*\*/ ?", "", schema + rows)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.airflow_schemas.generate")
    p.add_argument("--version", action="append", help="an Airflow version (repeatable); "
                   f"default: {', '.join(v for v, _ in VERSIONS)}")
    p.add_argument("--venvs", type=Path, default=Path("/opt"),
                   help="where each Airflow's own virtualenv is made (af-<version>)")
    args = p.parse_args(argv)
    for version in args.version or [v for v, _ in VERSIONS]:
        venv = airflow_venv(version, args.venvs)
        for dialect, dump in (("postgresql", postgres_dump), ("mysql", mysql_dump)):
            path = dump_path(dialect, version)
            header = (f"-- Airflow {version} metadata schema ({dialect}), made by `airflow db "
                      "migrate` and dumped by python -m tests.airflow_schemas.generate.\n")
            path.write_text(header + dump(venv))
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
