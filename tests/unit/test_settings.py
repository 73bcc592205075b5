"""Settings: defaults, Airflow fallbacks, and one clear error per invalid variable."""

from __future__ import annotations

import pytest

from workers.exceptions import SettingsError
from workers.settings import Settings, mask_url


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.default_retention_days == 30
    assert s.cleanup_batch_size == 10000
    assert s.table_naming == "auto"
    assert s.database_url.startswith("sqlite:")


def test_airflow_fallbacks_apply_only_when_statesweep_unset() -> None:
    env = {"AIRFLOW__STATE_STORE__DEFAULT_RETENTION_DAYS": "7",
           "AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE": "500"}
    s = Settings.from_env(env)
    assert (s.default_retention_days, s.cleanup_batch_size) == (7, 500)
    env["STATESWEEP_CLEANUP_BATCH_SIZE"] = "42"
    assert Settings.from_env(env).cleanup_batch_size == 42


@pytest.mark.parametrize(("var", "value", "needle"), [
    ("STATESWEEP_DEFAULT_RETENTION_DAYS", "-1", "must not be negative"),
    ("STATESWEEP_DEFAULT_RETENTION_DAYS", "ten", "whole number"),
    ("STATESWEEP_CLEANUP_BATCH_SIZE", "-5", "must not be negative"),
    ("STATESWEEP_CLEANUP_BATCH_SIZE", "1.5", "whole number"),
    ("STATESWEEP_CLEANUP_BATCH_SIZE", "", "whole number"),
    ("AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE", "-1", "must not be negative"),
    ("AIRFLOW__STATE_STORE__DEFAULT_RETENTION_DAYS", "x", "whole number"),
    ("STATESWEEP_DATABASE_URL", "not a url", "not a database URL"),
    ("STATESWEEP_DATABASE_URL", "", "must not be empty"),
    ("STATESWEEP_DATABASE_URL", "postgresql://u@db:port/x", "not a database URL"),
    ("STATESWEEP_DATABASE_URL", "oracle://u@h/d", "scheme 'oracle' is not supported"),
    ("STATESWEEP_BROKER_URL", "localhost", "not a URL"),
    ("STATESWEEP_RESULT_BACKEND", "redis://h:notaport/0", "not a URL"),
    ("STATESWEEP_TABLE_NAMING", "weird", "must be one of auto, seed, airflow"),
    ("STATESWEEP_STATE_BACKEND", "no.such.module.Backend", "cannot be imported"),
    ("STATESWEEP_STATE_BACKEND", "workers.store.NoSuchClass", "cannot be imported"),
    ("STATESWEEP_COORDINATOR_SCHEDULE", "every now and then", "crontab"),
    ("STATESWEEP_ORPHAN_SCHEDULE", "-3", "positive"),
    ("STATESWEEP_CHUNK_QUEUE", "statesweep.control", "must differ"),
    ("STATESWEEP_VISIBILITY_TIMEOUT", "50", "at least twice"),
    ("STATESWEEP_LOG_FORMAT", "xml", "must be one of"),
    ("STATESWEEP_CHUNK_RATE_LIMIT", "fast", "must be a positive rate like 20/s"),
    ("STATESWEEP_CHUNK_RATE_LIMIT", "20/d", "must be a positive rate like 20/s"),
])
def test_each_invalid_setting_names_variable_and_value(var: str, value: str, needle: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({var: value})
    msg = str(err.value)
    assert var in msg
    assert repr(value) in msg
    assert needle in msg


def test_errors_are_collected_into_one() -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"STATESWEEP_CLEANUP_BATCH_SIZE": "-1",
                           "STATESWEEP_DEFAULT_RETENTION_DAYS": "x"})
    assert "CLEANUP_BATCH_SIZE" in str(err.value) and "RETENTION_DAYS" in str(err.value)


def test_passwords_are_masked_in_repr_and_errors() -> None:
    s = Settings.from_env({"STATESWEEP_DATABASE_URL": "postgresql://u:hunter2@db/airflow",
                           "STATESWEEP_BROKER_URL": "redis://:s3cret@redis:6379/0"})
    text = repr(s) + str(s) + str(s.masked())
    assert "hunter2" not in text and "s3cret" not in text
    assert "postgresql://u:***@db/airflow" in text
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"STATESWEEP_DATABASE_URL": "postgresql://u:hunter2@db:port/x"})
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(("url", "masked"), [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("amqp://guest:guest@rabbit//", "amqp://guest:***@rabbit//"),
    ("sqlite:///x.db", "sqlite:///x.db"),
    ("postgresql://u:p@h:bad/x", "postgresql://u:***@h:bad/x"),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize("value", ["10", "59"])
def test_run_timeout_below_a_minute_is_refused(value: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"STATESWEEP_RUN_TIMEOUT_SECONDS": value})
    assert "STATESWEEP_RUN_TIMEOUT_SECONDS" in str(err.value) and repr(value) in str(err.value)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e309", "NaN", "Infinity"])
@pytest.mark.parametrize("var", ["STATESWEEP_COORDINATOR_SCHEDULE", "STATESWEEP_ORPHAN_SCHEDULE"])
def test_schedule_nan_inf_and_overflow_are_settings_errors(var: str, value: str) -> None:
    """Issue: these parsed as floats and passed; inf then crashed beat with OverflowError."""
    with pytest.raises(SettingsError) as err:
        Settings.from_env({var: value})
    assert f"{var}={value!r}" in str(err.value)
    assert "finite" in str(err.value)


def test_a_schedule_beyond_what_beat_can_hold_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="at most 31622400 seconds"):
        Settings.from_env({"STATESWEEP_COORDINATOR_SCHEDULE": "1e300"})
    assert Settings.from_env({"STATESWEEP_COORDINATOR_SCHEDULE": "86400"})


