"""``python -m bench.selection_compare``: statesweep's selection against ``airflow db clean``.

    python -m bench.selection_compare --airflow /opt/af-3.3.2/bin/airflow
    python -m bench.selection_compare --airflow /opt/af-3.4/bin/airflow

The schema is the one of the Airflow the command runs (``airflow version``: 3.3.x loads the 3.3.2
dump, 3.4.x the 3.4.0b2 dump), so each version's ``db clean`` runs on its own tables.

Airflow's ``db clean`` cleans ``task_state_store`` by ``expires_at < --clean-before-timestamp``
within ``--dag-ids`` / outside ``--exclude-dag-ids``. statesweep's ``cleanup`` takes the same
three options and must select the same rows whenever the timestamp lies in the past (a later
one is capped at the database's now(): statesweep never deletes state that has not expired).

For each dialect and case: one database from Airflow's own schema (tests/airflow_schemas, made
by ``airflow db migrate``), seeded with dag runs of 10 dag ids (all finished, so statesweep's
protection of unfinished dag runs keeps nothing) and state rows whose ``expires_at`` spreads over
ten days either side of now, a tenth never expiring; cloned twice. ``airflow db clean
--tables task_state_store --skip-archive -y`` runs on one clone, ``statesweep cleanup --local``
with the same options on the other, and the primary keys left are compared. The expected set
(computed here from the predicate) is a third witness. Output:
bench/results/selection_compare_<schema version>.md.
Airflow runs from its own environment (``--airflow``), never statesweep's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from tests.airflow_schemas import VERSIONS, airflow_schema_database
from tests.conftest import database_now
from tests.integration.test_airflow_versions import dag_run
from workers.db import make_engine
from workers.schema import resolve_tables

RESULTS = Path(__file__).parent / "results"
DAG_IDS = [f"dag_{i}" for i in range(10)]
ROWS_PER_RUN = 60

CASES: list[tuple[str, dict[str, Any]]] = [
    ("cutoff 2 days ago", {"before_days": 2}),
    ("cutoff 2 days ago, --dag-ids dag_1,dag_3", {"before_days": 2,
                                                   "dag_ids": ["dag_1", "dag_3"]}),
    ("cutoff 5 days ago, --exclude-dag-ids dag_0,dag_2,dag_4",
     {"before_days": 5, "exclude_dag_ids": ["dag_0", "dag_2", "dag_4"]}),
    ("cutoff now, --dag-ids dag_7", {"before_days": 0, "dag_ids": ["dag_7"]}),
]


def seed(engine: Engine, rng: random.Random) -> dt.datetime:
    """Finished dag runs and their state rows; returns the database's now at seeding."""
    tables = resolve_tables(engine)
    now = database_now(engine)
    rows = []
    for dag_id in DAG_IDS:
        for r in range(3):
            run_id = f"scheduled__{r}"
            pk = dag_run(engine, dag_id, run_id, "success")
            for k in range(ROWS_PER_RUN):
                expires = (None if rng.random() < 0.1
                           else now + dt.timedelta(minutes=rng.randint(-10 * 1440, 10 * 1440)))
                rows.append({"dag_run_id": pk, "task_id": f"t{k % 4}",
                             **tables.scope_columns(-1, None), "key": f"k{k}",
                             "dag_id": dag_id, "run_id": run_id, "value": "v",
                             "updated_at": now, "expires_at": expires})
    with engine.begin() as conn:
        conn.execute(tables.task_state.insert(), rows)
    return now


def remaining(engine: Engine) -> set[tuple[Any, ...]]:
    t = resolve_tables(engine).task_state
    with engine.connect() as conn:
        return {(r.dag_id, r.run_id, r.task_id, r.key)
                for r in conn.execute(select(t.c.dag_id, t.c.run_id, t.c.task_id, t.c.key))}


def expected(engine: Engine, cutoff: dt.datetime, case: dict[str, Any]) -> set[tuple[Any, ...]]:
    t = resolve_tables(engine).task_state
    keep = set()
    with engine.connect() as conn:
        for r in conn.execute(select(t.c.dag_id, t.c.run_id, t.c.task_id, t.c.key,
                                     t.c.expires_at)):
            chosen = ((not case.get("dag_ids") or r.dag_id in case["dag_ids"])
                      and r.dag_id not in case.get("exclude_dag_ids", []))
            exp = r.expires_at
            if exp is not None and exp.tzinfo is None and cutoff.tzinfo is not None:
                exp = exp.replace(tzinfo=cutoff.tzinfo)
            if not (chosen and exp is not None and exp < cutoff):
                keep.add((r.dag_id, r.run_id, r.task_id, r.key))
    return keep


