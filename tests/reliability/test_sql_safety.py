"""No SQL is assembled from strings a user controls, and table names never come from input.

Every place in workers/ that hands SQL text to the database — text(), literal_column(),
exec_driver_sql(), DDL(), or execute() of a string — is found with ast and must be on the
allow-list below with what it interpolates and why that is safe. A new raw-SQL site fails this
test until someone reads it and lists it; so does a changed interpolation at a listed site.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from workers.schema import TABLE_NAMES, build_tables
from workers.settings import Settings, SettingsError

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
RAW_SQL_CALLS = {"text", "literal_column", "exec_driver_sql", "DDL"}

STATIC = "a string literal: nothing is interpolated"
TABLE_NAME = ("table names from schema.build_tables, which only knows the constant names in "
              "schema.TABLE_NAMES (naming is 'seed' or 'airflow', checked in settings)")
TIMEOUTS = ("int() of a setting already parsed as an integer: SET takes no bind parameters, "
            "and only digits can reach the statement")

# (module, function, call, interpolated expressions) -> why it is safe
ALLOWED: dict[tuple[str, str, str, tuple[str, ...]], str] = {
    ("db.py", "_mysql_on_connect", "execute", ()): STATIC,
    ("db.py", "_sqlite_on_connect", "execute", ()): STATIC,
    ("db.py", "now_expr", "literal_column", ()): STATIC + " (UTC_TIMESTAMP(6) precision)",
    ("db.py", "plus", "literal_column", ()): STATIC + " (the MICROSECOND unit keyword)",
    ("db.py", "set_timeouts", "exec_driver_sql", ("int(lock_timeout_ms)",)): TIMEOUTS,
    ("db.py", "set_timeouts", "exec_driver_sql", ("int(statement_timeout_ms)",)): TIMEOUTS,
    ("cleanup.py", "range_condition", "text", ()):
        STATIC + " (the ctid bounds are bound parameters, cast to tid by the server)",
    ("planners/blocks.py", "check", "text", ()): STATIC + " (the table name is bound)",
    ("planners/blocks.py", "sample", "text", ()): STATIC + " (the table name is bound)",
    ("planners/blocks.py", "sample", "text", ("name",)):
        TABLE_NAME + ", quoted by the dialect's identifier preparer; cutoff and percent bound",
    ("planners/blocks.py", "check", "exec_driver_sql", ()): STATIC + " (SHOW server_version_num)",
    ("flow/lag.py", "<module>", "text", ()): STATIC + " (the pg_stat_replication query)",
    ("flow/lag.py", "standby_lags", "text", ()): STATIC,
    ("flow/lag.py", "_replica_status", "text", ("statement",)):
        STATIC + " (statement is one of two constant SHOW REPLICA/SLAVE STATUS strings)",
    ("seed.py", "seed", "text", ("table=name",)): TABLE_NAME + " (dag_run, task_state)",
    ("seed.py", "seed", "text", ("ts.name",)): TABLE_NAME,
    ("seed.py", "_seed_assets", "text", ("table=a.name",)): TABLE_NAME + " (asset)",
    ("seed.py", "_seed_task_state_pg", "text",
     ("ts", "region", "index", "ROWS_PER_RUN", "zero", "ROWS_PER_RUN", "DAGS", "ROWS_PER_RUN",
      "period", "e", "period", "e + n")):
        TABLE_NAME + "; region, index and zero are column names from build_tables and the "
        "constant all-zero UUID (the layout's, never input); module constants; period, e and "
        "n are SeedSpec int fields (the CLI only sets rows, which is a bound parameter)",
    ("cli/doctor.py", "layout_check", "text", ()):
        STATIC + " (reads Airflow's alembic revision)",
    ("planners/expiry.py", "table_rows", "text", ()):
        STATIC + " (catalog row estimates; the table name is bound)",
    ("planners/expiry.py", "estimate_expired", "text", ("explain", "table", "column", "column")):
        TABLE_NAME + " and its expires_at column, quoted by the dialect's identifier preparer; "
        "explain is one of two constant EXPLAIN spellings; first and cutoff are bound",
    ("planners/dags.py", "estimate_selected", "text", ("explain", "table", "column")):
        TABLE_NAME + " and its dag_id column, quoted by the dialect's identifier preparer; "
        "explain is one of two constant EXPLAIN spellings; the dag ids are bound (expanding)",
    ("dbclean/cascade.py", "_move_batch", "literal_column", ("prep.quote('candidate')",)):
        "the constant alias name 'candidate', quoted by the dialect's identifier preparer, "
        "and the system column ctid",
    ("dbclean/cascade.py", "_move_batch", "literal_column", ("prep.format_table(target)",)):
        "a table reflected from the live schema's catalog (a dependant down Airflow's foreign "
        "keys, never input), quoted by the dialect's identifier preparer, and the system "
        "column ctid",
    ("dbclean/run.py", "_in_transaction", "exec_driver_sql", ()):
        STATIC + " (SET LOCAL client_connection_check_interval = 1000)",
    ("chunk.py", "settle", "text", ()): STATIC + " (txid_status of a bound transaction id)",
    ("window.py", "mark_deleted", "exec_driver_sql", ("MARK_TIMEOUT_MS",)):
        TIMEOUTS + " (MARK_TIMEOUT_MS is a module constant int)",
    ("db.py", "set_timeouts", "execute", ()): STATIC + " (reads the session lock wait back)",
    ("db.py", "set_timeouts", "execute", ("seconds",)):
        TIMEOUTS + " (seconds = max(1, int(lock_timeout_ms) // 1000))",
    ("db.py", "_mysql_restore_session", "execute", ("int(previous)",)):
        TIMEOUTS + " (int() of the value the server itself reported)",
    ("exporter.py", "estimate_expired", "literal_column", ()): STATIC + " (SELECT 1)",
    ("identity.py", "<module>", "text", ()):
        STATIC + " (the server's identity; the candidate table names are bound parameters)",
    ("exporter.py", "estimate_expired", "exec_driver_sql", ("'EXPLAIN (FORMAT JSON) ' + sql",)):
        "a statement SQLAlchemy compiled from the Table object, with no value from input",
}


@dataclass(frozen=True)
class Site:
    module: str
    function: str
    call: str
    interpolated: tuple[str, ...]
    line: int
    end_line: int

    @property
    def key(self) -> tuple[str, str, str, tuple[str, ...]]:
        return (self.module, self.function, self.call, self.interpolated)


def _call_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _is_string(arg: ast.expr) -> bool:
    if isinstance(arg, ast.Constant):
        return isinstance(arg.value, str)
    if isinstance(arg, ast.JoinedStr):
        return True
    if isinstance(arg, ast.Call):
        return _call_name(arg.func) == "format"
    if isinstance(arg, ast.BinOp):
        return _is_string(arg.left) or _is_string(arg.right)
    return False


def _interpolated(arg: ast.expr) -> tuple[str, ...]:
    """What a SQL string interpolates: () for a literal; anything else is listed whole."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return ()
    if isinstance(arg, ast.JoinedStr):
        return tuple(ast.unparse(v.value) for v in arg.values if isinstance(v, ast.FormattedValue))
    if isinstance(arg, ast.Call) and _call_name(arg.func) == "format":
        return tuple(ast.unparse(a) for a in arg.args) + tuple(
            f"{k.arg}={ast.unparse(k.value)}" for k in arg.keywords)
    return (ast.unparse(arg),)


