"""The docs agree with the code: every setting has a row in the settings reference page (which
docs/gen_reference.py generates from workers/settings.py) with the default the code has, every
test the docs and docs/design.md cite exists, and the README points at docs/design.md, never at
notes outside the repository."""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import MISSING
from pathlib import Path
from types import ModuleType

import pytest

from workers.settings import PREFIX, setting_fields

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# The guide pages under docs/ (design.md included); the reference pages are generated.
PAGES = sorted((ROOT / "docs").glob("*.md"))
DESIGN = (ROOT / "docs" / "design.md").read_text()


def load_generator() -> ModuleType:
    """docs/gen_reference.py (an MkDocs hook, not a package module), imported once."""
    if "gen_reference" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gen_reference",
                                                      ROOT / "docs" / "gen_reference.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gen_reference"]


# A row of the settings table: one or two `…` variable names, then their defaults, then a meaning.
ROW = re.compile(r"^\| (`STATESWEEP_\w+`(?: / `STATESWEEP_\w+`)*) \| ([^|]+) \|", re.M)


def documented_defaults(text: str) -> dict[str, str]:
    """Each variable of the settings table and its default as written (`…`, or (none…))."""
    out: dict[str, str] = {}
    for names, default in ROW.findall(text):
        names_list = re.findall(r"`(STATESWEEP_\w+)`", names)
        values = re.findall(r"`([^`]*)`", default) if "`" in default else [default.strip()]
        if len(values) != len(names_list):
            values = [default.strip()] * len(names_list)
        out.update(zip(names_list, values, strict=True))
    return out


def code_default(name: str) -> str:
    for f in setting_fields():
        if PREFIX + f.name.upper() == name:
            assert f.default is not MISSING
            return str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
    raise KeyError(name)


def test_every_setting_has_a_row_with_the_codes_default() -> None:
    rows = documented_defaults(load_generator().settings_page())
    names = {PREFIX + f.name.upper() for f in setting_fields()}
    assert sorted(names - set(rows)) == []
    assert sorted(set(rows) - names) == []
    wrong = {}
    for name, written in rows.items():
        default = code_default(name)
        if written.startswith("("):  # (none), (the result backend's Redis, …): empty or 0
            ok = default in ("", "0", "0.0")
        else:
            ok = written == default or _same_number(written, default)
        if not ok:
            wrong[name] = (written, default)
    assert wrong == {}


def test_the_table_parser_reads_a_wrong_default_as_wrong() -> None:
    bad = "| `STATESWEEP_CHUNK_TIME_LIMIT` | `300` | hard limit |\n"
    (name, written), = documented_defaults(bad).items()
    assert written != code_default(name)


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False


CITED = re.compile(r"`((?:tests/[\w/]+\.py)|…|test_\w+\.py)?::(\w+)")


def cited_tests(text: str) -> list[tuple[str, str]]:
    """(file, test name) of every `path::name` and `…::name` (the file cited before it)."""
    out, last = [], ""
    for path, name in CITED.findall(text):
        if path and path != "…":
            last = path if "/" in path else next(
                p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob(path))
        out.append((last, name))
    return out


def missing_tests(cited: list[tuple[str, str]]) -> list[str]:
    return [f"{path}::{name}" for path, name in cited
            if not re.search(rf"^(async )?def {name}\(", (ROOT / path).read_text(), re.M)]


@pytest.mark.parametrize(("doc", "at_least"), [("docs/configure.md", 2), ("docs/design.md", 30)])
def test_every_cited_test_exists(doc: str, at_least: int) -> None:
    cited = cited_tests((ROOT / doc).read_text())
    assert len(cited) >= at_least
    assert missing_tests(cited) == []


def test_a_renamed_test_is_reported() -> None:
    text = ("`tests/unit/test_docs.py::test_a_renamed_test_is_reported`, "
            "`…::test_that_was_renamed`")
    assert missing_tests(cited_tests(text)) == ["tests/unit/test_docs.py::test_that_was_renamed"]


def test_readme_points_at_the_design_in_the_repository() -> None:
    assert "docs/design.md" in README
    for text in (README, *(p.read_text() for p in PAGES)):
        assert not re.search(r"shared/|DESIGN\.md|STYLE\.md", text)
    assert "## Invariants, and the tests that hold them" in DESIGN
    assert [int(n) for n in re.findall(r"^\| (\d+)\. ", DESIGN, re.M)] == list(range(1, 15))
