"""Airflow's db clean rules as statesweep keeps them (workers/dbclean/rules.py): which tables,
in which order, what --tables accepts. No database."""

from __future__ import annotations

import pytest

from workers.dbclean.rules import (
    RULES,
    TableRule,
    cascade_archived,
    effective_tables,
    parse_tables,
)
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


def _rule(version: str, table: str, tables: tuple[str, ...] = ()) -> TableRule:
    return {r.table: r for r in effective_tables(version, tables)}[table]


def test_34_cleans_xcom_v1_with_the_rows_xcom_v2_shadows_just_before_xcom_v2() -> None:
    for tables in ((), ("xcom",), ("task_instance",), ("dag_run",)):
        order = names("3.4", tables)
        assert order.index("xcom_v1") < order.index("xcom_v2"), tables
        rule = _rule("3.4", "xcom_v1", tables)
        assert rule.also == ("shadowed_by_xcom_v2",) and not rule.also_only
    # xcom_v2 alone brings xcom_v1 for its shadowed rows only; xcom_v1 alone keeps its own rule.
    assert names("3.4", ("xcom_v2",)) == ["xcom_v1", "xcom_v2"]
    assert _rule("3.4", "xcom_v1", ("xcom_v2",)).also_only
    assert not _rule("3.4", "xcom_v1", ("xcom_v1",)).also
    assert not RULES["3.4"]["xcom_v1"].also  # the table of rules itself is unchanged


def test_33_has_neither_of_34s_additions() -> None:
    assert not any(r.also for r in effective_tables("3.3"))
    assert names("3.3", ("xcom",)) == ["xcom"]
    assert cascade_archived("3.3", "task_instance") == cascade_archived("3.3", "dag_run") == set()


def test_34_archives_the_attempt_tables_a_task_instance_or_dag_run_cascades_to() -> None:
    attempt = {"legacy_task_data_owner", "xcom_v1", "xcom_v2", "rtif_v1", "rtif_v2",
               "task_instance_note", "task_reschedule", "hitl_detail"}
    assert cascade_archived("3.4", "task_instance") == attempt
    assert cascade_archived("3.4", "dag_run") == attempt | {"task_instance", "dynamic_region"}
    assert cascade_archived("3.4", "trigger") == set()