@pytest.mark.parametrize(("typo", "meant"), [
    ("STATESWEEP_BATCH_SIZE", "STATESWEEP_CLEANUP_BATCH_SIZE"),
    ("STATESWEEP_DATABASE_URI", "STATESWEEP_DATABASE_URL"),
    ("STATESWEEP_RETENTION_DAYS", "STATESWEEP_DEFAULT_RETENTION_DAYS"),
    ("STATESWEEP_LOGLEVEL", "STATESWEEP_LOG_LEVEL"),
])
def test_unknown_statesweep_variable_is_named_with_the_closest_known_name(
        typo: str, meant: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({typo: "500"})
    assert f"{typo}: is not a statesweep setting; did you mean {meant}?" in str(err.value)


def test_unknown_statesweep_variable_without_a_close_name_is_still_an_error() -> None:
    with pytest.raises(SettingsError, match="STATESWEEP_ZZZ: is not a statesweep setting$"):
        Settings.from_env({"STATESWEEP_ZZZ": "1"})


@pytest.mark.parametrize("name", ["STATESWEEP_TEST_PG_URL", "STATESWEEP_TEST_MARIADB_URL",
                                  "STATESWEEP_TEST_REDIS_URL", "STATESWEEP_BENCH_PG_URL",
                                  "STATESWEEP_BENCH_REDIS_URL", "STATESWEEP_RELIABILITY_REPORT"])
def test_the_suites_own_statesweep_variables_are_not_settings_errors(name: str) -> None:
    assert Settings.from_env({name: "x"}).database_url == Settings().database_url


def test_every_statesweep_name_the_repository_sets_is_a_setting_or_allowed() -> None:
    """The allow-list is what the repository itself uses: tests, bench, compose, docs."""
    import re
    from pathlib import Path

    from workers.settings import ENV_VARS, NON_SETTING_PATTERNS

    root = Path(__file__).resolve().parents[2]
    texts = [p.read_text(errors="replace") for pattern in
             ("tests/**/*.py", "bench/**/*.py", "*.yml", "*.md", ".env.example", "Makefile")
             for p in root.glob(pattern) if p.name != "test_settings.py"]
    text = "\n".join(texts)
    # Whole names only: the README's `STATESWEEP_TEST_*` is a pattern, not a name.
    names = {m.group(0) for m in re.finditer(r"STATESWEEP_[A-Z0-9_]*[A-Z0-9]", text)
             if not text.startswith("_*", m.end())}
    names -= {"STATESWEEP_DATABASE_URI", "STATESWEEP_BATCH_SIZE"}  # typos tests make on purpose
    unknown = {n for n in names if n not in ENV_VARS
               and not any(p.fullmatch(n) for p in NON_SETTING_PATTERNS)}
    assert len(names) > 20 and unknown == set()


def test_a_rate_limit_the_window_cannot_wait_out_inside_the_soft_limit_is_refused() -> None:
    """A chunk waits for its rate-limit slot inside its task: a full window at 1/s would make
    the 64th chunk wait 64 s and hit the 25 s soft time limit, failing instead of running."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"STATESWEEP_CHUNK_RATE_LIMIT": "1/s",
                           "STATESWEEP_MAX_CHUNKS_IN_FLIGHT": "64"})
    assert "STATESWEEP_CHUNK_RATE_LIMIT='1/s'" in str(info.value)
    assert "could wait 64 s" in str(info.value)
    ok = Settings.from_env({"STATESWEEP_CHUNK_RATE_LIMIT": "1/s",
                            "STATESWEEP_MAX_CHUNKS_IN_FLIGHT": "8"})
    assert ok.chunk_rate_per_second == 1.0


@pytest.mark.parametrize("query", ["", "?connect_timeout=5"])
def test_a_missing_database_driver_is_named_with_its_install_line(
        query: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without query options the driver is only looked up (not imported: the CLI starts
    faster); with them it is imported to check them. Either way a missing one is named."""
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pymysql" else real(name, *a))
    monkeypatch.setitem(sys.modules, "pymysql", None)  # importing it raises ImportError
    url = f"mysql+pymysql://u:secret@db/airflow{query}"
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"STATESWEEP_DATABASE_URL": url})
    assert "STATESWEEP_DATABASE_URL" in str(err.value)
    assert "needs PyMySQL" in str(err.value) and "pip install 'statesweep[mysql]'" in str(err.value)
    assert "secret" not in str(err.value)
    # An installed driver passes the same check.
    assert Settings.from_env({"STATESWEEP_DATABASE_URL": f"postgresql://u@db/airflow{query}"})
