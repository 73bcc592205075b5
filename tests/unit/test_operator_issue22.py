"""Issue 22, what an operator hit on a real Airflow deployment (no services needed): Airflow's
shipped batch size 0 (item 1), a batch size past the bound (item 5), Flower's port in use
(item 6), what `doctor` shows of Airflow's backend and of rules that are off (item 10), and a
second beat seen from the first interleaved trigger (item 9)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import Result

from tests import cli_runner
from tests.cli_runner import restore_logging  # noqa: F401 - autouse fixture
from workers.cli.doctor import Check, batch_check, interleave_check, render, report
from workers.exceptions import SettingsError
from workers.exit_codes import EXIT_BAD_ARGUMENT, EXIT_SETTINGS
from workers.settings import MAX_BATCH_SIZE, METASTORE_BACKEND, Settings, check_batch_size_value


def write_cfg(home: Path, **sections: dict[str, str]) -> Path:
    path = home / "airflow.cfg"
    path.write_text("".join(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
                            for section, keys in sections.items()))
    return path


def invoke(*args: str, env: dict[str, str]) -> Result:
    """The CLI with *env* its whole configuration: Airflow's variables are unset too."""
    return cli_runner.invoke(*args, env=env, unset=("STATESWEEP_", "AIRFLOW"))


def doctor_lines(settings: Settings, monkeypatch: pytest.MonkeyPatch, home: Path) -> dict[str, str]:
    """doctor's settings lines by name, as `statesweep doctor` prints them."""
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    text = render(report([Check("database", "ok", "-")], settings))
    return {line.split(" = ")[0].strip(): line for line in text.splitlines() if " = " in line}


# --- item 1: Airflow's shipped state_cleanup_batch_size = 0 -------------------------------------


@pytest.mark.parametrize("zero", ["0", "00", "+0", " 0 ", "000"])
def test_airflow_cfg_batch_size_zero_in_any_spelling_keeps_statesweeps_batch(
        tmp_path: Path, zero: str) -> None:
    cfg = write_cfg(tmp_path, state_store={"state_cleanup_batch_size": zero})
    s = Settings.from_env({"AIRFLOW_HOME": str(tmp_path)})
    assert s.cleanup_batch_size == 10000
    assert s.source_of("cleanup_batch_size").startswith("default (")
    assert s.not_adopted["cleanup_batch_size"] == (
        f"airflow.cfg {cfg} [state_store] state_cleanup_batch_size={zero.strip()}")


def test_airflow_env_batch_size_zero_keeps_statesweeps_batch(tmp_path: Path) -> None:
    s = Settings.from_env({"AIRFLOW_HOME": str(tmp_path),
                           "AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE": "0"})
    assert s.cleanup_batch_size == 10000
    assert s.not_adopted == {
        "cleanup_batch_size": "AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE=0"}


def test_doctor_says_once_why_airflows_zero_is_not_adopted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_cfg(tmp_path, state_store={"state_cleanup_batch_size": "0"})
    s = Settings.from_env({"AIRFLOW_HOME": str(tmp_path)})
    check = batch_check(s)
    assert check is not None and check.status == "ok"
    assert check.detail.startswith("10,000 rows per chunk: airflow.cfg ")
    assert "state_cleanup_batch_size=0 means no batching in Airflow" in check.detail
    line = doctor_lines(s, monkeypatch, tmp_path)["cleanup_batch_size"]
    assert line.split("[", 1)[0].split(" = ")[1].strip() == "10000"
    assert (f"[default (airflow.cfg {cfg} [state_store] state_cleanup_batch_size=0 means no "
            "batching in Airflow; statesweep batches)]") in line


def test_an_explicit_statesweep_batch_size_zero_is_flagged_loudly() -> None:
    s = Settings.from_env({"STATESWEEP_CLEANUP_BATCH_SIZE": "0", "HOME": "/nonexistent"})
    assert s.cleanup_batch_size == 0
    check = batch_check(s)
    assert check is not None and check.status == "warn"
    assert check.detail.startswith("STATESWEEP_CLEANUP_BATCH_SIZE=0: every run deletes ALL "
                                   "expired rows in ONE transaction")


