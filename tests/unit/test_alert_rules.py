"""deploy/prometheus/alerts.yml: valid for promtool, each alert unit-tested firing and not firing
(alerts_test.yml), and those tests shown to catch a broken rule."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.prometheus import RULES_DIR, require_binary

ALERTS = RULES_DIR / "alerts.yml"
TESTS = RULES_DIR / "alerts_test.yml"


def promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("promtool"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_promtool_check_rules() -> None:
    proc = promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 7 rules found" in proc.stdout


def test_promtool_test_rules() -> None:
    proc = promtool("test", "rules", str(TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    cases = [c for t in yaml.safe_load(TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    assert alerts == {"StatesweepNoFinishedRun", "StatesweepBacklogGrowing",
                      "StatesweepOldestExpiredRowTooOld", "StatesweepLastRunFailed",
                      "StatesweepNoChunkWorker", "StatesweepExporterPartDown",
                      "StatesweepProtectedStateTooOld"}
    for alert in alerts:
        outcomes = {bool(c["exp_alerts"]) for c in cases if c["alertname"] == alert}
        assert outcomes == {True, False}, alert


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    shutil.copy(TESTS, tmp_path / TESTS.name)
    broken = ALERTS.read_text().replace("> 6 * 3600", "> 60 * 3600")
    assert broken != ALERTS.read_text()
    (tmp_path / ALERTS.name).write_text(broken)
    proc = promtool("test", "rules", TESTS.name, cwd=tmp_path)
    assert proc.returncode != 0
    assert "StatesweepOldestExpiredRowTooOld" in proc.stdout + proc.stderr
