"""One beat per deployment (issue 22, item 9): a second `celery -A workers beat` on the same
settings schedules nothing; it says once that it waits as the first one's standby, and takes
over when the first is killed. Real beats, real Redis."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.processes import CELERY, ROOT, child_env
from tests.services import REDIS_URL, require
from workers.beat_lock import BEAT_LOCK_TTL_SECONDS

pytestmark = pytest.mark.acceptance

DUE = "Sending due task statesweep-cleanup-task-state"


def start_beat(env: dict[str, str], tmp_path: Path, name: str) -> tuple[subprocess.Popen[bytes],
                                                                          Path]:
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([CELERY, "-A", "workers", "beat", "-l", "INFO", "-s",
                                 str(tmp_path / f"{name}-schedule")], cwd=ROOT,
                                env=child_env(env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_second_beat_waits_as_a_standby_and_takes_over_when_the_first_dies(
        isolation: dict[str, str], tmp_path: Path) -> None:
    require("Redis", "127.0.0.1", 6379)
    env = {"STATESWEEP_BROKER_URL": REDIS_URL, "STATESWEEP_RESULT_BACKEND": REDIS_URL,
           "STATESWEEP_COORDINATOR_SCHEDULE": "1", **isolation}
    first, first_log = start_beat(env, tmp_path, "first")
    procs = [first]
    try:
        wait_for(lambda: DUE in first_log.read_text(), 30, "the first beat never sent")
        second, second_log = start_beat(env, tmp_path, "second")
        procs.append(second)
        wait_for(lambda: "waits as its standby" in second_log.read_text(), 30,
                 "the second beat never said it waits")
        time.sleep(3)  # three of the first beat's periods
        text = second_log.read_text()
        assert DUE not in text, text
        standby = [line for line in text.splitlines() if "statesweep: beat:" in line]
        assert len(standby) == 1 and "another beat (" in standby[0], text
        assert second.poll() is None
        first.kill()  # SIGKILL: no goodbye; the lock lapses after its TTL
        wait_for(lambda: DUE in second_log.read_text(), BEAT_LOCK_TTL_SECONDS + 15,
                 "the standby never took over")
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        client.delete(f"{isolation['STATESWEEP_KEY_PREFIX']}:beat",
                      isolation["STATESWEEP_CONTROL_QUEUE"])
        client.close()
