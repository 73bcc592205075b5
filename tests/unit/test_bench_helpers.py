"""The benchmark's pure helpers: method names, throttle settings, data mixes, result names, the
rate buckets and the targets' verdicts (benchmarks themselves never run in the test suite)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.methods import plan_ranges
from bench.names import (
    EXPIRED_MIXES,
    parse_methods,
    parse_throttle,
    results_stem,
    seed_spec,
    sql_chunk_threads,
)
from bench.rate import buckets, summarise
from bench.targets import add_ratios, check_targets
from workers.planners import ChunkRange, Plan
from workers.seed import kind_of


def test_method_names_parse_to_planner_workers_and_throttle() -> None:
    methods = parse_methods(["single", "statesweep_2w", "statesweep_walk_1w",
                             "statesweep_throttled_2w"], ["0.02:1", "0.05:2"])
    assert [(m.name, m.workers, m.planner, m.throttle) for m in methods] == [
        ("single", 0, "auto", None), ("statesweep_2w", 2, "auto", None),
        ("statesweep_walk_1w", 1, "walk", None),
        ("statesweep_throttled_2w[0.02:1]", 2, "auto", (0.02, 1)),
        ("statesweep_throttled_2w[0.05:2]", 2, "auto", (0.05, 2))]
    assert methods[2].env() == {"STATESWEEP_PLANNER": "walk"}
    assert methods[4].env() == {"STATESWEEP_PLANNER": "auto",
                                "STATESWEEP_TARGET_CHUNK_SECONDS": "0.05",
                                "STATESWEEP_MAX_CHUNKS_IN_FLIGHT": "2"}


def test_sql_chunks_baseline_and_solo_pool_parse() -> None:
    methods = parse_methods(["sql_chunks_2t", "statesweep_solo_2w", "statesweep_1w"], [])
    assert [(m.name, m.workers, m.pool, m.is_sweep) for m in methods] == [
        ("sql_chunks_2t", 0, "prefork", False), ("statesweep_solo_2w", 2, "solo", True),
        ("statesweep_1w", 1, "prefork", True)]
    assert sql_chunk_threads("sql_chunks_12t") == 12
    assert sql_chunk_threads("sql_chunks_0t") == sql_chunk_threads("single") == 0


def test_unprotected_method_turns_protection_off_and_run_state_names_the_results() -> None:
    on, off = parse_methods(["statesweep_2w", "statesweep_unprotected_2w"], [])
    assert (on.protect, off.protect, off.workers, off.planner) == (True, False, 2, "auto")
    assert "STATESWEEP_PROTECT_UNFINISHED_DAG_RUNS" not in on.env()
    assert off.env()["STATESWEEP_PROTECT_UNFINISHED_DAG_RUNS"] == "false"
    assert results_stem(1_000_000, 10_000, None, "", True) == "rows_1000000_run_state"


def test_noevents_method_turns_the_chunk_task_events_off() -> None:
    on, off = parse_methods(["statesweep_2w", "statesweep_noevents_2w"], [])
    assert (on.events, off.events, off.workers, off.planner, off.protect) == (
        True, False, 2, "auto", True)
    assert "STATESWEEP_CHUNK_TASK_EVENTS" not in on.env()
    assert off.env()["STATESWEEP_CHUNK_TASK_EVENTS"] == "false"


def test_sql_chunks_plan_ranges_cover_the_plan_once_and_leave_the_last_open() -> None:
    plan = Plan("blocks", "blocks", 0, 10, 4, 0, "")
    assert list(plan_ranges(plan)) == [ChunkRange("blocks", 0, 4), ChunkRange("blocks", 4, 8),
                                       ChunkRange("blocks", 8, None)]
    assert list(plan_ranges(Plan("blocks", "blocks", 0, 8, 4, 0, ""))) == [
        ChunkRange("blocks", 0, 4), ChunkRange("blocks", 4, None)]
    assert list(plan_ranges(Plan("blocks", "blocks", 0, 0, 4, 0, ""))) == []


def test_throttle_alone_adds_the_throttled_method() -> None:
    assert [m.name for m in parse_methods(["single"], ["0.1:3"])] == [
        "single", "statesweep_throttled_2w[0.1:3]"]


@pytest.mark.parametrize("names", [["statesweep_bogus_2w"], ["statesweep_0w"], ["fast"],
                                   ["single", "single"], ["sql_chunks_0t"], ["sql_chunks_2w"]])
def test_bad_method_names_are_named(names: list[str]) -> None:
    with pytest.raises(ValueError, match=repr(names[-1])):
        parse_methods(names, [])


@pytest.mark.parametrize("text", ["1", "0:2", "0.05:0", "x:y", "0.05:"])
def test_bad_throttle_is_named(text: str) -> None:
    with pytest.raises(ValueError, match="--throttle") as err:
        parse_throttle(text)
    assert repr(text) in str(err.value)


@pytest.mark.parametrize("percent", sorted(EXPIRED_MIXES))
def test_expired_percent_mixes_give_that_share(percent: int) -> None:
    spec = seed_spec(10_000, percent)
    kinds = [kind_of(i, spec) for i in range(spec.rows)]
    assert kinds.count("expired") == spec.rows * percent // 100
    assert results_stem(5_000_000, 10_000, percent) == f"rows_5000000_exp_{percent}"


def test_default_mix_and_names_are_unchanged() -> None:
    assert seed_spec(1000, None).period == 20
    assert results_stem(1000, 10_000, None) == "rows_1000"
    assert results_stem(1000, 500, 1) == "rows_1000_batch_500_exp_1"
    assert results_stem(5_000_000, 10_000, None, "10/s") == "rows_5000000_rate_10s"


def test_rate_buckets_count_full_buckets_only() -> None:
    starts = [i / 10 for i in range(401)]  # 10/s for 40 s
    assert buckets(starts) == [10.0] * 8
    summary = summarise(starts, 10.0)
    assert summary["holds"] and summary["bucket_min"] == summary["bucket_max"] == 10.0
    # 10/s for 5 s, then 1/s: the burst-then-crawl of Celery's token bucket is a miss.
    crawl = [i / 10 for i in range(50)] + [5 + i for i in range(35)]
    assert not summarise(crawl, 10.0)["holds"]
    assert min(buckets(crawl)) == 1.0


def _method(name: str, rows_s: float, workers: int = 0, cpu: float = 1.0,
            throttle: list[float] | None = None, planner: str = "auto") -> dict[str, Any]:
    detail = ({"planning_ms": 20.0, "dispatched_ms": 10.0, "dispatched_chunks": 16,
               "first_delete_ms": 12.0, "planner": "blocks", "coordinator_rss_peak_mib": 86.0,
               "coordinator_rss_baseline_mib": 86.0} if workers else {})
    return {"name": name, "workers": workers, "planner_setting": planner, "throttle": throttle,
            "rows": 1_000_000, "seconds": 1e6 / rows_s, "rows_per_second": rows_s,
            "cpu_s_per_million": cpu, "longest_txn_ms": 40.0, "sampled_longest_ms": 30.0,
            "writer": {"p99_ms": 3.0}, "detail": detail}


def _results(*methods: dict[str, Any]) -> dict[str, Any]:
    results = {"meta": {"rows": 1_000_000, "batch": 10_000, "expired_percent": None},
               "dataset": {"expired": 500_000}, "writer_idle": {"p99_ms": 2.0},
               "methods": list(methods)}
    add_ratios(results)
    return results


def test_targets_hold_and_miss_by_how_much() -> None:
    results = _results(_method("single", 1_000_000, cpu=2.0),
                       _method("upstream", 100_000, cpu=10.0),
                       _method("statesweep_1w", 700_000, 1, cpu=2.4),
                       _method("statesweep_2w", 900_000, 2, cpu=3.0),
                       _method("statesweep_throttled_2w[0.05:2]", 600_000, 2, cpu=2.0,
                               throttle=[0.05, 2]))
    verdict = {t["target"]: t for t in check_targets(results)}
    speed = verdict["statesweep 2 workers >= 1.0x single"]
    assert not speed["holds"] and "short by 10%" in speed["note"]
    assert verdict["statesweep_2w not slower than statesweep_1w"]["holds"]
    assert verdict["statesweep_1w CPU per expired row <= 1.3x single's"]["holds"]
    cpu = verdict["statesweep_2w CPU per expired row <= 1.3x single's"]
    assert not cpu["holds"] and "over by 15%" in cpu["note"]
    assert verdict["statesweep_2w planning <= 5% of wall"]["holds"]
    assert verdict["statesweep_2w first chunk dispatched <= 50 ms"]["holds"]
    assert verdict["longest statesweep transaction <= 100 ms"]["holds"]
    throttled = verdict["statesweep_throttled_2w[0.05:2]: writer p99 <= 2x idle at >= 5x upstream"]
    assert throttled["holds"] and "6.0x upstream" in throttled["measured"]


def test_sparse_target_compares_auto_with_walk_only_at_one_percent() -> None:
    methods = [_method("statesweep_2w", 50_000, 2),
               _method("statesweep_walk_2w", 60_000, 2, planner="walk")]
    results = _results(*methods)
    assert not [t for t in check_targets(results) if t["target"].startswith("at 1%")]
    results["meta"]["expired_percent"] = 1
    sparse = [t for t in check_targets(results) if t["target"].startswith("at 1%")]
    assert len(sparse) == 1 and not sparse[0]["holds"]


def test_db_clean_compare_takes_statesweeps_own_longest_transaction() -> None:
    """The db-clean comparison quotes statesweep's own timing of every transaction (its JSON
    report, per table) beside the samplers': the longest, and its table."""
    from bench.dbclean_compare import own_longest

    report = {"tables": [{"table": "log", "longest_transaction_ms": 12.3},
                         {"table": "xcom", "longest_transaction_ms": 150.04},
                         {"table": "job", "longest_transaction_ms": 0.0}]}
    assert own_longest(report) == (150.0, "xcom")
    assert own_longest({"tables": []}) == (0.0, "")
