"""``python -m bench.dbclean_compare``: ``statesweep db-clean`` against ``airflow db clean``.

    python -m bench.dbclean_compare --airflow /opt/af-3.3.2/bin/airflow [--db mariadb]
        [--scale 1] [--tasks 5] [--cases archived,skip-archive] [--workers N]

One database (PostgreSQL, or MariaDB with ``--db mariadb``) holding the schema of the Airflow
that ``--airflow`` runs (3.3.2 or 3.4.0b2: tests/airflow_schemas, made by ``airflow db
migrate``; ``--migrate`` runs the migration here instead) is filled server-side
(bench.dbclean_fill) with Airflow rows spread around T = 2026-06-01: dags, dag versions, dag
runs (scheduled and manual, some never started), task instances, XComs, task reschedules, task
state, log, job, callbacks in every state with deadlines, import errors, revoked tokens.
``--scale 10 --tasks 10`` is the issue's size: 200k dag runs, 2M task instances, 2M XComs, 2M
log rows. It is cloned twice per case (MariaDB: schema loaded, tables copied server-side);
``airflow db clean --clean-before-timestamp T -y --batch-size B`` runs on one clone, ``statesweep
db-clean`` with the same options on the other (``--local``, or on N workers of its own with
``--workers N``, bench.dbclean_workers), and every table is compared by primary key. Each of
statesweep's archives must hold only rows its table lost, each once; Airflow's archives (one
per batch) are compared with statesweep's (one per table).

Beside each tool's wall time (bench.dbclean_speed): the longest transaction it held open,
sampled from the server every 20 ms, and the p99 latency of a writer on the cleaned tables
during the run and in an idle window just before; load average before and after.

Nothing to install by hand: when the ``--airflow`` path does not exist, apache-airflow-core
(3.3.2, or 3.4.0b2 for an ``af-3.4`` path) and its drivers are installed into a venv under
``~/.cache/statesweep-bench/af-<version>`` (tests.airflow_schemas.generate.install); with
``--db mariadb``, mysqlclient is pip-installed into that venv when missing, after
``apt-get install -y default-libmysqlclient-dev pkg-config`` when run as root and its headers
are missing. Output: bench/results/dbclean_compare_<db>_<version>_x<scale>[_k<tasks>].md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, Table, inspect, select, text

from bench import dbclean_fill as fill
from bench.dbclean_speed import (
    TransactionSampler,
    Writer,
    drop_writer_rows,
    engine_for,
    kept_ids,
    uptime,
)
from workers.dbclean.rules import cascade_archived

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "_airflow_deleted__"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "statesweep-bench"
#: Airflow version per --airflow default: the venv the bench makes when the path is missing.
DEFAULT_VERSION = {"af-3.3.2": "3.3.2", "af-3.4": "3.4.0b2"}


class Server:
    """One database server: names become URLs (statesweep's form and Airflow's), databases
    are made, cloned and dropped. MariaDB has no template databases: a clone is the schema
    dump loaded again and every table copied server-side (INSERT … SELECT, checks off)."""

    def __init__(self, db: str) -> None:
        self.pg = db == "postgresql"
        self.base = ("postgresql://postgres@127.0.0.1:5432" if self.pg
                     else "mysql://root@127.0.0.1:3306")

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def airflow_url(self, name: str) -> str:
        return (self.url(name).replace("postgresql://", "postgresql+psycopg2://") if self.pg
                else self.url(name).replace("mysql://", "mysql+mysqldb://"))

    def _admin(self) -> Engine:
        return engine_for(self.url("postgres" if self.pg else "mysql"), "dbc_admin") \
            .execution_options(isolation_level="AUTOCOMMIT")

    def drop(self, name: str) -> None:
        eng = self._admin()
        with eng.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' if self.pg
                              else f"DROP DATABASE IF EXISTS `{name}`"))
        eng.dispose()

    def create(self, name: str, version: str, template: str | None = None) -> None:
        self.drop(name)
        eng = self._admin()
        with eng.connect() as conn:
            conn.execute(text(
                f'CREATE DATABASE "{name}" TEMPLATE "{template or "template0"}"' if self.pg
                else f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 "
                     "COLLATE utf8mb4_unicode_ci"))
        eng.dispose()
        if template and not self.pg:
            from tests.airflow_schemas import load

            load(self.url(name), version)
            copy_tables(self.url(template), name)

    @contextmanager
    def database(self, name: str, version: str,
                 template: str | None = None) -> Iterator[str]:
        self.create(name, version, template)
        try:
            yield self.url(name)
        finally:
            self.drop(name)


def copy_tables(src_url: str, dst: str) -> None:
    src = src_url.rsplit("/", 1)[1]
    eng = engine_for(src_url, "dbc_copy")
    with eng.connect() as conn:
        conn.execute(text("SET FOREIGN_KEY_CHECKS = 0, UNIQUE_CHECKS = 0"))
        for name in inspect(conn).get_table_names():
            if conn.execute(text(f"SELECT 1 FROM `{src}`.`{name}` LIMIT 1")).first() is None:  # noqa: S608
                continue
            if conn.execute(text(f"SELECT 1 FROM `{dst}`.`{name}` LIMIT 1")).first():  # noqa: S608
                continue  # alembic_version: the dump's own row
            conn.execute(text(f"INSERT INTO `{dst}`.`{name}` SELECT * FROM `{src}`.`{name}`"))  # noqa: S608
            conn.commit()
    eng.dispose()


def mysql_headers() -> None:
    """mysqlclient builds from source: Debian's default-libmysqlclient-dev and pkg-config,
    installed with apt-get when missing and run as root (otherwise pip says what is missing)."""
    missing = subprocess.run(["pkg-config", "--exists", "mysqlclient"],
                             capture_output=True).returncode if shutil.which("pkg-config") else 1
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "default-libmysqlclient-dev", "pkg-config"],
                       check=True, capture_output=True)


def ensure_airflow(airflow: str, pg: bool) -> tuple[str, str]:
    """The airflow executable and its version: *airflow* if it exists, else a venv made under
    the cache dir (tests.airflow_schemas.generate.install: apache-airflow-core and the drivers
    of both databases); for MariaDB, mysqlclient in that venv when missing."""
    from tests.airflow_schemas.generate import install, installed_version

    path = Path(airflow)
    if not path.exists():
        version = DEFAULT_VERSION.get(path.parent.parent.name, "3.3.2")
        mysql_headers()
        path = install(version, CACHE / f"af-{version}")
    python = str(path.parent / "python")
    if not pg and subprocess.run([python, "-c", "import MySQLdb"],
                                 capture_output=True).returncode:
        mysql_headers()
        subprocess.run([python, "-m", "pip", "install", "-q", "mysqlclient"], check=True)
    return str(path), installed_version(path)


def airflow_order(airflow: str) -> tuple[str, list[str]]:
    """A PYTHONHASHSEED under which Airflow cleans dag_run before callback and
    partitioned_asset_key_log, as statesweep always does, and Airflow's table order under it.

    Airflow orders the tables it cleans by iterating a Python set of their names, so the order
    (and, where one table's cascade changes what another's filter reads, the result) changes
    with each process's hash seed: a callback whose only deadline goes with its dag run is
    purged only if dag_run is cleaned first."""
    python = str(Path(airflow).parent / "python")
    probe = ("from airflow.utils.db_cleanup import _effective_table_names as e; "
             "print(','.join(e(table_names=None)[0]))")
    for seed in range(100):
        with tempfile.TemporaryDirectory() as home:
            done = subprocess.run([python, "-c", probe], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONHASHSEED": str(seed),
                                       "AIRFLOW_HOME": home}, check=True)
        order = done.stdout.strip().splitlines()[-1].split(",")
        if order.index("dag_run") < min(order.index("callback"),
                                        order.index("partitioned_asset_key_log")):
            return str(seed), order
    raise SystemExit("no hash seed puts Airflow's dag_run before callback")


SEED = "0"
#: Database names of this run (another run may be going on the same server).
TAG = f"dbc_{os.getpid()}"


def airflow_env(url: str, home: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("STATESWEEP_")},
            "PYTHONHASHSEED": SEED,
            "AIRFLOW_HOME": home, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url}


def build_source(server: Server, name: str, airflow: str, version: str, migrate: bool,
                 sizes: dict[str, int]) -> None:
    url = server.url(name)
    if migrate:
        with tempfile.TemporaryDirectory() as home:
            subprocess.run([airflow, "db", "migrate"],
                           env=airflow_env(server.airflow_url(name), home), check=True,
                           capture_output=True)
    else:
        from tests.airflow_schemas import load

        load(url, version)
    eng = engine_for(url, "dbc_fill")
    for statement in fill.statements("postgresql" if server.pg else "mariadb", version,
                                     **sizes):
        t0 = time.monotonic()
        with eng.begin() as conn:
            conn.execute(text(statement))
        print(f"  {statement.split('(')[0].strip()}: {time.monotonic() - t0:.1f} s",
              file=sys.stderr)
    with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if server.pg:
            conn.execute(text("VACUUM ANALYZE"))
        else:
            for t in inspect(conn).get_table_names():
                conn.execute(text(f"ANALYZE TABLE `{t}`")).all()
    eng.dispose()


def snapshot(url: str) -> dict[str, set[Any]]:
    """Primary keys of every table (archives included), as sets of hashes of their text."""
    eng = engine_for(url, "dbc_snapshot")
    out: dict[str, set[Any]] = {}
    try:
        with eng.connect() as conn:
            for name in inspect(conn).get_table_names():
                t = Table(name, MetaData(), autoload_with=conn)
                cols = list(t.primary_key.columns) or list(t.c)
                if name.startswith(PREFIX):  # archives have no key: the source's key columns
                    cols = [t.c[c] for c in _source_key(conn, name) if c in t.c] or list(t.c)
                # A hash per key (this process's): 2M keys take ~100 MB, not a GB of tuples.
                out[name] = {hash(tuple(str(v) for v in row))
                             for row in conn.execute(select(*cols).execution_options(
                                 yield_per=50000))}
    finally:
        eng.dispose()
    return out


def _source_key(conn: Any, archive: str) -> list[str]:
    # _airflow_deleted__<table>__<time>[__b<n>]: table names hold no double underscore.
    source = archive[len(PREFIX):].split("__")[0]
    return list(inspect(conn).get_pk_constraint(source)["constrained_columns"])


def archived(snap: dict[str, set[Any]]) -> dict[str, list[Any]]:
    """Archive rows per source table, every batch's archive together (a list: duplicates show)."""
    out: dict[str, list[Any]] = {}
    for name, rows in snap.items():
        if name.startswith(PREFIX):
            rest = name[len(PREFIX):]
            source = rest.split("__")[0]
            out.setdefault(source, []).extend(rows)
    return out


