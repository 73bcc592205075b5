"""Settings that contradict each other fail before anything runs (issue 21, repro 7): one line
naming the setting and its value, the one it conflicts with, and what to do; exit 3 from every
command. Before, a lock TTL of 600 s beside a 90 s visibility timeout, a statement timeout of
600 s beside a 25 s soft limit and a Redis Cluster hash-tag prefix were accepted or refused
without a word; a unix:// run store was refused."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from workers.cli import cli
from workers.exceptions import SettingsError
from workers.exit_codes import EXIT_SETTINGS
from workers.settings import Settings


def _error(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    return str(err.value)


def test_defaults_satisfy_every_cross_check() -> None:
    s = Settings.from_env({})
    assert s.lock_ttl_seconds < s.visibility_timeout
    assert s.statement_timeout_ms < 1000 * s.chunk_soft_time_limit


def test_lock_ttl_at_or_above_the_visibility_timeout_is_refused_on_redis() -> None:
    msg = _error({"STATESWEEP_LOCK_TTL_SECONDS": "600", "STATESWEEP_VISIBILITY_TIMEOUT": "90"})
    assert "\n" not in msg, msg
    assert "STATESWEEP_LOCK_TTL_SECONDS='600'" in msg
    assert "must be below STATESWEEP_VISIBILITY_TIMEOUT=90" in msg
    assert "lower the lock TTL or raise the visibility timeout" in msg
    # The boundary: equal is refused (the redelivery may come as the lock lapses), one below is
    # the largest accepted.
    assert "STATESWEEP_LOCK_TTL_SECONDS='90'" in _error({"STATESWEEP_LOCK_TTL_SECONDS": "90"})
    assert Settings.from_env({"STATESWEEP_LOCK_TTL_SECONDS": "89"}).lock_ttl_seconds == 89


def test_lock_ttl_rule_is_redis_only() -> None:
    """RabbitMQ redelivers when the consumer's connection is gone; no visibility timeout."""
    s = Settings.from_env({"STATESWEEP_LOCK_TTL_SECONDS": "600",
                           "STATESWEEP_BROKER_URL": "amqp://guest:guest@rabbit:5672//"})
    assert s.lock_ttl_seconds == 600


def test_statement_timeout_at_or_above_the_soft_limit_is_refused() -> None:
    msg = _error({"STATESWEEP_STATEMENT_TIMEOUT_MS": "600000"})
    assert "\n" not in msg, msg
    assert "STATESWEEP_STATEMENT_TIMEOUT_MS='600000'" in msg
    assert "must be below STATESWEEP_CHUNK_SOFT_TIME_LIMIT=25 s (25000 ms)" in msg
    assert "STATESWEEP_STATEMENT_TIMEOUT_MS='25000'" in _error(
        {"STATESWEEP_STATEMENT_TIMEOUT_MS": "25000"})
    s = Settings.from_env({"STATESWEEP_STATEMENT_TIMEOUT_MS": "24999"})
    assert s.statement_timeout_ms == 24999


@pytest.mark.parametrize("prefix", ["{statesweep}", "sw:{cluster}", "{sw}:runs", "a{b.c-1}d"])
def test_a_redis_cluster_hash_tag_prefix_is_accepted(prefix: str) -> None:
    assert Settings.from_env({"STATESWEEP_KEY_PREFIX": prefix}).key_prefix == prefix


@pytest.mark.parametrize("prefix", ["{a}{b}", "{statesweep", "statesweep}", "{}", "my prefix",
                                    "{a b}"])
def test_a_malformed_prefix_is_refused_naming_it(prefix: str) -> None:
    msg = _error({"STATESWEEP_KEY_PREFIX": prefix})
    assert f"STATESWEEP_KEY_PREFIX={prefix!r}" in msg and "hash tag in braces" in msg


def test_an_empty_prefix_is_refused() -> None:
    assert "must not be empty" in _error({"STATESWEEP_KEY_PREFIX": ""})


def test_a_unix_socket_run_store_is_accepted_and_others_refused() -> None:
    url = "unix:///run/redis/redis.sock?db=2"
    assert Settings.from_env({"STATESWEEP_RUN_STORE_URL": url}).effective_run_store_url == url
    msg = _error({"STATESWEEP_RUN_STORE_URL": "ftp://u:pw@h/x"})
    assert "STATESWEEP_RUN_STORE_URL='ftp://u:***@h/x'" in msg and "unix://" in msg
    assert "pw@" not in msg


@pytest.mark.parametrize(("env", "needle"), [
    ({"STATESWEEP_LOCK_TTL_SECONDS": "600"}, "STATESWEEP_LOCK_TTL_SECONDS='600'"),
    ({"STATESWEEP_STATEMENT_TIMEOUT_MS": "600000"}, "STATESWEEP_STATEMENT_TIMEOUT_MS='600000'"),
])
def test_the_cli_exits_3_with_one_line(env: dict[str, str], needle: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(cli, ["cleanup", "--local"])
    assert result.exit_code == EXIT_SETTINGS, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.output
