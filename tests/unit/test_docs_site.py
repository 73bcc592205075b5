"""The docs site (mkdocs.yml, docs/) builds with --strict, its generated reference pages cover
the code (every setting described, every command's --help, every metric the exporter serves),
every guide page is in the nav, and the README stays what a newcomer reads first."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.services import CI
from tests.unit.test_docs import cited_tests, load_generator, missing_tests
from workers import exit_codes
from workers.settings import ENV_VARS, NON_SETTING_PATTERNS, setting_fields

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PAGES = sorted((ROOT / "docs").glob("*.md"))
gen = load_generator()


def mkdocs() -> str:
    path = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if path:
        return path
    msg = "mkdocs is not installed (the dev extra has it; `make test` installs it)"
    if CI:
        pytest.fail(f"{msg}; CI=true needs it")
    pytest.skip(msg)


def test_the_site_builds_with_strict(tmp_path: Path) -> None:
    proc = subprocess.run([mkdocs(), "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("index.html", "reference/settings/index.html", "reference/cli/index.html",
                 "reference/metrics/index.html", "operate/index.html", "design/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    assert not list((tmp_path / "site").rglob("*.py"))


def test_every_guide_page_is_in_the_nav_and_every_nav_page_exists() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))

    def leaves(nav: list[object]) -> list[str]:
        out: list[str] = []
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            out.extend(leaves(value) if isinstance(value, list) else [str(value)])
        return out

    nav = leaves(config["nav"])
    assert sorted(p.name for p in PAGES) == sorted(p for p in nav if "/" not in p
                                                   and p != "index.md")
    assert set(nav) - {p.name for p in PAGES} == set(gen.PAGES)


def test_every_setting_has_a_description_and_nothing_else_does() -> None:
    fields = {f.name for f in setting_fields()}
    assert sorted(fields - {k for k, v in gen.DESCRIPTIONS.items() if v.strip()}) == []
    assert sorted(set(gen.DESCRIPTIONS) - fields) == []
    assert set(gen.UNSET) <= fields


def test_a_setting_without_a_description_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(gen.DESCRIPTIONS, "planner")
    described = {s.field for s in gen.settings_docs() if s.description}
    assert {f.name for f in setting_fields()} - described == {"planner"}


def test_the_settings_page_has_each_variable_and_its_airflow_fallback() -> None:
    page = gen.settings_page()
    for name in ENV_VARS:
        assert f"`{name}`" in page, name


def test_the_cli_page_holds_every_commands_help() -> None:
    from workers.cli import cli

    helps = dict(gen.cli_helps())
    names = {f"statesweep {n}" for n in cli.commands} | {"statesweep", "statesweep db upgrade"}
    assert names <= set(helps)
    page = gen.cli_page()
    for path, text in helps.items():
        assert f"## `{path}`" in page and text.rstrip() in page
    assert "--batch-size" in helps["statesweep cleanup"]


def test_the_cli_page_is_what_the_installed_command_prints() -> None:
    statesweep = Path(sys.executable).parent / "statesweep"
    if not statesweep.exists():
        pytest.skip("statesweep is not installed in this interpreter's environment")
    proc = subprocess.run([str(statesweep), "pause", "--help"], capture_output=True, text=True,
                          timeout=60, check=True, env={"COLUMNS": str(gen.HELP_WIDTH)})
    assert dict(gen.cli_helps())["statesweep pause"].strip() == proc.stdout.strip()


def test_the_metrics_page_lists_every_served_metric_and_notes_only_served_ones() -> None:
    docs = gen.exporter_metrics()
    names = {m.name for m in docs}
    assert {"statesweep_rows_deleted_total", "statesweep_chunk_duration_seconds",
            "statesweep_backlog_expired_rows", "statesweep_up", "statesweep_workers"} <= names
    assert set(gen.METRIC_NOTES) <= names
    page = gen.metrics_page()
    assert all(f"`{m.name}" in page for m in docs)


def test_every_exit_code_is_in_the_cli_guide() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    codes = {v for k, v in vars(exit_codes).items() if k.startswith("EXIT_")}
    rows = {int(c) for c in re.findall(r"^\| (\d+) \|", text, re.M)}
    assert sorted(codes - rows) == []


def test_every_statesweep_variable_the_pages_name_is_real() -> None:
    text = "\n".join(p.read_text() for p in PAGES)
    names = {m.group(0) for m in re.finditer(r"STATESWEEP_[A-Z0-9_]*[A-Z0-9]", text)
             if not text.startswith("_*", m.end())}
    names.discard("STATESWEEP_BATCH_SIZE")  # the typo the configuration page shows refused
    unknown = {n for n in names if n not in ENV_VARS
               and not any(p.fullmatch(n) for p in NON_SETTING_PATTERNS)}
    assert len(names) > 20 and unknown == set()


@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_every_test_a_page_cites_exists(page: str) -> None:
    assert missing_tests(cited_tests((ROOT / "docs" / page).read_text())) == []


def test_the_readme_is_short_and_keeps_the_two_set_up_commands() -> None:
    assert len(README.splitlines()) <= 100
    commands = re.findall(r"^(make \w+)\s", README, re.M)
    assert commands == ["make demo", "make test"]
    for step in ("pip install -e", "STATESWEEP_DATABASE_URL=", "STATESWEEP_BROKER_URL=",
                 "STATESWEEP_RESULT_BACKEND=", "celery -A workers worker -Q",
                 "celery -A workers beat", "statesweep doctor", "statesweep cleanup --wait",
                 "statesweep status"):
        assert step in README, step


def test_the_readmes_links_resolve() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert len(links) >= 8
    assert sorted(link for link in links if not (ROOT / link).exists()) == []