IDLE_SECONDS = 5.0


def timed(server: Server, url: str, cmd: list[str], env: dict[str, str],
          cwd: Path | None = None) -> dict[str, Any]:
    """Run *cmd* against the database at *url* with the writer and the sampler beside it: an
    idle window first (the writer alone), then the cleanup."""
    runs, jobs = kept_ids(url, fill.T)
    writer = Writer(url, runs, jobs)
    writer.start()
    writer.ready.wait(30)
    idle_from = time.monotonic()
    time.sleep(IDLE_SECONDS)
    sampler = TransactionSampler(url, url.rsplit("/", 1)[1], writer.connection_ids)
    sampler.start()
    load_before = uptime()
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    t1 = time.monotonic()
    longest = sampler.finish()
    writer.finish()
    if done.returncode != 0:
        raise SystemExit(f"{cmd[0]} … failed:\n{done.stderr[-3000:]}")
    drop_writer_rows(url)
    return {"seconds": round(t1 - t0, 2), "longest_transaction_ms": longest,
            "longest_transaction_query": sampler.longest_query,
            "longest_writing_transaction_ms": round(sampler.longest_write_ms, 1),
            "longest_writing_transaction_query": sampler.longest_write_query,
            "writer_p99_idle_ms": writer.p99(idle_from, t0),
            "writer_p99_ms": writer.p99(t0, t1),
            "writer_calls": sum(1 for at, _ in writer.samples if t0 <= at < t1),
            "load_before": load_before, "load_after": uptime(),
            "stdout": done.stdout, "stderr": done.stderr}


