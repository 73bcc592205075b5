"""db-clean's chunk size from time (workers.dbclean.run.next_size), decided from timings the test
gives: a slow table's chunks shrink, a fast one's stay at the batch size and never pass it. And
the run store keeps each table's timings and its longest transaction (StoreSizes)."""

from __future__ import annotations

from tests.services import unique
from workers.dbclean import run
from workers.dbclean.distributed import StoreSizes, even_chunk
from workers.dbclean.store import DbCleanStore
from workers.runs import registry_for


def timing(rows: int, ms: float, planned: int | None = None,
           lock_timeout: bool = False) -> run.Timing:
    return run.Timing(planned if planned is not None else rows, rows, ms / 1000, lock_timeout)


def test_nothing_timed_yet_is_a_twentieth_of_the_batch_size() -> None:
    assert run.next_size(10_000, 200, []) == 500
    assert run.next_size(5, 200, []) == 1


def test_a_transaction_over_the_target_halves_the_next() -> None:
    # task_instance: 10k rows whose per-row cascade triggers took 320 ms.
    assert run.next_size(10_000, 200, [timing(10_000, 320)]) == 5_000


def test_a_slow_table_settles_where_a_transaction_takes_half_the_target() -> None:
    # 32 ms per thousand rows: 100 ms (half of 200) is 3,125 rows.
    recent: list[run.Timing] = []
    size = 10_000
    for _ in range(20):
        recent.append(timing(size, size * 0.032))
        size = run.next_size(10_000, 200, recent)
    assert 3_000 <= size <= 3_125


def test_a_fast_table_grows_to_the_batch_size_and_never_passes_it() -> None:
    # log: 10k rows in 20 ms would allow 50k per 100 ms; the batch size is the bound.
    recent = [timing(10_000, 20)] * 5
    assert run.next_size(10_000, 200, recent) == 10_000
    recent, size = [], run.next_size(10_000, 200, [])
    for _ in range(17):  # from a twentieth, a fifth more per chunk
        recent.append(timing(size, size * 0.002))
        size = run.next_size(10_000, 200, recent)
    assert size == 10_000
    assert run.next_size(10_000, 200, [timing(100, 0.01, planned=10_000)]) == 10_000


def test_a_shrunk_table_grows_back_at_most_a_fifth_per_chunk() -> None:
    recent = [timing(2_000, 2)]  # fast again
    assert run.next_size(10_000, 200, recent) == 2_400


def test_growth_is_from_the_size_cut_not_from_the_rows_found() -> None:
    # The last chunk was cut for 4,000 rows and found 3,000 (the rest gone): fast per row, and
    # the next grows from 4,000, not from 3,000.
    assert run.next_size(10_000, 200, [timing(3_000, 3, planned=4_000)]) == 4_800


def test_a_transaction_that_found_few_of_its_rows_is_no_evidence() -> None:
    assert not run.is_evidence(timing(30, 2_000, planned=10_000))
    assert not run.is_evidence(timing(0, 5, planned=10_000))
    assert run.is_evidence(timing(5_000, 2_000, planned=10_000))
    assert run.is_evidence(timing(0, 5_000, planned=10_000, lock_timeout=True))


def test_a_lock_timeout_halves_from_the_size_that_waited() -> None:
    assert run.next_size(10_000, 200, [timing(0, 5_000, planned=8_000,
                                              lock_timeout=True)]) == 4_000


def test_never_below_a_hundredth_of_the_batch_size() -> None:
    assert run.next_size(10_000, 200, [timing(10_000, 60_000)]) == 5_000
    assert run.next_size(10_000, 200, [timing(200, 60_000)] * 5) == 100


def test_batch_size_zero_is_one_chunk_whatever_the_time() -> None:
    assert run.next_size(0, 200, [timing(1_000_000, 60_000)]) == 0


def test_local_sizes_keep_the_last_five_and_each_tables_longest() -> None:
    sizes = run.Sizes(1_000, 200)
    for ms in (50, 20, 30, 40, 60, 70, 900):
        sizes.note("task_instance", timing(1_000, ms))
    sizes.note("log", timing(0, 5))  # found nothing: not evidence, but still a transaction
    # A dependant batch sized 1,000 that found 30 rows left, after scanning for 2 s: the time
    # of its search, not of its rows; the size stays.
    sizes.note("xcom", timing(30, 2_000, planned=1_000))
    assert len(sizes.recent["task_instance"]) == 5
    assert sizes.longest_ms == {"task_instance": 900.0, "log": 5.0, "xcom": 2_000.0}
    assert sizes.size("log") == 50 and sizes.size("xcom") == 50  # nothing timed: a twentieth
    assert sizes.size("task_instance") == 500  # the last took 900 ms: halved


def test_the_run_store_keeps_each_tables_timings_and_longest() -> None:
    store = DbCleanStore(registry_for("memory://", f"sw:{unique('t')}"))
    a = StoreSizes(store, "r1", 10_000, 200)
    b = StoreSizes(store, "r1", 10_000, 200)  # another worker's view of the same run
    assert a.size("task_instance") == 500  # nothing timed yet
    a.note("task_instance", timing(10_000, 320))
    assert b.size("task_instance") == 5_000
    for _ in range(7):
        b.note("task_instance", timing(5_000, 160))
    b.note("task_instance", timing(0, 3, planned=1))  # moved nothing: not evidence
    assert len(a.recent("task_instance")) == run.SIZING_WINDOW
    assert a.size("task_instance") == 3_125
    assert a.size("log") == 500
    entry = store.table("r1", "task_instance")
    assert float(entry["longest_ms"]) == 320.0
    assert int(entry["transactions"]) == 9 and entry["size"] == "1"


def test_a_tables_chunks_are_as_few_as_the_batch_size_allows_and_even() -> None:
    """14,690 rows at --batch-size 10,000 are two chunks of 7,345, not 10,000 and 4,690; a
    table that fits one chunk, an unknown count (0) and --batch-size 0 keep the batch size."""
    assert even_chunk(10_000, 14_690) == 7_345
    assert even_chunk(10_000, 91_884) == 9_189  # ten chunks, the last 9,183
    assert even_chunk(10_000, 20_000) == 10_000
    assert even_chunk(10_000, 20_001) == 6_667
    assert even_chunk(10_000, 9_000) == 10_000
    assert even_chunk(10_000, 0) == 10_000
    assert even_chunk(0, 14_690) == 0
    for eligible in range(1, 2_000, 7):
        size = even_chunk(100, eligible)
        chunks = -(-eligible // size)
        assert size <= 100 and chunks == -(-eligible // 100)


def test_the_dependants_last_pass_goes_in_windows_of_eight_forward_batches() -> None:
    """Up to the last root a forward batch ended on, eight batches' roots a window (each
    window one search, a transaction), the last window what is left; none without a batch."""
    marks = [(i,) for i in range(1, 21)]
    assert run.last_pass_windows(marks) == [(None, (8,)), ((8,), (16,)), ((16,), (20,))]
    assert run.last_pass_windows(marks[:8]) == [(None, (8,))]
    assert run.last_pass_windows(marks[:9]) == [(None, (8,)), ((8,), (9,))]
    assert run.last_pass_windows([(1,)]) == [(None, (1,))]
    assert run.last_pass_windows([]) == []
    assert run.last_pass_windows(marks, per=1)[:2] == [(None, (1,)), ((1,), (2,))]
