"""Optional wall-clock profile of the worker processes with py-spy (``pip install py-spy``):
where a chunk worker's and the coordinator's time goes, idle waits included, in a few
categories that map to code a change could target."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

PY_SPY = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")

# A stack belongs to the first category one of whose (function, file) markers matches a frame
# ("function (path/file.py:line)"); an empty function matches any function in that file.
CATEGORIES = (
    ("chunk DELETE + COMMIT (client and server)", (("delete_range", "workers/cleanup.py"),)),
    ("planning and walk cuts", (("", "workers/planners/"),)),
    ("run store (Redis) calls", (("", "workers/runs.py"),)),
    ("dispatching chunk messages", (("apply_async", ""),)),
    ("first-use setup (engine, table inspection)", (("resources", "workers/celery_app.py"),)),
    ("logging", (("", "structlog/"), ("", "logging/__init__.py"))),
)
OTHER = "Celery/kombu/billiard: receiving, acking, storing results; other"
# Waiting for the next message (prefork child on its pool pipe, solo worker in its event loop)
# is idle, not cost; background threads (the coordinator's lock keeper) run beside the main one.
IDLE = (("get_payload", "billiard/queues.py"),)
THREAD = ("run", "threading.py")


@dataclass
class Recording:
    process: subprocess.Popen[bytes]
    output: Path

    def stop(self) -> dict[str, float]:
        """Stop recording and return the share of busy samples (%) per category."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return summarise(self.output)


def record(pid: int, output: Path) -> Recording:
    if PY_SPY is None:
        raise RuntimeError("--py-spy needs py-spy: .venv/bin/pip install py-spy")
    cmd = [PY_SPY, "record", "--pid", str(pid), "--format", "raw", "--rate", "100", "--idle",
           "--nonblocking", "--output", str(output)]
    log = output.with_suffix(".log").open("wb")
    return Recording(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), output)


def summarise(collapsed: Path) -> dict[str, float]:
    """Percent of the main thread's busy samples per category from py-spy's collapsed-stack
    ("raw") output, plus ``idle`` (waiting for work) as a percent of all its samples."""
    counts: Counter[str] = Counter()
    idle = 0
    if not collapsed.exists():
        return {}
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        if any(_matches(f, *THREAD) for f in frames):
            continue
        if _idle(frames):
            idle += int(n)
            continue
        name = next((label for label, marks in CATEGORIES
                     if any(_matches(f, func, path) for f in frames for func, path in marks)),
                    OTHER)
        counts[name] += int(n)
    busy = sum(counts.values())
    if not busy:
        return {}
    out = {k: round(100 * v / busy, 1) for k, v in counts.most_common()}
    out["idle (share of all samples)"] = round(100 * idle / (busy + idle), 1)
    return out


def _matches(frame: str, func: str, path: str) -> bool:
    """Does *frame* ("Class.function (path/file.py:line)") match the function and file?"""
    name, _, where = frame.partition(" (")
    return ((not func or name == func or name.endswith("." + func))
            and (not path or where.startswith(path)))


def _idle(frames: list[str]) -> bool:
    """Waiting for work: no statesweep frame, and blocked on the pool pipe or in epoll."""
    if any(" (workers/" in f for f in frames):
        return False
    leaf = frames[-1].partition(" (")[0]
    return leaf.endswith("poll") or any(_matches(f, *m) for f in frames for m in IDLE)
