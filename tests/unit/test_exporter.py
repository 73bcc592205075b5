"""The exporter's pieces that need no service: the scrape cache, and the start-up refusals
(memory:// run store, a zero query timeout, a port already taken), each a named exit code."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from workers.cli import EXIT_REFUSED, EXIT_SETTINGS, main
from workers.exporter import DEFAULT_PORT, TimedCache, schedule_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cache_reuses_a_value_and_an_error_for_its_ttl() -> None:
    clock, calls = Clock(), []

    def refresh() -> int:
        calls.append(clock.now)
        if len(calls) == 2:
            raise ConnectionError("database down")
        return len(calls)

    cache = TimedCache(60, refresh, clock)
    assert cache.get() == 1
    clock.now = 59
    assert cache.get() == 1 and calls == [0]
    clock.now = 60
    for _ in range(2):  # the failure is cached too: a dead database costs one try per TTL
        with pytest.raises(ConnectionError):
            cache.get()
    assert calls == [0, 60]
    clock.now = 120
    assert cache.get() == 3


def test_schedule_period_is_exported_only_for_a_fixed_period() -> None:
    assert schedule_seconds("600") == 600.0
    assert schedule_seconds("*/10 * * * *") is None


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize(("env", "code", "message"), [
    ({"STATESWEEP_RUN_STORE_URL": "memory://"}, EXIT_REFUSED,
     "memory:// is one process's memory"),
    ({"STATESWEEP_EXPORTER_QUERY_TIMEOUT_MS": "0"}, EXIT_SETTINGS,
     "STATESWEEP_EXPORTER_QUERY_TIMEOUT_MS='0': must be a positive integer"),
    ({"STATESWEEP_EXPORTER_CACHE_SECONDS": "soon"}, EXIT_SETTINGS,
     "STATESWEEP_EXPORTER_CACHE_SECONDS='soon': must be a whole number"),
])
def test_exporter_refuses_to_start(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str], env: dict[str, str],
                                   code: int, message: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exit_info:
        main(["exporter", "--port", str(DEFAULT_PORT)])
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_exporter_names_a_port_already_taken(taken_port: int,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["exporter", "--host", "127.0.0.1", "--port", str(taken_port)])
    assert exit_info.value.code == EXIT_REFUSED
    assert f"cannot listen on 127.0.0.1:{taken_port} (--host/--port)" in capsys.readouterr().err


def test_exporter_listens_on_loopback_unless_told(taken_port: int,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """/metrics has no authentication: with no --host it binds 127.0.0.1 (the port taken on
    loopback is what stops it), and compose passes --host=0.0.0.0 inside its own network."""
    from pathlib import Path

    import yaml

    with pytest.raises(SystemExit) as exit_info:
        main(["exporter", "--port", str(taken_port)])
    assert exit_info.value.code == EXIT_REFUSED
    assert f"cannot listen on 127.0.0.1:{taken_port}" in capsys.readouterr().err
    compose = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.yml").read_text())
    assert "--host=0.0.0.0" in compose["services"]["exporter"]["command"]