def test_a_batch_size_set_by_anyone_else_needs_no_check(tmp_path: Path) -> None:
    assert batch_check(Settings.from_env({"HOME": str(tmp_path)})) is None
    assert batch_check(Settings.from_env({
        "HOME": str(tmp_path), "AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE": "500"})) is None


# --- item 5: a batch size past the bound ---------------------------------------------------------


def test_check_batch_size_value_bounds_every_batch_size() -> None:
    assert check_batch_size_value(0) == 0
    assert check_batch_size_value(MAX_BATCH_SIZE) == MAX_BATCH_SIZE
    assert MAX_BATCH_SIZE < 2 ** 31  # a LIMIT every database takes as a signed 32-bit integer
    for bad in (-1, MAX_BATCH_SIZE + 1, 10 ** 20, True, "100"):
        with pytest.raises(ValueError, match=r"^--batch-size must be 0 \(one chunk\)"):
            check_batch_size_value(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 100000000000000000000$"):
        check_batch_size_value(10 ** 20)


def test_a_huge_statesweep_batch_size_is_one_settings_error() -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"STATESWEEP_CLEANUP_BATCH_SIZE": str(10 ** 20), "HOME": "/nonexistent"})
    assert str(err.value) == (
        f"invalid setting STATESWEEP_CLEANUP_BATCH_SIZE='{10 ** 20}': must be 0 (one chunk) or "
        "a number of rows up to 10,000,000")


@pytest.mark.parametrize("command", [("cleanup",), ("cleanup", "--local"),
                                     ("cleanup", "--dry-run"), ("orphans", "--local")])
def test_a_huge_batch_size_option_is_one_line_before_anything_runs(
        command: tuple[str, ...], tmp_path: Path) -> None:
    # The database named does not exist: nothing could be read, let alone deleted, before the
    # option was refused.
    done = invoke(*command, "--batch-size", str(10 ** 20),
                  env={"HOME": str(tmp_path),
                       "STATESWEEP_DATABASE_URL": f"sqlite:///{tmp_path}/none.db"})
    assert done.exit_code == EXIT_BAD_ARGUMENT
    assert done.stderr.strip() == (f"error: --batch-size must be 0 (one chunk) or a number of "
                                   f"rows up to 10,000,000, got {10 ** 20}")
    assert not (tmp_path / "none.db").exists()


def test_a_huge_batch_size_setting_is_one_line_through_the_cli(tmp_path: Path) -> None:
    done = invoke("cleanup", "--local", env={"HOME": str(tmp_path),
                                            "STATESWEEP_CLEANUP_BATCH_SIZE": str(10 ** 20)})
    assert done.exit_code == EXIT_SETTINGS
    assert len(done.stderr.strip().splitlines()) == 1
    assert f"STATESWEEP_CLEANUP_BATCH_SIZE='{10 ** 20}'" in done.stderr
    assert "Traceback" not in done.stderr


# --- item 6: Flower's port in use -----------------------------------------------------------------


def test_flower_on_a_port_in_use_is_one_line_naming_address_and_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = invoke("flower", "--basic-auth", "admin:hunter2", "--port", str(port),
                      env={"HOME": str(tmp_path)})
    assert done.exit_code == EXIT_BAD_ARGUMENT
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.output
    assert lines[0].startswith(f"error: --port {port} on --address 127.0.0.1 cannot be listened "
                               "on: Address already in use")
    assert "hunter2" not in done.output


def test_flower_on_an_address_this_host_lacks_is_one_line(tmp_path: Path) -> None:
    done = invoke("flower", "--basic-auth", "admin:pw", "--address", "no-such-host.invalid",
                  env={"HOME": str(tmp_path)})
    assert done.exit_code == EXIT_BAD_ARGUMENT
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: --address 'no-such-host.invalid' is not an address")


# --- item 10: Airflow's backend as configured, rules that are off -------------------------------


@pytest.mark.parametrize("name", ["airflow.state.metastore.MetastoreBackend",
                                  "airflow.state.metastore.MetastoreStateBackend"])
