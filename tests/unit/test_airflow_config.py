"""Airflow's configuration with Airflow's precedence: STATESWEEP_* > AIRFLOW__SECTION__KEY >
AIRFLOW__SECTION__KEY_CMD > airflow.cfg (the key, then its _cmd) > default. Each airflow.cfg is
written by the test; each layer has its own test; `_cmd` output never appears in an error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from workers import airflow_config
from workers.exceptions import SettingsError
from workers.settings import METASTORE_BACKEND, Settings

PG = "postgresql://airflow@db.example/airflow"
SECRET = "Pw-cmd-secret-42"


def write_cfg(path: Path, **sections: dict[str, str]) -> Path:
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def echo_cmd(value: str) -> str:
    """A `_cmd` that prints *value*, run without a shell as Airflow runs it."""
    return f"{sys.executable} -c 'print(\"{value}\")'"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


# --- each key read from airflow.cfg -------------------------------------------------------------


def test_each_key_is_read_from_airflow_cfg(home: Path) -> None:
    write_cfg(home / "airflow.cfg",
              database={"sql_alchemy_conn": PG},
              state_store={"default_retention_days": "9", "state_cleanup_batch_size": "321",
                           "backend": "airflow.state.metastore.MetastoreBackend"})
    s = Settings.from_env({"AIRFLOW_HOME": str(home)})
    assert (s.database_url, s.default_retention_days, s.cleanup_batch_size) == (PG, 9, 321)
    assert s.state_backend == METASTORE_BACKEND and s.uses_metastore_backend
    where = f"airflow.cfg {home / 'airflow.cfg'}"
    assert s.source_of("database_url") == f"{where} [database] sql_alchemy_conn"
    assert s.source_of("cleanup_batch_size") == f"{where} [state_store] state_cleanup_batch_size"
    assert s.source_of("log_level") == "default"


def test_airflows_shipped_batch_size_zero_is_not_adopted(home: Path) -> None:
    """Issue 22, item 1: `airflow db migrate` writes state_cleanup_batch_size = 0 (Airflow's
    "no batching") into every airflow.cfg. statesweep keeps its own batch and says why; only
    its own STATESWEEP_CLEANUP_BATCH_SIZE=0 asks for one unbounded transaction."""
    write_cfg(home / "airflow.cfg", state_store={"state_cleanup_batch_size": "0"})
    where = f"airflow.cfg {home / 'airflow.cfg'}"
    from_cfg = Settings.from_env({"AIRFLOW_HOME": str(home)})
    assert from_cfg.cleanup_batch_size == Settings().cleanup_batch_size == 10000
    assert from_cfg.source_of("cleanup_batch_size") == (
        f"default ({where} [state_store] state_cleanup_batch_size=0 means no batching in "
        "Airflow; statesweep batches)")
    from_env = Settings.from_env({"AIRFLOW_HOME": str(home),
                                  "AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE": "0"})
    assert from_env.cleanup_batch_size == 10000
    assert "AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE=0 means no batching" in (
        from_env.source_of("cleanup_batch_size"))
    own = Settings.from_env({"AIRFLOW_HOME": str(home), "STATESWEEP_CLEANUP_BATCH_SIZE": "0"})
    assert (own.cleanup_batch_size, own.source_of("cleanup_batch_size")) == (
        0, "STATESWEEP_CLEANUP_BATCH_SIZE")


def test_a_batch_size_past_the_maximum_is_refused(home: Path) -> None:
    """Issue 22, item 5: a batch of 10**20 was accepted and overflowed in the worker."""
    for env in ({"STATESWEEP_CLEANUP_BATCH_SIZE": str(10 ** 20)},
                {"AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE": "20000000"}):
        with pytest.raises(SettingsError, match="up to 10,000,000"):
            Settings.from_env({"AIRFLOW_HOME": str(home), **env})


def test_airflows_celery_broker_and_redis_result_backend_are_adopted(home: Path) -> None:
    """Issue 23, item 5: beside a CeleryExecutor deployment statesweep takes [celery]
    broker_url and a Redis result_backend (and their _cmd forms) with the database URL's
    precedence; Airflow's usual db+ result backend stays statesweep's own, and says so."""
    write_cfg(home / "airflow.cfg", celery={
        "broker_url": "redis://:pw@broker:6379/0",
        "result_backend": "db+postgresql://airflow:pw@db/airflow"})
    where = f"airflow.cfg {home / 'airflow.cfg'} [celery]"
    s = Settings.from_env({"AIRFLOW_HOME": str(home)})
    assert (s.broker_url, s.source_of("broker_url")) == (
        "redis://:pw@broker:6379/0", f"{where} broker_url")
    assert s.result_backend == Settings().result_backend
    assert s.source_of("result_backend") == (
        f"default ({where} result_backend is a db+postgresql backend; statesweep takes "
        "redis/rediss from Airflow's [celery])")
    s = Settings.from_env({"AIRFLOW_HOME": str(home),
                           "AIRFLOW__CELERY__RESULT_BACKEND_CMD": echo_cmd("redis://r:6379/1"),
                           "AIRFLOW__CELERY__BROKER_URL": "amqp://u:p@rabbit:5672//"})
    assert (s.result_backend, s.source_of("result_backend")) == (
        "redis://r:6379/1", "AIRFLOW__CELERY__RESULT_BACKEND_CMD")
    assert s.broker_url == "amqp://u:p@rabbit:5672//"
    own = Settings.from_env({"AIRFLOW_HOME": str(home),
                             "STATESWEEP_BROKER_URL": "redis://own:6379/3"})
    assert (own.broker_url, own.source_of("broker_url")) == (
        "redis://own:6379/3", "STATESWEEP_BROKER_URL")


def test_interpolation_is_off_as_airflow_reads_these_keys(home: Path) -> None:
    url = "postgresql://airflow:p%25w%(x)s@db/airflow"
    write_cfg(home / "airflow.cfg", database={"sql_alchemy_conn": url})
    assert Settings.from_env({"AIRFLOW_HOME": str(home)}).database_url == url


# --- which airflow.cfg ---------------------------------------------------------------------------


def test_airflow_config_beats_airflow_home_which_beats_home(tmp_path: Path) -> None:
    for name, retention in (("explicit", "1"), ("airflow_home", "2"), ("home/airflow", "3")):
        (tmp_path / name).mkdir(parents=True)
        write_cfg(tmp_path / name / "airflow.cfg",
                  state_store={"default_retention_days": retention})
    explicit = str(tmp_path / "explicit" / "airflow.cfg")
    env = {"AIRFLOW_CONFIG": explicit, "AIRFLOW_HOME": str(tmp_path / "airflow_home"),
           "HOME": str(tmp_path / "home")}
    assert Settings.from_env(env).default_retention_days == 1
    del env["AIRFLOW_CONFIG"]
    assert Settings.from_env(env).default_retention_days == 2
    del env["AIRFLOW_HOME"]
    assert Settings.from_env(env).default_retention_days == 3


def test_a_missing_airflow_cfg_at_the_default_place_means_defaults(home: Path) -> None:
    s = Settings.from_env({"AIRFLOW_HOME": str(home / "nowhere")})
    assert s.database_url == "sqlite:///statesweep.db"
    assert s.source_of("database_url") == "default"


def test_a_missing_airflow_config_that_was_named_is_an_error(home: Path) -> None:
    with pytest.raises(SettingsError, match=r"AIRFLOW_CONFIG=.*missing\.cfg: no such file"):
        Settings.from_env({"AIRFLOW_CONFIG": str(home / "missing.cfg")})


def test_an_unreadable_airflow_cfg_is_an_error_naming_it(home: Path) -> None:
    (home / "airflow.cfg").mkdir()  # root reads any file; a directory it cannot read as one
    with pytest.raises(SettingsError, match=r"airflow\.cfg .*airflow\.cfg cannot be read"):
        Settings.from_env({"AIRFLOW_HOME": str(home)})


def test_a_malformed_airflow_cfg_is_named_without_quoting_its_lines(home: Path) -> None:
    (home / "airflow.cfg").write_text(f"sql_alchemy_conn = postgresql://a:{SECRET}@h/db\n")
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"AIRFLOW_HOME": str(home)})
    assert "cannot be read: MissingSectionHeaderError" in str(err.value)
    assert SECRET not in str(err.value)


# --- precedence: one test per layer -------------------------------------------------------------


def test_layer_statesweep_variable_beats_airflow_variable(home: Path) -> None:
    env = {"AIRFLOW_HOME": str(home), "STATESWEEP_DATABASE_URL": "postgresql://sw@h/sw",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": PG}
    s = Settings.from_env(env)
    assert (s.database_url, s.source_of("database_url")) == ("postgresql://sw@h/sw",
                                                             "STATESWEEP_DATABASE_URL")


def test_layer_airflow_variable_beats_its_cmd(home: Path) -> None:
    env = {"AIRFLOW_HOME": str(home), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": PG,
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD": "false"}  # would fail if it ran
    s = Settings.from_env(env)
    assert (s.database_url, s.source_of("database_url")) == (
        PG, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")


def test_layer_airflow_cmd_variable_beats_airflow_cfg(home: Path) -> None:
    write_cfg(home / "airflow.cfg", database={"sql_alchemy_conn": "postgresql://cfg@h/cfg"})
    env = {"AIRFLOW_HOME": str(home),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD": echo_cmd("postgresql://cmd@h/cmd")}
    s = Settings.from_env(env)
    assert (s.database_url, s.source_of("database_url")) == (
        "postgresql://cmd@h/cmd", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD")


def test_layer_airflow_cfg_key_beats_its_cmd_in_the_file(home: Path) -> None:
    write_cfg(home / "airflow.cfg", database={"sql_alchemy_conn": "postgresql://cfg@h/cfg",
                                              "sql_alchemy_conn_cmd": "false"})
    s = Settings.from_env({"AIRFLOW_HOME": str(home)})
    assert s.database_url == "postgresql://cfg@h/cfg"


def test_layer_airflow_cfg_cmd_beats_the_default(home: Path) -> None:
    write_cfg(home / "airflow.cfg",
              database={"sql_alchemy_conn_cmd": echo_cmd("postgresql://filecmd@h/x")})
    s = Settings.from_env({"AIRFLOW_HOME": str(home)})
    assert s.database_url == "postgresql://filecmd@h/x"
    assert s.source_of("database_url").endswith("[database] sql_alchemy_conn_cmd")


def test_layer_default_when_nothing_is_set(home: Path) -> None:
    write_cfg(home / "airflow.cfg", core={"dags_folder": "/dags"})
    s = Settings.from_env({"AIRFLOW_HOME": str(home)})
    assert s.cleanup_batch_size == Settings().cleanup_batch_size
    assert s.source_of("cleanup_batch_size") == "default"


def test_cmd_is_honoured_only_for_the_connection_as_in_airflow(home: Path) -> None:
    env = {"AIRFLOW_HOME": str(home),
           "AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE_CMD": echo_cmd("7")}
    assert Settings.from_env(env).cleanup_batch_size == Settings().cleanup_batch_size


# --- _cmd success, failure, timeout -------------------------------------------------------------


def test_cmd_output_is_the_value_stripped(home: Path) -> None:
    env = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD": echo_cmd(f"postgresql://a:{SECRET}@h/d")}
    s = Settings.from_env(env)
    assert s.database_url == f"postgresql://a:{SECRET}@h/d"
    assert SECRET not in repr(s)


def test_a_failing_cmd_names_the_key_never_its_output(home: Path) -> None:
    cmd = (f"{sys.executable} -c 'import sys; print(\"{SECRET}\"); "
           f"print(\"{SECRET}\", file=sys.stderr); sys.exit(3)'")
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD": cmd})
    msg = str(err.value)
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD: the command failed with exit status 3" in msg
    assert SECRET not in msg


def test_a_failing_cmd_in_airflow_cfg_names_the_file_and_key(home: Path) -> None:
    write_cfg(home / "airflow.cfg", database={"sql_alchemy_conn_cmd": "false"})
    with pytest.raises(SettingsError,
                       match=r"\[database\] sql_alchemy_conn_cmd: the command failed"):
        Settings.from_env({"AIRFLOW_HOME": str(home)})


def test_a_cmd_that_times_out_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(airflow_config, "CMD_TIMEOUT_SECONDS", 0.5)
    with pytest.raises(SettingsError,
                       match=r"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD: the command did not "
                             r"finish within 0\.5s"):
        Settings.from_env({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD": "sleep 30"})


def test_a_cmd_that_cannot_run_or_prints_nothing_is_named() -> None:
    with pytest.raises(SettingsError, match="_CMD: the command cannot be run"):
        Settings.from_env({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD": "/no/such/binary"})
    with pytest.raises(SettingsError, match="_CMD: the command printed nothing"):
        Settings.from_env({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD": "true"})


# --- [state_store] backend -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["airflow.state.metastore.MetastoreBackend",
                                  "airflow.state.metastore.MetastoreStateBackend",
                                  "workers.store.MetastoreStateBackend"])
def test_airflow_metastore_backend_names_mean_the_tables_statesweep_cleans(name: str) -> None:
    s = Settings.from_env({"AIRFLOW__STATE_STORE__BACKEND": name})
    assert s.uses_metastore_backend and not s.airflow_custom_backend


def test_a_custom_airflow_backend_is_not_imported_and_means_skip(home: Path) -> None:
    write_cfg(home / "airflow.cfg", state_store={"backend": "company.state.RedisBackend"})
    s = Settings.from_env({"AIRFLOW_HOME": str(home)})
    assert s.airflow_custom_backend and not s.uses_metastore_backend
    assert s.state_backend == "company.state.RedisBackend"


def test_statesweep_state_backend_overrides_airflows(home: Path) -> None:
    write_cfg(home / "airflow.cfg", state_store={"backend": "company.state.RedisBackend"})
    s = Settings.from_env({"AIRFLOW_HOME": str(home),
                           "STATESWEEP_STATE_BACKEND": "workers.store.MetastoreStateBackend"})
    assert s.uses_metastore_backend and not s.airflow_custom_backend
    with pytest.raises(SettingsError, match="STATESWEEP_STATE_BACKEND='company.Nope'"):
        Settings.from_env({"AIRFLOW_HOME": str(home), "STATESWEEP_STATE_BACKEND": "company.Nope"})


def test_bad_values_in_airflow_cfg_are_named_by_file_and_key(home: Path) -> None:
    write_cfg(home / "airflow.cfg", state_store={"state_cleanup_batch_size": "lots"},
              database={"sql_alchemy_conn": f"mssql+pyodbc://sa:{SECRET}@h/airflow"})
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"AIRFLOW_HOME": str(home)})
    msg = str(err.value)
    assert "[state_store] state_cleanup_batch_size='lots': must be a whole number" in msg
    assert "[database] sql_alchemy_conn='mssql+pyodbc://sa:***@h/airflow': scheme 'mssql'" in msg
    assert SECRET not in msg