def own_longest(report: dict[str, Any]) -> tuple[float, str]:
    """The longest transaction statesweep timed itself (each table's ``longest_transaction_ms``
    in its JSON report: every chunk slice and dependant batch, BEGIN to the end of COMMIT) and
    its table. The samplers see a transaction only every 20-160 ms; this sees each one."""
    best: dict[str, Any] = max(report.get("tables", []),
                               key=lambda t: t.get("longest_transaction_ms") or 0, default={})
    return round(float(best.get("longest_transaction_ms") or 0), 1), str(best.get("table", ""))


def longest_chunk(stderr: str) -> tuple[float | None, str]:
    """The slowest chunk statesweep logged (db_clean_chunk_moved ms=…: its dependants' batches
    and its own archive+delete transaction together) and its table."""
    best: tuple[float | None, str] = (None, "")
    for line in stderr.splitlines():
        if "db_clean_chunk_moved" in line and (m := re.search(r"\bms\"?[=:] ?([0-9.]+)", line)):
            table = re.search(r"\btable\"?[=:] ?\"?([a-z_0-9]+)", line)
            if best[0] is None or float(m.group(1)) > best[0]:
                best = (float(m.group(1)), table.group(1) if table else "")
    return best


def run_case(server: Server, src: str, airflow: str, version: str, skip_archive: bool,
             batch: int, workers: int) -> dict[str, Any]:
    extra = ["--skip-archive"] if skip_archive else []
    with server.database(f"{TAG}_airflow", version, src) as af_url, \
            server.database(f"{TAG}_statesweep", version, src) as ss_url:
        with tempfile.TemporaryDirectory() as home:
            af = timed(server, af_url,
                       [airflow, "db", "clean", "--clean-before-timestamp", fill.T, "-y",
                        "--batch-size", str(batch), *extra],
                       airflow_env(server.airflow_url(f"{TAG}_airflow"), home))
        env = {**os.environ, "STATESWEEP_DATABASE_URL": ss_url,
               "STATESWEEP_RUN_STORE_URL": "memory://", "STATESWEEP_LOG_LEVEL": "INFO"}
        with ExitStack() as stack:
            mode = ["--local"]
            if workers:
                from bench.dbclean_workers import distributed

                env, logs = stack.enter_context(distributed(env, workers))
                mode = []
            ss = timed(server, ss_url,
                       [sys.executable, "-c", "from workers.cli import main; main()",
                        "--verbose", "db-clean", "--clean-before-timestamp", fill.T, "-y",
                        *mode, "--batch-size", str(batch), "--format", "json", *extra],
                       env, cwd=ROOT)
            if workers:  # the chunks ran in the workers: their logs
                ss["stderr"] += "".join(f.read_text() for f in logs.glob("*.log"))
        ss["longest_chunk_ms"], ss["longest_chunk_table"] = longest_chunk(ss["stderr"])
        report = json.loads(ss.pop("stdout"))
        ss["own_longest_ms"], ss["own_longest_table"] = own_longest(report)
        ss.pop("stderr")
        # Airflow goes on past a table it failed to clean (a warning, exit 0): keep its words.
        af["warnings"] = [line.strip() for line in (af.pop("stdout") + af.pop("stderr"))
                          .splitlines() if "Encountered error" in line
                          or "not cleaned due to errors" in line or "Error)" in line]
        after_af, after_ss = snapshot(af_url), snapshot(ss_url)
    return {"airflow": after_af, "statesweep": after_ss, "airflow_run": af,
            "statesweep_run": ss, "report": report}


