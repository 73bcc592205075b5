"""Adaptive chunk size: follows throughput to the target, grows at most 1.2x a step, halves at
once on a lock timeout or a chunk over twice the target, and never leaves its bounds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.flow.sizing import ChunkTiming, SizingPolicy

POLICY = SizingPolicy.for_batch_size(10_000, target_seconds=2.0)


def test_default_bounds_are_a_tenth_to_ten_times_the_batch_size() -> None:
    assert (POLICY.minimum, POLICY.maximum) == (1_000, 100_000)
    assert SizingPolicy.for_batch_size(5, 1.0).minimum == 1


@pytest.mark.parametrize("batch_size", [0, -1])
def test_a_batch_size_with_nothing_to_adapt_is_refused(batch_size: int) -> None:
    with pytest.raises(ValueError, match="positive batch size"):
        SizingPolicy.for_batch_size(batch_size, 2.0)


@pytest.mark.parametrize("target", [0, -1.0, float("nan")])
def test_a_target_that_is_not_positive_is_refused(target: float) -> None:
    with pytest.raises(ValueError, match="target_seconds"):
        SizingPolicy(target, 1, 10)


def test_no_measurement_keeps_the_current_size() -> None:
    assert POLICY.next_size(10_000, []) == 10_000


def test_fast_chunks_grow_by_at_most_1_2x_a_step_towards_the_target() -> None:
    # 10k rows in 0.5 s: 20k rows/s, so 40k rows would take the 2 s target.
    recent = [ChunkTiming(10_000, 0.5)]
    sizes = [10_000]
    for _ in range(10):
        sizes.append(POLICY.next_size(sizes[-1], recent))
    assert sizes[1] == 12_000
    assert all(b <= a * 1.2 for a, b in zip(sizes, sizes[1:], strict=False))
    assert sizes[-1] == 40_000


def test_slow_chunks_shrink_to_the_ideal_in_one_step() -> None:
    # 10k rows in 4 s (not over twice the 2 s target): 2.5k rows/s -> 5k rows per 2 s.
    assert POLICY.next_size(10_000, [ChunkTiming(10_000, 4.0)]) == 5_000


def test_a_chunk_over_twice_the_target_halves_at_once() -> None:
    assert POLICY.next_size(10_000, [ChunkTiming(10_000, 4.1)]) == 5_000
    # Much slower still: halving, not the estimate (which would say 10k*2/40 = 500 -> 1000).
    assert POLICY.next_size(10_000, [ChunkTiming(10_000, 40.0)]) == 5_000


def test_a_lock_timeout_halves_at_once_and_carries_no_throughput() -> None:
    recent = [ChunkTiming(10_000, 1.0), ChunkTiming(10_000, 5.0, lock_timeout=True)]
    assert POLICY.next_size(10_000, recent) == 5_000
    assert POLICY.throughput(recent) == 10_000


def test_in_flight_chunks_of_one_oversized_generation_halve_only_once() -> None:
    size = 20_000
    recent: list[ChunkTiming] = []
    for _ in range(3):  # three chunks of 20k sent before the first came back slow
        recent.append(ChunkTiming(20_000, 10.0))
        size = POLICY.next_size(size, recent)
    assert size == 10_000


def test_throughput_is_over_the_last_window_only() -> None:
    old = [ChunkTiming(10_000, 10.0)] * 10
    new = [ChunkTiming(10_000, 1.0)] * POLICY.window
    assert POLICY.throughput(old + new) == 10_000


def test_a_chunk_timed_at_zero_seconds_grows_by_the_cap_not_to_infinity() -> None:
    assert POLICY.next_size(10_000, [ChunkTiming(10_000, 0.0)]) == 12_000


def test_a_size_of_one_can_still_grow() -> None:
    tiny = SizingPolicy(1.0, 1, 100)
    assert tiny.next_size(1, [ChunkTiming(1, 0.01)]) == 2


timings = st.lists(
    st.builds(ChunkTiming,
              size=st.integers(min_value=1, max_value=1_000_000),
              seconds=st.floats(min_value=0, max_value=1_000, allow_nan=False),
              lock_timeout=st.booleans()),
    max_size=12,
)


@given(batch=st.integers(min_value=1, max_value=1_000_000),
       target=st.floats(min_value=0.01, max_value=600),
       current=st.integers(min_value=-10, max_value=100_000_000),
       recent=timings)
def test_next_size_stays_in_bounds_and_grows_at_most_1_2x(
        batch: int, target: float, current: int, recent: list[ChunkTiming]) -> None:
    policy = SizingPolicy.for_batch_size(batch, target)
    new = policy.next_size(current, recent)
    assert policy.minimum <= new <= policy.maximum
    start = policy.clamp(current)
    assert new <= max(start * 1.2, start + 1)
    if recent and policy.must_halve(recent[-1]):
        # Never bigger than half the bad chunk (unless held up by the lower bound), never
        # bigger than before.
        assert new <= max(policy.minimum, recent[-1].size // 2)
        assert new <= start
