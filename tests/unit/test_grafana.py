"""deploy/grafana/statesweep.json: importable (valid JSON, one Prometheus datasource input that
every panel uses, unique panel ids), and every query names only metrics the exporter serves
(parsed out of the PromQL and compared with what workers.exporter's collector yields), in
PromQL that promtool accepts."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.prometheus import require_binary
from tests.unit.test_docs import load_generator

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "statesweep.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))  # a collapsed row holds its panels


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in all_panels(dashboard["panels"]) for t in p.get("targets", [])]


# Grafana's interval variables, as a fixed duration so the query is plain PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
            "and", "or", "unless", "inf", "nan"}


def plain_promql(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: identifiers that are not functions,
    keywords, label names (in {…} or by/without/on/ignoring (…)), strings or durations."""
    e = plain_promql(expr)
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', e)  # strings
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def test_the_dashboard_is_valid_json_with_unique_panel_ids(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(ids) > 10
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert dashboard["uid"] == "statesweep" and dashboard.get("id") is None


def test_every_panel_uses_the_prometheus_input(dashboard: dict[str, Any]) -> None:
    (ds,) = dashboard["__inputs"]
    assert (ds["type"], ds["pluginId"]) == ("datasource", "prometheus")
    ref = {"type": "prometheus", "uid": "${" + ds["name"] + "}"}
    queried = [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]
    assert queried and all(p["datasource"] == ref and p["targets"] for p in queried)
    assert all(t["datasource"] == ref for p in queried for t in p["targets"])


def test_every_query_names_only_metrics_the_exporter_serves(dashboard: dict[str, Any]) -> None:
    served = load_generator().served_metric_names()
    used: set[str] = set()
    unknown = {}
    for expr in expressions(dashboard):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        used |= names
        if names - served:
            unknown[expr] = sorted(names - served)
    assert unknown == {}
    # The dashboard covers what the exporter serves (a histogram through its _bucket series).
    expected = {n for n in served if not n.endswith(("_sum", "_count"))}
    assert sorted(expected - used) == []


def test_the_metric_parser_finds_a_misspelt_name_and_skips_the_rest() -> None:
    expr = ('sum by (table) (rate(statesweep_rows_deleted[$__rate_interval])) '
            '/ on (table) group_left max(statesweep_up{part="database"} offset 5m) > bool 0')
    assert metric_names(expr) == {"statesweep_rows_deleted", "statesweep_up"}
    assert "statesweep_rows_deleted" not in load_generator().served_metric_names()


def test_promtool_accepts_every_query(dashboard: dict[str, Any], tmp_path: Path) -> None:
    rules = {"groups": [{"name": "grafana", "rules": [
        {"record": f"statesweep:grafana_query_{i}", "expr": plain_promql(expr)}
        for i, expr in enumerate(expressions(dashboard))]}]}
    path = tmp_path / "grafana_queries.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([require_binary("promtool"), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