#: The tables whose result Airflow 3.4.0b2's archive-name race changes (NOTES_34, 3): it skips
#: xcom_v2, and with it the xcom_v1 rows that xcom_v2's rows shadow.
RACE_TABLES = ("xcom_v1", "xcom_v2")
#: The tables whose cascaded rows Airflow 3.4 archives (workers/dbclean/rules.py).
CASCADE_ARCHIVED_34 = cascade_archived("3.4", "dag_run")


def airflow_raced(warnings: list[str]) -> bool:
    """Airflow skipped xcom_v2 (its cleanup failed and it went on): the race of NOTES_34, 3."""
    return any("Encountered error" in w and "'xcom_v2'" in w for w in warnings)


def compare(before: dict[str, set[Any]], case: dict[str, Any]) -> dict[str, Any]:
    af, ss = case["airflow"], case["statesweep"]
    raced = airflow_raced(case["airflow_run"].get("warnings", []))
    tables = sorted(n for n in before if not n.startswith(PREFIX))
    rows = []
    for name in tables:
        # Airflow's CLI writes its own audit row into log: rows that were not in the source
        # are Airflow's, not left by its cleanup.
        added = af[name] - before[name]
        same = af[name] - added == ss[name]
        # A difference Airflow's race made is named as such, never counted as identical.
        why = "Airflow skipped xcom_v2 (its race, below)" if (
            not same and raced and name in RACE_TABLES) else ""
        rows.append({"table": name, "before": len(before[name]),
                     "airflow": len(af[name] - added), "airflow_added": len(added),
                     "statesweep": len(ss[name]), "identical": same, "why": why})
    ss_arch, af_arch = archived(ss), archived(af)
    # Whether statesweep's run archived cascaded rows (NOTES_34, 2): legacy_task_data_owner has
    # no rule of its own, so only a cascade archive can hold its rows.
    no_cascade = bool(af_arch.get("legacy_task_data_owner")) and not ss_arch.get(
        "legacy_task_data_owner")
    archives = []
    for source in sorted(set(ss_arch) | set(af_arch)):
        lost = before[source] - ss[source]
        mine = ss_arch.get(source, [])
        whys = []
        if set(mine) != set(af_arch.get(source, [])):
            if no_cascade and source in CASCADE_ARCHIVED_34:
                whys.append("statesweep's run archived no cascaded rows (2, below)")
            if raced and source in RACE_TABLES:
                whys.append("Airflow skipped xcom_v2 (its race, below)")
        archives.append({
            "table": source, "statesweep_archived": len(mine),
            "statesweep_deleted": len(lost),
            "statesweep_archived_once_and_deleted": (len(mine) == len(set(mine))
                                                     and set(mine) <= lost),
            "airflow_archived": len(af_arch.get(source, [])),
            "same_rows_as_airflows_archives": set(mine) == set(af_arch.get(source, [])),
            "why": "; ".join(whys),
            "statesweep_archive_tables": sum(1 for n in ss if n.startswith(
                f"{PREFIX}{source}__")),
            "airflow_archive_tables": sum(1 for n in af if n.startswith(f"{PREFIX}{source}__")),
        })
    return {"tables": rows, "archives": archives, "airflow_raced": raced,
            "identical": all(r["identical"] for r in rows),
            "identical_but_airflows_race": all(r["identical"] or r["why"] for r in rows),
            "archived_equals_deleted": all(a["statesweep_archived_once_and_deleted"]
                                           for a in archives),
            "airflow_run": case["airflow_run"], "statesweep_run": case["statesweep_run"]}


