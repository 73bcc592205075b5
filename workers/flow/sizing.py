"""Adaptive chunk size (``STATESWEEP_TARGET_CHUNK_SECONDS``): size each next chunk from the
measured throughput of recent chunks so it takes about the target time.

The size is unit-agnostic: rows for id-range or batch planning, heap pages for block-range
planning. A measurement's ``size`` and the returned size are in the same unit, and throughput is
that unit per second, so the same policy drives either planner.

Rules, in order, applied to the chunk that just finished (the last of *recent*):

1. **Halve at once** after a lock timeout, or when a chunk took more than twice the target: the
   next size is half the size of that bad chunk (or the current size if that is smaller
   already). Halving from the bad chunk's size, not from the current one, means several
   in-flight chunks of one oversized generation coming back slow halve the size once, not once
   each.
2. Otherwise **follow the throughput** of the last ``window`` measured chunks (total size over
   total seconds, so a long chunk weighs as much as its time, and one noisy short chunk does
   not swing the estimate): ideal = throughput x target. Shrinking to the ideal happens in one
   step; growing is capped at ``max_growth`` (1.2x) of the current size per step, as GitLab's
   batched migrations do, so a burst of fast chunks on a cold cache cannot balloon the next one.
   Lock-timed-out chunks carry no throughput and are left out of the estimate.
3. **Clamp to the bounds.** By default ``[batch_size / 10, batch_size x 10]``: the configured
   batch size is the operator's statement of a sane transaction, so the policy may stray an
   order of magnitude either way but no further. Below a tenth, per-chunk overhead (a task
   message, a commit, the run store's bookkeeping: milliseconds) starts to dominate the delete;
   above ten times, one transaction holds its locks and writes its WAL in a burst the operator
   never agreed to, however fast the database looks at the moment.

Sizes of 1-4 units cannot grow by 1.2x in whole units, so a step of one unit is always allowed;
otherwise a size halved down to 1 would stay there for good.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Seconds a chunk is taken to have lasted at least: a chunk timed at 0 s (clock granularity)
#: would otherwise mean infinite throughput.
MIN_SECONDS = 0.001


@dataclass(frozen=True)
class ChunkTiming:
    """One finished chunk: its planned *size* (same unit as the policy's sizes), its wall time,
    and whether it failed on a lock timeout."""

    size: int
    seconds: float
    lock_timeout: bool = False


@dataclass(frozen=True)
class SizingPolicy:
    """How the next chunk is sized; see the module docstring for the rules."""

    target_seconds: float
    minimum: int
    maximum: int
    max_growth: float = 1.2
    window: int = 5

    def __post_init__(self) -> None:
        if not self.target_seconds > 0:
            raise ValueError(f"target_seconds must be positive, not {self.target_seconds!r}")
        if not 1 <= self.minimum <= self.maximum:
            raise ValueError(f"bounds must satisfy 1 <= minimum <= maximum, "
                             f"not [{self.minimum}, {self.maximum}]")
        if not self.max_growth > 1 or self.window < 1:
            raise ValueError("max_growth must be above 1 and window at least 1")

    @classmethod
    def for_batch_size(cls, batch_size: int, target_seconds: float) -> SizingPolicy:
        """The default bounds ``[batch_size // 10 (at least 1), batch_size * 10]``. A batch size
        of 0 ("one chunk for everything") has nothing to adapt, so it is refused."""
        if batch_size < 1:
            raise ValueError(f"adaptive sizing needs a positive batch size, not {batch_size!r}")
        return cls(target_seconds, max(1, batch_size // 10), batch_size * 10)

    def clamp(self, size: float) -> int:
        return int(min(self.maximum, max(self.minimum, size)))

    def must_halve(self, timing: ChunkTiming) -> bool:
        """A lock timeout, or a chunk over twice the target."""
        return timing.lock_timeout or timing.seconds > 2 * self.target_seconds

    def throughput(self, recent: Sequence[ChunkTiming]) -> float | None:
        """Units per second over the last ``window`` chunks that ran to the end; None if none."""
        measured = [t for t in recent if not t.lock_timeout][-self.window:]
        if not measured:
            return None
        seconds = sum(max(MIN_SECONDS, t.seconds) for t in measured)
        return sum(t.size for t in measured) / seconds

    def next_size(self, current: int, recent: Sequence[ChunkTiming]) -> int:
        """The size of the next chunk, given the *current* size and the finished chunks so far
        (oldest first; only the last ``window`` and the very last one matter)."""
        current = self.clamp(current)
        if not recent:
            return current
        last = recent[-1]
        if self.must_halve(last):
            return self.clamp(min(current, last.size // 2))
        rate = self.throughput(recent)
        if rate is None:
            return current
        ideal = rate * self.target_seconds
        ceiling = max(math.floor(current * self.max_growth), current + 1)
        return self.clamp(min(ideal, ceiling))
