"""The real-replica harnesses follow the suite's rule for a missing binary: skip locally with
the reason, fail with CI=true. The binaries are hidden from each harness to check it."""

from __future__ import annotations

import pytest

from tests import mariadb_replica, standby


@pytest.mark.parametrize("ci", [False, True])
def test_postgres_harness_without_binaries(monkeypatch: pytest.MonkeyPatch, ci: bool) -> None:
    monkeypatch.setattr(standby, "find_bindir", lambda: None)
    monkeypatch.setattr(standby, "CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="pg_basebackup"), standby.standby_pair():
        pytest.fail("the harness started without binaries")


@pytest.mark.parametrize("ci", [False, True])
def test_mariadb_harness_without_binaries(monkeypatch: pytest.MonkeyPatch, ci: bool) -> None:
    monkeypatch.setattr(mariadb_replica, "_binary", lambda *names: None)
    monkeypatch.setattr(mariadb_replica, "CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    pair = mariadb_replica.mariadb_replica_pair()
    with pytest.raises(expected, match="mariadb-install-db"), pair:
        pytest.fail("the harness started without binaries")