def _owners(tree: ast.Module) -> dict[ast.AST, str]:
    """Each node's innermost enclosing function name ("<module>" at top level)."""
    owner: dict[ast.AST, str] = {}

    def visit(node: ast.AST, name: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) \
                else name
            owner[child] = inner
            visit(child, inner)

    visit(tree, "<module>")
    return owner


def raw_sql_sites(package: Path = ROOT / "workers") -> list[Site]:
    sites: list[Site] = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        module = str(path.relative_to(package))
        owner = _owners(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            call = _call_name(node.func)
            arg = node.args[0]
            # execute() of a SQLAlchemy statement is bound and quoted by SQLAlchemy; only
            # execute() of a string (a DBAPI cursor, or text by another name) is raw SQL.
            if call in RAW_SQL_CALLS or (call == "execute" and _is_string(arg)):
                sites.append(Site(module, owner[node], str(call), _interpolated(arg),
                                  node.lineno, node.end_lineno or node.lineno))
    return sites


def test_every_raw_sql_site_is_on_the_allow_list() -> None:
    sites = raw_sql_sites()
    unknown = [s for s in sites if s.key not in ALLOWED]
    assert unknown == [], (
        "raw SQL built at a site nobody has reviewed; check it is not built from input and "
        f"add it to ALLOWED with the reason: {unknown}")
    stale = set(ALLOWED) - {s.key for s in sites}
    assert stale == set(), f"allow-listed sites that no longer exist: {stale}"


def test_the_scan_finds_sql_built_from_input(tmp_path: Path) -> None:
    """The scan itself can fail: SQL assembled from an argument is found and not allowed."""
    (tmp_path / "bad.py").write_text(
        "def purge(conn, table, cur):\n"
        "    conn.execute(text(f'DELETE FROM {table}'))\n"
        "    conn.exec_driver_sql('DELETE FROM ' + table)\n"
        "    cur.execute('SELECT * FROM %s' % table)\n"
        "    conn.execute(select(t.c.id))\n")
    found = raw_sql_sites(tmp_path)
    assert {(s.function, s.call, s.interpolated) for s in found} == {
        ("purge", "text", ("table",)),
        ("purge", "exec_driver_sql", ("'DELETE FROM ' + table",)),
        ("purge", "execute", ("'SELECT * FROM %s' % table",)),
    }
    assert not any(s.key in ALLOWED for s in found)


def test_noqa_s608_only_at_allow_listed_sites() -> None:
    sites = raw_sql_sites()
    package = ROOT / "workers"
    for path in sorted(package.rglob("*.py")):
        module = str(path.relative_to(package))
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if "noqa: S608" in line:
                # ruff reports S608 on the statement's last line, hence end_line
                assert any(s.module == module and s.line <= number <= s.end_line + 1
                           for s in sites), f"{path.name}:{number} silences S608 off the list"


def test_ruff_s608_is_enabled_and_clean() -> None:
    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    selected = lint.get("select", []) + lint.get("extend-select", [])
    assert any(code in ("S608", "S60", "S6", "S", "ALL") for code in selected), selected
    assert "S608" not in lint.get("ignore", []) + lint.get("extend-ignore", [])
    ruff = Path(sys.executable).with_name("ruff")
    r = subprocess.run([str(ruff), "check", "--select", "S608", "workers"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_table_names_come_only_from_the_two_namings() -> None:
    constant = {name for pair in TABLE_NAMES.values() for name in pair}
    constant |= {"dag_run", "asset", "asset_active"}
    for naming in TABLE_NAMES:
        assert set(build_tables(naming).metadata.tables) <= constant
    with pytest.raises(ValueError, match="naming must be"):
        build_tables("task_state; DROP TABLE dag_run")
    with pytest.raises(SettingsError, match="STATESWEEP_TABLE_NAMING"):
        Settings.from_env({"STATESWEEP_TABLE_NAMING": "task_state; DROP TABLE dag_run"})
