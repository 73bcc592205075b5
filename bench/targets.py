"""The issues' targets, judged from one benchmark run: each says what was measured, the goal,
and by how much it is missed. Targets set at 5M rows / about 50% expired / batch 10000 are
judged at whatever ran, and say at what."""

from __future__ import annotations

from typing import Any

SINGLE_X, STRETCH_X = 1.0, 1.2        # 2 workers' rows/s against the single DELETE's
CPU_X = 1.3                           # CPU per expired row against the single DELETE's
PLANNING_SHARE = 0.05                 # of the run's wall time
FIRST_DISPATCH_MS = 50.0
LONGEST_TXN_MS = 100.0
RSS_GROWTH_MIB = 5.0                  # coordinator RSS over its baseline during a run
THROTTLED_WRITER_X, THROTTLED_UPSTREAM_X = 2.0, 5.0


def add_ratios(results: dict[str, Any]) -> None:
    """Per method: × single and × upstream (rows/s), CPU per expired row × single's, planning
    share of wall, writer p99 × idle."""
    by = {m["name"]: m for m in results["methods"]}
    idle = results["writer_idle"]["p99_ms"]
    single_cpu = by.get("single", {}).get("cpu_s_per_million")
    for m in results["methods"]:
        for base in ("single", "upstream"):
            ref = by.get(base, {}).get("rows_per_second", 0)
            m[f"ratio_{base}"] = round(m["rows_per_second"] / ref, 3) if ref else None
        cpu = m.get("cpu_s_per_million")
        m["cpu_ratio_single"] = round(cpu / single_cpu, 2) if cpu and single_cpu else None
        plan_ms = m["detail"].get("planning_ms")
        m["planning_share"] = (round(plan_ms / (m["seconds"] * 1000), 4)
                               if plan_ms is not None and m["seconds"] > 0 else None)
        m["writer_p99_x_idle"] = round(m["writer"]["p99_ms"] / idle, 2) if idle else None


def _target(name: str, holds: bool, measured: str, goal: str, note: str = "") -> dict[str, Any]:
    return {"target": name, "holds": holds, "measured": measured, "goal": goal, "note": note}


def _short(value: float, goal: float, higher_is_better: bool = True) -> str:
    miss = (goal - value) / goal if higher_is_better else (value - goal) / goal
    return "" if miss <= 0 else f"{'short' if higher_is_better else 'over'} by {miss:.0%}"


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    meta = results["meta"]
    at = (f"at {meta['rows']:,} rows, {results['dataset']['expired'] / meta['rows']:.0%} "
          f"expired, batch {meta['batch']}")
    by = {m["name"]: m for m in results["methods"]}
    sweeps = [m for m in results["methods"] if m.get("workers")]
    plain = [m for m in sweeps if not m.get("throttle")]
    out: list[dict[str, Any]] = []
    two = by.get("statesweep_2w")
    if two and two["ratio_single"] is not None:
        r = two["ratio_single"]
        stretch = "stretch 1.2x holds" if r >= STRETCH_X else "stretch 1.2x missed"
        out.append(_target("statesweep 2 workers >= 1.0x single", r >= SINGLE_X, f"{r:.2f}x",
                           ">= 1.0x (stretch 1.2x)",
                           "; ".join(x for x in (at, stretch, _short(r, SINGLE_X)) if x)))
    for m in plain:
        one = by.get(m["name"].replace(f"_{m['workers']}w", "_1w"))
        if m["workers"] == 2 and one:
            ok = m["rows_per_second"] >= one["rows_per_second"]
            out.append(_target(f"{m['name']} not slower than {one['name']}", ok,
                               f"{m['rows_per_second']:,.0f} vs {one['rows_per_second']:,.0f} "
                               f"rows/s", ">= 1 worker's rows/s", at))
    for m in plain:
        r = m["cpu_ratio_single"]
        if r is not None:
            out.append(_target(f"{m['name']} CPU per expired row <= 1.3x single's", r <= CPU_X,
                               f"{r:.2f}x ({m['cpu_s_per_million']:.2f} CPU-s per M rows)",
                               "<= 1.3x", "machine total (other users' load included); "
                               + (_short(r, CPU_X, False) or at)))
    for m in plain:
        share, d = m["planning_share"], m["detail"]
        if share is not None:
            out.append(_target(f"{m['name']} planning <= 5% of wall", share <= PLANNING_SHARE,
                               f"{share:.1%} ({d['planning_ms']:.0f} ms of {m['seconds']:.2f} s)",
                               "<= 5%", at))
        # Two upper bounds on when the first chunk was sent, both counted from before the
        # cutoff read: the whole first window sent, and the first DELETE begun (which comes
        # after its message was sent, picked up and its transaction opened).
        bounds = [x for x in (d.get("dispatched_ms"), d.get("first_delete_ms")) if x is not None]
        if bounds:
            sent = min(bounds)
            out.append(_target(
                f"{m['name']} first chunk dispatched <= 50 ms", sent <= FIRST_DISPATCH_MS,
                f"<= {sent:.0f} ms", "<= 50 ms after the cutoff read",
                f"the lower of: first window ({d.get('dispatched_chunks')} chunks) sent at "
                f"{d.get('dispatched_ms')} ms, first DELETE begun at {d.get('first_delete_ms')} "
                f"ms; from before the cutoff read"))
    if meta.get("expired_percent") == 1:
        for m in plain:
            walk = by.get(f"statesweep_walk_{m['workers']}w")
            if m["planner_setting"] == "auto" and walk:
                ok = m["rows_per_second"] >= walk["rows_per_second"]
                out.append(_target(f"at 1% expired {m['name']} (auto, {m['detail']['planner']}) "
                                   f"not slower than {walk['name']}", ok,
                                   f"{m['rows_per_second']:,.0f} vs "
                                   f"{walk['rows_per_second']:,.0f} rows/s", ">= walk", at))
    if sweeps:
        worst = max(sweeps, key=lambda m: max(m["longest_txn_ms"], m["sampled_longest_ms"]))
        ms = max(worst["longest_txn_ms"], worst["sampled_longest_ms"])
        out.append(_target("longest statesweep transaction <= 100 ms", ms <= LONGEST_TXN_MS,
                           f"{ms:.0f} ms ({worst['name']})", "<= 100 ms",
                           "max of chunk_deleted ms and pg_stat_activity samples; "
                           + (_short(ms, LONGEST_TXN_MS, False) or at)))
        growth = max(m["detail"]["coordinator_rss_peak_mib"]
                     - m["detail"]["coordinator_rss_baseline_mib"] for m in sweeps)
        out.append(_target("coordinator RSS flat during a run", growth <= RSS_GROWTH_MIB,
                           f"+{growth:.1f} MiB over baseline", f"<= +{RSS_GROWTH_MIB:g} MiB",
                           "flat in table size: compare peaks across sizes with bench.compare"))
    for m in sweeps:
        if m.get("throttle") and m["writer_p99_x_idle"] is not None and m["ratio_upstream"]:
            x, up = m["writer_p99_x_idle"], m["ratio_upstream"]
            ok = x <= THROTTLED_WRITER_X and up >= THROTTLED_UPSTREAM_X
            out.append(_target(f"{m['name']}: writer p99 <= 2x idle at >= 5x upstream", ok,
                               f"writer p99 {x:.2f}x idle, {up:.1f}x upstream",
                               "<= 2x idle and >= 5x upstream", at))
    return out