def schema_version(airflow_version: str) -> str:
    """The committed schema dump made by the same minor version of Airflow."""
    minor = ".".join(airflow_version.split(".")[:2])
    for version, _layout in VERSIONS:
        if version.startswith(minor + "."):
            return version
    raise SystemExit(f"--airflow: no schema dump of Airflow {minor} in tests/airflow_schemas "
                     f"(have {', '.join(v for v, _ in VERSIONS)})")


def clone(dialect: str, version: str, stack: ExitStack,
          seed_value: int) -> tuple[str, Engine, dt.datetime]:
    url = stack.enter_context(airflow_schema_database(dialect, version))
    engine = make_engine(url)
    stack.callback(engine.dispose)
    return url, engine, seed(engine, random.Random(seed_value))


def options(cutoff: dt.datetime, case: dict[str, Any]) -> list[str]:
    args = ["--clean-before-timestamp", cutoff.isoformat()]
    if case.get("dag_ids"):
        args += ["--dag-ids", ",".join(case["dag_ids"])]
    if case.get("exclude_dag_ids"):
        args += ["--exclude-dag-ids", ",".join(case["exclude_dag_ids"])]
    return args


def airflow_clean(airflow: str, url: str, args: list[str], home: Path) -> None:
    driver = url.replace("postgresql://", "postgresql+psycopg2://").replace(
        "mysql://", "mysql+mysqldb://")
    env = {**os.environ, "AIRFLOW_HOME": str(home),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": driver,
           "AIRFLOW__CORE__LOAD_EXAMPLES": "false", "AIRFLOW__CORE__UNIT_TEST_MODE": "false"}
    cmd = [airflow, "db", "clean", "--tables", "task_state_store", "--skip-archive", "-y", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"airflow db clean failed ({proc.returncode}): {proc.stderr[-2000:]}")


def statesweep_clean(url: str, args: list[str]) -> None:
    env = {**os.environ, "STATESWEEP_DATABASE_URL": url, "STATESWEEP_RUN_STORE_URL": "memory://",
           "AIRFLOW_CONFIG": os.devnull}
    cmd = [str(Path(sys.executable).with_name("statesweep")), "cleanup", "--local", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"statesweep cleanup failed ({proc.returncode}): {proc.stderr[-2000:]}")


def parse_airflow_args(doc: str, default: str,
                       argv: list[str] | None) -> tuple[argparse.Namespace, str, str]:
    """``--airflow`` and ``--dialects``; with the Airflow version that command reports and the
    schema dump of that version: (args, airflow version, schema version)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--airflow", default=default,
                   help="the airflow command of an apache-airflow-core 3.3.x or 3.4.x environment")
    p.add_argument("--dialects", default="postgresql,mariadb")
    args = p.parse_args(argv)
    airflow_version = subprocess.run([args.airflow, "version"], capture_output=True, text=True,
                                     check=False).stdout.strip()
    return args, airflow_version, schema_version(airflow_version)


def main(argv: list[str] | None = None) -> int:
    args, airflow_version, version = parse_airflow_args(__doc__ or "",
                                                        "/opt/af-3.3.2/bin/airflow", argv)
    lines = [f"# statesweep selection vs `airflow db clean` {airflow_version} (task_state_store)",
             "", f"Airflow: `{args.airflow}` ({airflow_version}) on the schema it migrates to "
             f"(tests/airflow_schemas, {version}); "
             f"{len(DAG_IDS)} dag ids x 3 finished runs x {ROWS_PER_RUN} rows, expires_at "
             "spread over now +- 10 days, 10% never. Command: "
             f"`python -m bench.selection_compare --airflow {args.airflow}`", "",
             "| dialect | case | rows | airflow left | statesweep left | expected left | "
             "same rows |", "|---|---|---:|---:|---:|---:|---|"]
    failures = 0
    for dialect in args.dialects.split(","):
        for i, (name, case) in enumerate(CASES):
            with ExitStack() as stack, tempfile.TemporaryDirectory() as home:
                url_a, eng_a, now = clone(dialect, version, stack, i)
                url_s, eng_s, _ = clone(dialect, version, stack, i)
                before = remaining(eng_a)
                assert before == remaining(eng_s), "clones differ"
                cutoff = now - dt.timedelta(days=case["before_days"])
                want = expected(eng_a, cutoff, case)
                airflow_clean(args.airflow, url_a, options(cutoff, case), Path(home))
                statesweep_clean(url_s, options(cutoff, case))
                left_a, left_s = remaining(eng_a), remaining(eng_s)
                same = left_a == left_s == want
                failures += not same
                lines.append(f"| {dialect} | {name} | {len(before)} | {len(left_a)} | "
                             f"{len(left_s)} | {len(want)} | {'yes' if same else 'NO'} |")
                print(lines[-1], flush=True)
    lines += ["", "same rows: the primary keys (dag_id, run_id, task_id, key) left by both "
              "tools and by the predicate are one set."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"selection_compare_{version}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
