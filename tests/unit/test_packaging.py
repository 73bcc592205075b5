"""The wheel pip builds from pyproject.toml (what the Docker image and `pip install .` install)
holds every package under workers/, and building it prints no setuptools deprecation."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.processes import ROOT, child_env


def test_the_wheel_holds_every_package_and_builds_without_deprecations(tmp_path: Path) -> None:
    # Built from a copy of what the Dockerfile copies, so the build leaves nothing in the tree.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "beat_schedule.py"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "workers", source / "workers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir",
         str(tmp_path), str(source)],
        env=child_env({}), capture_output=True, text=True, timeout=240, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    output = built.stdout + built.stderr
    assert "deprecated" not in output.lower(), output
    (wheel,) = tmp_path.glob("statesweep-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(ROOT).as_posix()
                for p in (ROOT / "workers").rglob("__init__.py")}
    assert {"workers", "workers/cli", "workers/planners", "workers/flow"} <= packages
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert missing == [], f"packages left out of the wheel: {missing}"
    assert "beat_schedule.py" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