def test_doctor_shows_airflows_backend_as_configured_and_what_statesweep_makes_of_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    cfg = write_cfg(tmp_path, state_store={"backend": name})
    s = Settings.from_env({"AIRFLOW_HOME": str(tmp_path)})
    assert s.state_backend == METASTORE_BACKEND and s.configured == {"state_backend": name}
    line = doctor_lines(s, monkeypatch, tmp_path)["state_backend"]
    assert line.startswith(f"  state_backend = {name}  ")
    assert line.endswith(f"[airflow.cfg {cfg} [state_store] backend; Airflow's metastore "
                         f"backend: statesweep cleans its tables as its own {METASTORE_BACKEND}]")


def test_doctor_shows_statesweeps_own_backend_as_is(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings.from_env({"HOME": str(tmp_path)})
    line = doctor_lines(s, monkeypatch, tmp_path)["state_backend"]
    assert line.split()[2] == METASTORE_BACKEND and line.endswith("[default]")


def test_doctor_shows_rules_that_are_off_as_off(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    lines = doctor_lines(Settings.from_env({"HOME": str(tmp_path)}), monkeypatch, tmp_path)
    for name in ("max_run_seconds", "max_replica_lag_seconds", "target_chunk_seconds",
                 "chunk_rate_limit", "active_hours"):
        assert lines[name].split() == [name, "=", "off", "[default]"], lines[name]
    assert lines["run_store_url"].split() == ["run_store_url", "=", "unset", "[default]"]
    on = doctor_lines(Settings.from_env({"HOME": str(tmp_path),
                                         "STATESWEEP_MAX_RUN_SECONDS": "900"}),
                      monkeypatch, tmp_path)
    assert on["max_run_seconds"].split() == ["max_run_seconds", "=", "900.0",
                                             "[STATESWEEP_MAX_RUN_SECONDS]"]


# --- item 9: a second beat from the first interleaved trigger -----------------------------------


def test_two_beats_half_a_period_apart_are_seen_at_their_first_interleave() -> None:
    """Two beats 300 s apart on a 600 s schedule trigger every 300 s: never under half the
    period, so doctor used to say nothing at all; one interleaved trigger is enough."""
    settings = Settings.from_env({"STATESWEEP_COORDINATOR_SCHEDULE": "600", "HOME": "/none"})
    now = 1_000_000.0
    check = interleave_check(settings, [now, now - 300.0])
    assert check is not None and check.name == "second beat" and check.status == "warn"
    assert "300.0s apart where one beat triggers every 600s" in check.detail
    assert interleave_check(settings, [now, now - 420.0, now - 600.0]) is not None


def test_one_beat_is_not_called_two() -> None:
    settings = Settings.from_env({"STATESWEEP_COORDINATOR_SCHEDULE": "600", "HOME": "/none"})
    now = 1_000_000.0
    assert interleave_check(settings, []) is None
    assert interleave_check(settings, [now]) is None
    # A beat's triggers a period apart, a late one, and a restart's longer gap.
    assert interleave_check(settings, [now, now - 600.5, now - 1199.0, now - 2500.0]) is None
    # A crontab's gaps are uneven; beat_checks' own rule covers it.
    cron = Settings.from_env({"STATESWEEP_COORDINATOR_SCHEDULE": "0 2,3 * * *",
                              "HOME": "/none"})
    assert interleave_check(cron, [now, now - 3600.0]) is None


def test_doctor_reports_a_second_beat_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.cleanup_runs import memory_store
    from workers.cli import doctor

    store = memory_store()
    settings = Settings.from_env({"STATESWEEP_COORDINATOR_SCHEDULE": "600", "HOME": "/none"})
    monkeypatch.setattr("workers.runs.registry_for", lambda *_: store)
    store.client.lpush(f"{store.prefix}:triggers:beat", 1_000_000.0 - 300.0, 1_000_000.0)
    names = [c.name for c in doctor.trigger_checks(settings)]
    assert names.count("second beat") == 1
    store.client.lpush(f"{store.prefix}:triggers:beat", 1_000_000.0 + 10)  # beat_checks' rule
    names = [c.name for c in doctor.trigger_checks(settings)]
    assert names.count("second beat") == 1