#: Airflow 3.4.0b2's own additions, as read in its airflow/utils/db_cleanup.py (apache-airflow-core
#: 3.4.0b2 as installed; line numbers there), what statesweep does with each, and its race.
NOTES_34 = """\
## Airflow 3.4.0b2's additions (airflow/utils/db_cleanup.py of 3.4.0b2) and how they compare

1. **xcom_v1 rows shadowed by xcom_v2.** `_cleanup_table` (lines 821-828), when it cleans
   `xcom_v2` and finds rows, first runs `_do_delete` on `xcom_v1` with
   `_shadowed_legacy_xcom_query` (843-870): every `xcom_v1` row whose (dag_id, task_id, run_id,
   map_index) is, through `legacy_task_data_owner`, the task instance of an `xcom_v2` row that
   xcom_v2's own query selects (timestamp before T, and its dag scope), with the same `key`,
   is deleted and archived (as `xcom_v1`'s, batch by batch), whatever its own `timestamp`.
   statesweep follows it (workers/dbclean/rules.py `SHADOWS`, statements.py
   `_shadowed_by_xcom_v2`): with xcom_v2 in the run, xcom_v1 is cleaned just before it by its
   own rule OR that condition (only that condition when xcom_v1 itself was not asked for),
   into the run's one xcom_v1 archive.
2. **Archives of cascaded rows.** `_do_delete` (545-552) calls `_archive_cascading_attempt_data`
   (407-474) for each batch of `task_instance` and `dag_run` unless `--skip-archive`: under
   `SELECT … FOR UPDATE` of the parents and children, in the batch's DELETE transaction, it
   copies the rows the FK cascade is about to delete from `legacy_task_data_owner`, `xcom_v2`,
   `rtif_v2`, `task_instance_note`, `task_reschedule`, `hitl_detail` (by task instance id,
   `_ATTEMPT_UUID_CHILDREN` 396-403), `xcom_v1` and `rtif_v1` (through legacy_task_data_owner,
   429-436) and, for `dag_run`, `task_instance` and `dynamic_region` (437-444), into
   `_airflow_deleted__<table>__<uuid4 hex[:16]>` tables made once per table cleaned, empty ones
   too (446-461). Other cascades (a dag run's task_state_store, deadline, notes) are not
   archived. statesweep (workers/dbclean/cascade.py): a chunk of `task_instance` or `dag_run`
   deletes those dependants first in bounded batches, and each batch copies the rows it
   deletes into the run's archive of that table (`_airflow_deleted__<table>__<time of the
   parent's archive>`, one per table per run, shared with the table's own rule) in the same
   transaction, when its caller hands it those archives (`cascade.cascade_archives`). Where a
   row of the archive table below shows statesweep with 0 rows (0 tables) and Airflow with
   some, this run's caller did not.
3. **An Airflow race, not a rule.** Archive names carry the time to the second (512-516): when
   `xcom_v1`'s own cleanup and `xcom_v2`'s shadowed-xcom_v1 pass (item 1) start their batch 1
   in the same second, the second `CREATE TABLE _airflow_deleted__xcom_v1__<ts>__b1` fails
   (DuplicateTable), `_suppress_with_logging` (923-943) skips that whole table with a warning and
   the command exits 0 (1108-1117): neither xcom_v2's old rows nor the xcom_v1 rows they shadow
   are deleted, except those its task_instance and dag_run cascades take. It hits when
   xcom_v1's own cleanup (cleaned first under the hash seed used) takes under a second, so
   `airflow db clean` 3.4.0b2 itself gives different results from one run to the next; with
   `--skip-archive` each batch's archive is dropped at once and the names do not collide.
   statesweep does not copy it: it names one archive per table per run and cleans xcom_v2.
   When Airflow's output shows that warning, the differences in xcom_v1 and xcom_v2 are marked
   "Airflow skipped xcom_v2" above.
"""


