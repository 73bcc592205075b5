"""Regenerate the schema dumps from a real Airflow: ``make airflow-schemas``.

For each Airflow version: install ``apache-airflow-core`` into a virtualenv of its own (never
statesweep's; mysqlclient there needs Debian's default-libmysqlclient-dev and pkg-config), run
``airflow db migrate`` on a fresh PostgreSQL and a fresh MariaDB database, and dump the schema
with the servers' own tools, plus the alembic_version row. The dumps are cleaned of client
meta-commands so that psql and the mariadb client load them as they are.

    python -m tests.airflow_schemas.generate                  # every version in VERSIONS
    python -m tests.airflow_schemas.generate --airflow /opt/airflow34/bin/airflow
    python -m tests.airflow_schemas.generate --install 3.4.0b2 --venv /opt/airflow34
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

from tests.airflow_schemas import HERE, VERSIONS, _client

PG = ("127.0.0.1", "5432", "postgres")
MY = ("127.0.0.1", "3306", "root")
DRIVERS = ["psycopg2-binary", "asyncpg", "mysqlclient", "aiomysql"]


def run(cmd: list[str], **kw: object) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} … failed:\n{proc.stderr[-2000:]}")
    return str(proc.stdout)


def install(version: str, venv: Path) -> Path:
    """apache-airflow-core==*version* and the DB drivers in *venv* (with --pre for a beta or
    rc: its own dependencies may be pre-releases too); returns its airflow executable. An
    existing install of that version is kept."""
    airflow = venv / "bin" / "airflow"
    if not airflow.exists() or installed_version(airflow) != version:
        run([sys.executable, "-m", "venv", str(venv)])
        pre = ["--pre"] if re.search(r"[a-z]", version) else []
        run([str(venv / "bin" / "pip"), "install", "-q", *pre,
             f"apache-airflow-core=={version}", *DRIVERS])
    return airflow


def installed_version(airflow: Path) -> str:
    python = airflow.parent / "python"
    return run([str(python), "-c", "from importlib.metadata import version; "
                "print(version('apache-airflow-core'))"]).strip()


def migrate(airflow: Path, conn: str) -> None:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "AIRFLOW_HOME": home, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": conn,
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
        run([str(airflow), "db", "migrate"], env=env)


def postgres_dump(airflow: Path) -> str:
    name = f"af_{uuid.uuid4().hex[:8]}"
    psql = [_client("psql"), "-X", "-q", "-h", PG[0], "-p", PG[1], "-U", PG[2]]
    run([*psql, "-d", "postgres", "-c", f'CREATE DATABASE "{name}"'])
    try:
        migrate(airflow, f"postgresql+psycopg2://{PG[2]}@{PG[0]}:{PG[1]}/{name}")
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


def mysql_dump(airflow: Path) -> str:
    name = f"af_{uuid.uuid4().hex[:8]}"
    client = [_client("mariadb", "mysql"), "--protocol=TCP", "-h", MY[0], "-P", MY[1],
              "-u", MY[2]]
    run([*client, "-e", f"CREATE DATABASE {name} CHARACTER SET utf8mb4 "
                        "COLLATE utf8mb4_unicode_ci"])
    try:
        migrate(airflow, f"mysql+mysqldb://{MY[2]}@{MY[0]}:{MY[1]}/{name}")
        dump = [_client("mariadb-dump", "mysqldump"), "--protocol=TCP", "-h", MY[0],
                "-P", MY[1], "-u", MY[2], "--skip-comments", "--skip-dump-date"]
        schema = run([*dump, "--no-data", "--skip-add-drop-table", name])
        rows = run([*dump, "--no-create-info", name, "alembic_version"])
    finally:
        run([*client, "-e", f"DROP DATABASE IF EXISTS {name}"])
    text = re.sub(r"/\*!50017 DEFINER=[^*]*\*/ ?", "", schema + rows)
    text = re.sub(r" DEFINER=`[^`]*`@`[^`]*`", "", text)
    # The sandbox mode line newer mariadb-dumps open with is a client meta-command.
    lines = [line for line in text.splitlines()
             if not line.startswith("/*M!999999\\- enable the sandbox mode */")]
    return "\n".join(sort_keys(lines)) + "\n"


def sort_keys(lines: list[str]) -> list[str]:
    """Sort each run of ``KEY``, ``UNIQUE KEY`` or ``CONSTRAINT`` lines of a CREATE TABLE:
    Airflow creates indexes in no fixed order, and SHOW CREATE TABLE lists them so."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        word = lines[i].split(" ", 3)[2] if lines[i].startswith("  ") else ""
        if word not in ("KEY", "UNIQUE", "CONSTRAINT"):
            out.append(lines[i])
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].startswith(f"  {word} "):
            j += 1
        run_ = sorted(line.rstrip(",") for line in lines[i:j])
        last_comma = lines[j - 1].endswith(",")
        out += [line + ("," if k < len(run_) - 1 or last_comma else "")
                for k, line in enumerate(run_)]
        i = j
    return out


def write(airflow: Path, version: str, out: Path, dialects: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for dialect in dialects:
        dump = postgres_dump if dialect == "postgresql" else mysql_dump
        path = out / f"airflow-{version}-{dialect}.sql"
        header = (f"-- Airflow {version} metadata schema ({dialect}), made by `airflow db "
                  "migrate` and dumped by python -m tests.airflow_schemas.generate.\n")
        path.write_text(header + dump(airflow))
        print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.airflow_schemas.generate")
    p.add_argument("--airflow", type=Path,
                   help="an installed Airflow's airflow executable: dump that one only")
    p.add_argument("--install", metavar="VERSION",
                   help="install apache-airflow-core==VERSION into --venv and dump it")
    p.add_argument("--venv", type=Path, help="the virtualenv for --install")
    p.add_argument("--version", action="append", help="an Airflow version (repeatable), each "
                   f"in --venvs/af-<version>; default: {', '.join(v for v, _ in VERSIONS)}")
    p.add_argument("--venvs", type=Path, default=Path("/opt"),
                   help="where each --version's own virtualenv is made (af-<version>)")
    p.add_argument("--dialect", choices=["postgresql", "mysql"], action="append",
                   help="dump only this backend (repeatable); default: both")
    p.add_argument("--out", type=Path, default=HERE, help="where the dumps are written")
    args = p.parse_args(argv)
    dialects = args.dialect or ["postgresql", "mysql"]
    if args.install:
        if args.airflow or args.version:
            p.error("--install takes no --airflow or --version")
        venv = args.venv or args.venvs / f"af-{args.install}"
        write(install(args.install, venv), args.install, args.out, dialects)
    elif args.airflow:
        if args.version:
            p.error("--airflow takes no --version")
        write(args.airflow, installed_version(args.airflow), args.out, dialects)
    else:
        for version in args.version or [v for v, _ in VERSIONS]:
            airflow = install(version, args.venvs / f"af-{version}")
            write(airflow, version, args.out, dialects)


if __name__ == "__main__":
    main()
