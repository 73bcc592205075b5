"""Two statesweep deployments on one broker: workers with the same node name (``w1@host``), each
consuming its own queues, answer only their own deployment's broadcasts (inspect, doctor,
Flower), because Celery's control exchange is named after the control queue."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import seed_postgres
from tests.processes import workers
from tests.services import unique
from workers.celery_app import build_app
from workers.settings import Settings

pytestmark = pytest.mark.acceptance


def deployment_env(tag: str) -> dict[str, str]:
    return {"STATESWEEP_KEY_PREFIX": f"sw:{tag}", "STATESWEEP_CONTROL_QUEUE": f"sw.{tag}.control",
            "STATESWEEP_CHUNK_QUEUE": f"sw.{tag}.chunks"}


def test_same_named_workers_of_two_deployments_answer_only_their_own_inspect(
        pg_url: str, tmp_path: Path) -> None:
    a, b = deployment_env(unique("a")), deployment_env(unique("b"))
    db = seed_postgres(pg_url, a, 100)
    env_b = {**db.env, **b}
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
    try:
        with workers(db.env, tmp_path / "a", count=1, concurrency=1), \
                workers(env_b, tmp_path / "b", count=1, concurrency=1):
            for env, own in ((db.env, a), (env_b, b)):
                app = build_app(Settings.from_env(env), include_tasks=False)
                try:
                    replies = app.control.inspect(timeout=3.0).active_queues() or {}
                finally:
                    app.close()
                assert len(replies) == 1, replies  # one w1@host, not two merged
                (queues,) = replies.values()
                assert {q["name"] for q in queues} == {own["STATESWEEP_CONTROL_QUEUE"],
                                                       own["STATESWEEP_CHUNK_QUEUE"]}
    finally:
        db.engine.dispose()
