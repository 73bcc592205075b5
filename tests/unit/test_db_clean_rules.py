"""Airflow's db clean rules as statesweep keeps them (workers/dbclean/rules.py): which tables,
in which order, what --tables accepts. No database."""

from __future__ import annotations

import pytest

from workers.dbclean.rules import RULES, effective_tables, parse_tables
from workers.exceptions import InvalidArgument


def names(version: str, tables: tuple[str, ...] = ()) -> list[str]:
    return [r.table for r in effective_tables(version, tables)]


@pytest.mark.parametrize("version", ["3.3", "3.4"])
def test_every_dependant_is_cleaned_before_its_table(version: str) -> None:
    order = names(version)
    for rule in effective_tables(version):
        for dep in rule.dependants:
            assert order.index(dep) < order.index(rule.table), (dep, rule.table)
    assert len(order) == len(set(order))


@pytest.mark.parametrize("version", ["3.3", "3.4"])
def test_dag_run_goes_before_the_tables_its_cascade_frees(version: str) -> None:
    order = names(version)
    assert order.index("dag_run") < order.index("callback")
    assert order.index("dag_run") < order.index("partitioned_asset_key_log")
    # ...but naming callback alone does not pull dag_run in.
    assert names(version, ("callback",)) == ["deadline", "callback"]


def test_tables_bring_their_dependants_and_nothing_else() -> None:
    assert names("3.3", ("dag_run",)) == ["task_instance_history", "xcom", "task_instance",
                                         "task_state_store", "deadline", "dag_run"]
    assert names("3.3", ("log",)) == ["log"]


def test_34_splits_xcom_and_cleans_task_instance_history_only_when_named() -> None:
    assert names("3.4", ("xcom",)) == ["xcom_v1", "xcom_v2"]
    assert "task_instance_history" not in names("3.4")
    assert names("3.4", ("task_instance_history",)) == ["task_instance_history"]
    assert "xcom" in RULES["3.3"] and "xcom" not in RULES["3.4"]


def test_keep_last_is_dag_runs_newest_non_manual_and_dag_versions_newest() -> None:
    for version in ("3.3", "3.4"):
        dag_run, dag_version = RULES[version]["dag_run"], RULES[version]["dag_version"]
        assert dag_run.keep_last and dag_run.keep_last_filters == ("not_manual",)
        assert dag_run.keep_last_group_by == ("dag_id",)
        assert dag_version.keep_last and not dag_version.keep_last_filters
        assert dag_version.skip_if_referenced == (("task_instance", "dag_version_id"),)


def test_an_unknown_table_names_itself_and_the_choices() -> None:
    with pytest.raises(InvalidArgument) as err:
        effective_tables("3.3", ("log", "nosuch"))
    message = str(err.value)
    assert message.startswith("--tables: unknown table 'nosuch'") and "dag_run" in message
    assert "\n" not in message
    with pytest.raises(InvalidArgument, match="xcom_v2"):
        effective_tables("3.3", ("xcom_v2",))  # 3.4's name on 3.3


def test_tables_option_is_comma_separated() -> None:
    assert parse_tables("log, job,") == ("log", "job")
    assert parse_tables(None) == ()
    with pytest.raises(InvalidArgument, match="--tables"):
        parse_tables(" , ")
