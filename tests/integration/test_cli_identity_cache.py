"""The CLI reads its database identity (issue 22 item 2) at most once per
IDENTITY_CACHE_SECONDS for a URL, keeping it in the run store: an empty `cleanup --wait` then
needs no SQLAlchemy, driver or connection (issue 20 item 5). Real PostgreSQL and Redis."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.conftest import create_schema
from tests.services import REDIS_URL
from workers.cli.dispatch import IDENTITY_CACHE_SECONDS, database_identity
from workers.cli.services import own_identity
from workers.exceptions import SchemaError
from workers.runs import registry_for
from workers.settings import Settings


def test_the_identity_is_read_once_then_kept_for_a_while(
        pg_url: str, redis_url: str, isolation: dict[str, str]) -> None:
    engine, tables = create_schema(pg_url)
    settings = Settings.from_env({"STATESWEEP_DATABASE_URL": pg_url,
                                  "STATESWEEP_BROKER_URL": REDIS_URL,
                                  "STATESWEEP_RESULT_BACKEND": REDIS_URL, **isolation})
    registry = registry_for(settings.effective_run_store_url, settings.key_prefix)
    try:
        first = database_identity(settings, registry)
        assert first == own_identity(settings).encode() and first["tables"]
        [key] = registry.client.keys(f"{settings.key_prefix}:identity:*")
        assert 0 < registry.client.ttl(key) <= IDENTITY_CACHE_SECONDS
        assert "secret" not in key and pg_url not in key
        # The tables go: a fresh read refuses, the kept identity still answers (the
        # coordinator, comparing it with the workers' own, is what guards the run).
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {tables.task_state.name}"))
        with pytest.raises(SchemaError, match="holds no"):
            own_identity(settings)
        assert database_identity(settings, registry) == first
        registry.client.delete(key)
        with pytest.raises(SchemaError, match="holds no"):
            database_identity(settings, registry)
        assert registry.client.keys(f"{settings.key_prefix}:identity:*") == []
    finally:
        registry.client.delete(*registry.client.keys(f"{settings.key_prefix}:*") or ["-"])
        engine.dispose()
