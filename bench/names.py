"""What a method's name asks for, and the data mix an --expired-percent asks for.

``single`` / ``upstream``              the baselines (bench.methods)
``sql_chunks_<n>t``                    statesweep's plan and chunk statements on n threads of
                                       the bench process, no Celery/broker/run store
``statesweep_<n>w``                    statesweep on n chunk workers, STATESWEEP_PLANNER=auto
``statesweep_<planner>_<n>w``          the same with the planner forced (blocks, ids, walk,
                                       expiry)
``statesweep_solo_<n>w``               auto, the chunk workers on ``-P solo`` (no pool process)
``statesweep_throttled_<n>w``          auto, with STATESWEEP_TARGET_CHUNK_SECONDS and
                                       STATESWEEP_MAX_CHUNKS_IN_FLIGHT from one --throttle
                                       TARGET:WINDOW each; named ``…[TARGET:WINDOW]`` in results
``statesweep_unprotected_<n>w``        auto, with STATESWEEP_PROTECT_UNFINISHED_DAG_RUNS=false:
                                       beside ``statesweep_<n>w`` on data with dag_run.state
                                       (``--run-state``), the cost of protecting live runs
``statesweep_noevents_<n>w``           auto, with STATESWEEP_CHUNK_TASK_EVENTS=false: beside
                                       ``statesweep_<n>w``, what Flower's per-chunk task
                                       events cost the chunk workers
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workers.planners import PLANNERS
from workers.seed import SeedSpec

BASELINES = ("single", "upstream")
MODES = ("throttled", "solo", "unprotected", "noevents")
DEFAULT_METHODS = ("single", "upstream", "statesweep_1w", "statesweep_2w", "statesweep_walk_2w")
DEFAULT_THROTTLE = "0.05:2"
_SWEEP = re.compile(r"statesweep_(?:(?P<mode>[a-z]+)_)?(?P<workers>[1-9][0-9]?)w")
_SQL_CHUNKS = re.compile(r"sql_chunks_(?P<threads>[1-9][0-9]?)t")


def sql_chunk_threads(name: str) -> int:
    """Threads of a ``sql_chunks_<n>t`` baseline; 0 for any other name."""
    m = _SQL_CHUNKS.fullmatch(name)
    return int(m.group("threads")) if m else 0

#: --expired-percent -> (period, expired per period, never per period); None = the seed's mix.
#: 0.1 to 50 are the expired fractions bench.crossover measures the planners at.
EXPIRED_MIXES: dict[float, tuple[int, int, int]] = {
    0.1: (1000, 1, 100), 1: (100, 1, 10), 5: (20, 1, 2), 10: (20, 2, 2), 25: (20, 5, 2),
    50: (20, 10, 2), 90: (20, 18, 1)}


@dataclass(frozen=True)
class Method:
    name: str
    workers: int = 0  # 0: a baseline run from the bench process
    planner: str = "auto"
    #: (STATESWEEP_TARGET_CHUNK_SECONDS, STATESWEEP_MAX_CHUNKS_IN_FLIGHT) of a throttled method
    throttle: tuple[float, int] | None = None
    #: the chunk workers' Celery pool (``-P``)
    pool: str = "prefork"
    #: STATESWEEP_PROTECT_UNFINISHED_DAG_RUNS of the workers
    protect: bool = True
    #: STATESWEEP_CHUNK_TASK_EVENTS of the workers
    events: bool = True

    @property
    def is_sweep(self) -> bool:
        return self.workers > 0

    def env(self) -> dict[str, str]:
        """STATESWEEP_* this method's workers run with, on top of the bench's own."""
        out = {"STATESWEEP_PLANNER": self.planner}
        if self.throttle is not None:
            out["STATESWEEP_TARGET_CHUNK_SECONDS"] = f"{self.throttle[0]:g}"
            out["STATESWEEP_MAX_CHUNKS_IN_FLIGHT"] = str(self.throttle[1])
        if not self.protect:
            out["STATESWEEP_PROTECT_UNFINISHED_DAG_RUNS"] = "false"
        if not self.events:
            out["STATESWEEP_CHUNK_TASK_EVENTS"] = "false"
        return out


def parse_throttle(text: str) -> tuple[float, int]:
    """``TARGET:WINDOW`` (seconds per chunk, chunks in flight) -> (0.02, 1); ValueError names it."""
    target, sep, window = text.partition(":")
    try:
        seconds, chunks = float(target), int(window)
    except ValueError:
        seconds, chunks = 0.0, 0
    if not sep or seconds <= 0 or chunks < 1:
        raise ValueError(f"--throttle must be TARGET:WINDOW with TARGET seconds > 0 and WINDOW "
                         f"chunks >= 1, e.g. 0.05:2; got {text!r}")
    return seconds, chunks


def parse_methods(names: list[str], throttles: list[str]) -> list[Method]:
    """Methods to run, in order. A throttled name becomes one method per --throttle (the default
    setting when none is given); --throttle with no throttled name adds statesweep_throttled_2w.
    Raises ValueError naming the first name or setting that does not parse."""
    settings = [parse_throttle(t) for t in throttles] or [parse_throttle(DEFAULT_THROTTLE)]
    if throttles and not any(n.startswith("statesweep_throttled_") for n in names):
        names = [*names, "statesweep_throttled_2w"]
    out: list[Method] = []
    for name in names:
        if name in BASELINES or sql_chunk_threads(name):
            out.append(Method(name))
            continue
        m = _SWEEP.fullmatch(name)
        mode = m.group("mode") if m else None
        if m is None or (mode is not None and mode not in MODES and mode not in PLANNERS):
            raise ValueError(
                f"--methods: unknown method {name!r}; use single, upstream, sql_chunks_<n>t, "
                f"statesweep_<n>w, statesweep_<planner>_<n>w (planner: {', '.join(PLANNERS)}), "
                f"statesweep_solo_<n>w, statesweep_unprotected_<n>w, statesweep_noevents_<n>w or "
                f"statesweep_throttled_<n>w")
        workers = int(m.group("workers"))
        if mode == "throttled":
            out += [Method(f"{name}[{t:g}:{w}]", workers, throttle=(t, w)) for t, w in settings]
        elif mode == "solo":
            out.append(Method(name, workers, pool="solo"))
        elif mode == "unprotected":
            out.append(Method(name, workers, protect=False))
        elif mode == "noevents":
            out.append(Method(name, workers, events=False))
        else:
            out.append(Method(name, workers, mode or "auto"))
    seen = [m.name for m in out]
    dup = next((n for n in seen if seen.count(n) > 1), None)
    if dup:
        raise ValueError(f"--methods: {dup!r} is listed twice")
    return out


def seed_spec(rows: int, expired_percent: float | None) -> SeedSpec:
    if expired_percent is None:
        return SeedSpec(rows=rows)
    period, expired, never = EXPIRED_MIXES[expired_percent]
    return SeedSpec(rows=rows, period=period, expired_per_period=expired,
                    never_per_period=never)


def results_stem(rows: int, batch: int, expired_percent: float | None,
                 chunk_rate_limit: str = "", run_state: bool = False) -> str:
    """rows_<N>[_batch_<B>][_exp_<P>][_rate_<R>][_run_state]: each part only when not the
    default."""
    rate = chunk_rate_limit.replace("/", "") if chunk_rate_limit else ""
    return (f"rows_{rows}" + ("" if batch == 10_000 else f"_batch_{batch}")
            + ("" if expired_percent is None else f"_exp_{expired_percent:g}")
            + (f"_rate_{rate}" if rate else "") + ("_run_state" if run_state else ""))