def render(meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    sizes = meta["sizes"]
    lines = [f"# statesweep db-clean vs airflow db clean (Airflow {meta['version']}, "
             f"{meta['db']})", "",
             f"Generated by `{meta['command']}` ({meta['airflow']}); sizes: "
             + ", ".join(f"{k}={v}" for k, v in sizes.items())
             + f" (dags, dag runs, task instances per run, log rows); rows per table below; "
             f"--clean-before-timestamp {fill.T}; --batch-size {meta['batch_size']} for both; "
             f"statesweep {meta['statesweep_mode']}. Load average (1/5/15 min) at start "
             f"{meta['load_start']}, at end {meta['load_end']}; {os.cpu_count()} CPUs.", ""]
    for case, res in results.items():
        af, ss = res["airflow_run"], res["statesweep_run"]
        ratio = af["seconds"] / ss["seconds"] if ss["seconds"] else 0
        lines += [f"## {case}", "",
                  f"Every table identical by primary key: **{res['identical']}**"
                  + (f" (all but what Airflow's xcom_v2 race changed: "
                     f"**{res.get('identical_but_airflows_race')}**)"
                     if res.get("airflow_raced") else "")
                  + f"; each statesweep archive holds only rows its table lost, each once: "
                  f"**{res['archived_equals_deleted']}**.", "",
                  "| | wall s | longest transaction ms: any / writing (sampled) | writer p99 "
                  "idle ms | writer p99 during ms | load before / after |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for who, r in (("airflow db clean", af), ("statesweep db-clean", ss)):
            lines.append(f"| {who} | {r['seconds']} | {r['longest_transaction_ms']} / "
                         f"{r.get('longest_writing_transaction_ms')} | "
                         f"{r['writer_p99_idle_ms']} | {r['writer_p99_ms']} "
                         f"({r['writer_calls']} calls) | {r['load_before']} / "
                         f"{r['load_after']} |")
        if af.get("warnings"):
            lines += ["", "airflow db clean warned (and went on, exit 0):", ""]
            lines += [f"    {w[:300]}" for w in af["warnings"]]
        lines.append("")
        for who, r in (("airflow", af), ("statesweep", ss)):
            lines.append(f"{who}'s longest transaction was running: "
                         f"`{r['longest_transaction_query'][:120]}`; longest writing one: "
                         f"`{r.get('longest_writing_transaction_query', '')[:120]}`  ")
        lines += ["", f"statesweep's own timing of each of its transactions (BEGIN to the end "
                  f"of COMMIT, every one, not sampled): longest **{ss.get('own_longest_ms')} "
                  f"ms** ({ss.get('own_longest_table', '')})."]
        lines += ["", f"statesweep / airflow speed: **{ratio:.2f}x** (target >= 5x with 2 "
                  f"workers); statesweep's slowest chunk (its dependants' batches and its own "
                  f"archive+delete, several transactions) {ss.get('longest_chunk_ms')} ms "
                  f"({ss.get('longest_chunk_table', '')}).", "",
                  "| table | rows before | left by airflow | left by statesweep | identical |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for r in res["tables"]:
            if r["before"] or r["airflow"] or r["statesweep"]:
                added = f" (+{r['airflow_added']} its own)" if r["airflow_added"] else ""
                same = "yes" if r["identical"] else "**NO**" + (
                    f": {r['why']}" if r.get("why") else "")
                lines.append(f"| {r['table']} | {r['before']} | {r['airflow']}{added} | "
                             f"{r['statesweep']} | {same} |")
        if res["archives"]:
            lines += ["", "| archived table | statesweep rows (tables) | deleted in all | "
                      "archived once and deleted | airflow rows (tables) | same rows as "
                      "airflow's |",
                      "| --- | ---: | ---: | --- | ---: | --- |"]
            for a in res["archives"]:
                lines.append(
                    f"| {a['table']} | {a['statesweep_archived']} "
                    f"({a['statesweep_archive_tables']}) | {a['statesweep_deleted']} | "
                    f"{'yes' if a['statesweep_archived_once_and_deleted'] else '**NO**'} | "
                    f"{a['airflow_archived']} ({a['airflow_archive_tables']}) | "
                    f"{'yes' if a['same_rows_as_airflows_archives'] else '**NO**'}"
                    f"{': ' + a['why'] if a.get('why') else ''} |")
        lines.append("")
    lines.append(
        f"Airflow ran with PYTHONHASHSEED={meta['airflow_hash_seed']}; its table order: "
        f"{', '.join(meta['airflow_order'])}. Airflow orders tables by Python's set order, "
        "which changes with the hash seed; under a seed that cleans callback before dag_run it "
        "purges fewer callbacks (those whose only deadline goes with its dag run). statesweep "
        "always cleans dag_run first. Longest transactions are sampled every 20 ms from "
        "pg_stat_activity / information_schema.innodb_trx; the writer does 30 statements/s "
        "(INSERT log, UPDATE dag_run, UPDATE job, rows both tools keep), one per transaction."
        + ("" if meta.get("db") != "mariadb" else
           " On MariaDB the sample is coarse: innodb_trx refreshes at most every 100 ms and "
           "gives whole seconds, and a connection's read-only transactions (autocommit "
           "SELECTs included) reuse one id, so consecutive ones within a second can read as "
           "one, up to a second long; a short writing one is often missed. statesweep's own "
           "timing (above each table) counts every transaction exactly."))
    if meta["version"].startswith("3.4"):
        lines += ["", NOTES_34]
    if meta.get("notes"):
        lines += ["", meta["notes"]]
    return "\n".join(lines) + "\n"


def write(out: str, meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    meta["load_end"] = uptime()
    page = render(meta, results)
    Path(out + ".md").write_text(page)
    Path(out + ".json").write_text(json.dumps({**meta, "results": results}, indent=2,
                                              default=str))
    return page


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--airflow", default="/opt/af-3.3.2/bin/airflow",
                   help="an airflow executable; when missing, a venv is made under "
                        f"{CACHE} (af-3.3.2, or af-3.4 -> 3.4.0b2)")
    p.add_argument("--db", choices=["postgresql", "mariadb"], default="postgresql")
    p.add_argument("--scale", type=float, default=1.0,
                   help="x 20 000 dag runs and 200 000 log rows")
    p.add_argument("--tasks", type=int, default=5,
                   help="task instances (and xcoms) per dag run; 10 at --scale 10 is the "
                        "issue's 2M")
    p.add_argument("--batch-size", type=int, default=10000)
    p.add_argument("--workers", type=int, default=0,
                   help="statesweep's distributed db-clean on N Celery workers (0: --local)")
    p.add_argument("--cases", default="archived,skip-archive")
    p.add_argument("--migrate", action="store_true", help="airflow db migrate, not the dump")
    p.add_argument("--out", default=None, help="default: bench/results/dbclean_compare_"
                                               "<db>_<version>_x<scale>[_k<tasks>]")
    p.add_argument("--notes", default="", help="a paragraph appended to the results page")
    args = p.parse_args(argv)
    server = Server(args.db)
    airflow, version = ensure_airflow(args.airflow, server.pg)
    sizes = {"d": 50, "r": int(20000 * args.scale), "k": args.tasks,
             "l": int(200000 * args.scale)}
    out = args.out or str(ROOT / "bench" / "results" / (
        f"dbclean_compare_{args.db}_{version}_x{args.scale:g}"
        + (f"_k{args.tasks}" if args.tasks != 5 else "")
        + (f"_w{args.workers}" if args.workers else "")))
    global SEED
    SEED, order = airflow_order(airflow)
    meta: dict[str, Any] = {
        "db": args.db, "version": version, "airflow": airflow, "sizes": sizes,
        "batch_size": args.batch_size, "airflow_hash_seed": SEED, "airflow_order": order,
        "command": "python -m bench.dbclean_compare " + " ".join(argv or sys.argv[1:]),
        "statesweep_mode": f"on {args.workers} workers" if args.workers else "--local (one "
                           "process)", "load_start": uptime(), "notes": args.notes}
    results: dict[str, dict[str, Any]] = {}
    with server.database(f"{TAG}_source", version) as src:
        t0 = time.monotonic()
        print(f"filling {sizes} …", file=sys.stderr)
        build_source(server, f"{TAG}_source", airflow, version, args.migrate, sizes)
        meta["fill_seconds"] = round(time.monotonic() - t0, 1)
        before = snapshot(src)
        for case in args.cases.split(","):
            print(f"case {case} …", file=sys.stderr)
            results[case] = compare(before, run_case(
                server, f"{TAG}_source", airflow, version, case == "skip-archive",
                args.batch_size, args.workers))
            print(f"  identical: {results[case]['identical']}", file=sys.stderr)
            page = write(out, meta, results)  # after each case: a long run keeps what it did
    print(page)
    if not all(r["identical"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
