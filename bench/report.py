"""Turning one benchmark run into its outputs: a JSON file, a markdown table (targets from
bench.targets, profiles from bench.report_detail) and a PNG chart (rows/s per method and the
writer's p99 latency)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen before pyplot loads
from matplotlib import ticker  # noqa: E402

from bench.report_detail import planning_summary, profile_lines  # noqa: E402
from bench.targets import add_ratios, check_targets  # noqa: E402

__all__ = ["add_ratios", "check_targets", "markdown", "planning_summary",
           "write_outputs"]


def _fmt(v: float | None, digits: int = 0, suffix: str = "") -> str:
    return "-" if v is None else f"{v:,.{digits}f}{suffix}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def method_row(m: dict[str, Any]) -> str:
    d = m["detail"]
    rss = (f"{d['coordinator_rss_peak_mib']:.1f} (idle {d['coordinator_rss_baseline_mib']:.1f})"
           if "coordinator_rss_peak_mib" in d else "-")
    share = m.get("planning_share")
    planning = ("-" if d.get("planning_ms") is None else
                f"{d['planning_ms']:.1f} ({share:.1%})" if share is not None
                else f"{d['planning_ms']:.1f}")
    chunk_rows = (f"{d['chunk_rows_p50']:,.0f} / {d['chunk_rows_max']:,}"
                  if "chunk_rows_p50" in d else "-")
    chunks = d.get("chunks", d.get("iterations"))
    w = m["writer"]
    return " | ".join([
        f"| {m['name']}", _fmt(m["rows_per_second"]), _ratio(m["ratio_single"]),
        _ratio(m["ratio_upstream"]), f"{m['seconds']:.2f}", _fmt(m.get("cpu_s_per_million"), 2),
        _ratio(m.get("cpu_ratio_single")), d.get("planner") or "-", planning,
        _fmt(d.get("dispatched_ms"), 1), _fmt(d.get("first_delete_ms"), 1), _fmt(chunks),
        chunk_rows, f"{m['longest_txn_ms']:,.0f} / {m['sampled_longest_ms']:,.0f}", rss,
        f"{w['p99_ms']:.1f} ({_ratio(m.get('writer_p99_x_idle'))}x)",
        ("ok" if m["verified"] else "WRONG") + " |"])


_HEADER = ("| method | rows/s | × single | × upstream | seconds | CPU-s per M expired | "
           "CPU × single | planner | planning ms (share of wall) | first window sent ms | "
           "first DELETE ms | chunks | rows per chunk p50 / max | longest txn ms (direct / "
           "sampled) | coordinator RSS MiB | writer p99 ms (× idle) | end state |")


def markdown(results: dict[str, Any]) -> str:
    meta, ds = results["meta"], results["dataset"]
    mix = (f"{meta['expired_percent']}% expired (--expired-percent)"
           if meta.get("expired_percent") else "the seed's default mix")
    lines = [
        f"# statesweep benchmark: {meta['rows']:,} rows, batch {meta['batch']}, "
        f"{ds['expired'] / ds['rows']:.0%} expired",
        "",
        f"Command: `{meta['command']}`  ",
        f"When: {meta['started']}; load average before {meta['load_before']}, after "
        f"{meta['load_after']} on {meta['cpus']} CPUs; {meta['postgres']}.  ",
        f"Data: {ds['rows']:,} rows ({mix}), {ds['expired']:,} expired, {ds['never']:,} never "
        f"expire, {ds['refreshed']:,} old rows refreshed; survivors {ds['survivors_rows']:,}. "
        f"Each method runs on a fresh file copy of one template database (built once, VACUUM "
        f"ANALYZEd), with a writer upserting {meta['writer_rate']:.0f} keys/s beside it"
        + (f"; STATESWEEP_CHUNK_RATE_LIMIT={meta['chunk_rate_limit']}"
           if meta.get("chunk_rate_limit") else "") + ".",
        "",
        _HEADER,
        "| --- |" + " ---: |" * 6 + " --- |" + " ---: |" * 8 + " --- |",
    ]
    idle = results["writer_idle"]
    lines.append("| (writer idle) |" + " |" * 14 + f" {idle['p99_ms']:.1f} (p50 "
                 f"{idle['p50_ms']:.1f}, {idle['rate']:.0f}/s) | |")
    lines += [method_row(m) for m in results["methods"]]
    lines += [f"| {f['name']} | FAILED: {f['error'][:300]} |" for f in results.get("failed", [])]
    lines += [
        "", "CPU-s per M expired: every process on the machine (PostgreSQL, Redis, workers, the "
        "writer, this bench, and anyone else's) over the method's window, per million rows "
        "deleted. First window sent: the coordinator's `cleanup_run_dispatched` ms, counted "
        "from before it reads the cutoff. First DELETE: the first chunk's DELETE start (its "
        "`chunk_deleted` time minus its ms) after the coordinator began. Planning: "
        "`cleanup_run_started` plan_ms (cutoff read + planners.choose); share of the run's wall "
        "(trigger sent to run finished).", "", "Targets:", ""]
    for t in results["targets"]:
        mark = "holds" if t["holds"] else "MISSED"
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"- {mark}: {t['target']}: {t['measured']}, goal {t['goal']}{note}")
    dry = results["dry_run"]
    cli = (f"`statesweep cleanup --dry-run` took {dry['cli_s']} s (process start included)"
           if dry.get("cli_s") is not None else dry.get("cli_note", "-"))
    lines += ["", f"Dry run: {cli}; workers.cleanup.summarise_expired took "
              f"{dry['summarise_expired_s']} s in process.", ""]
    lines += profile_lines(results)
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    methods = results["methods"]
    names = [m["name"] for m in methods]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(11, 1.6 * len(names)), 4.6))
    colours = ["#4c72b0" if n.startswith("statesweep") else "#8c8c8c" for n in names]
    bars = left.bar(names, [m["rows_per_second"] for m in methods], color=colours)
    left.bar_label(bars, labels=[f"{m['rows_per_second']:,.0f}" for m in methods], fontsize=8)
    by = {m["name"]: m["rows_per_second"] for m in methods}
    if "single" in by:
        left.axhline(by["single"], color="#d62728", linestyle=":",
                     label="target: 1.0x single")
    if "upstream" in by:
        left.axhline(5 * by["upstream"], color="#ff7f0e", linestyle="--",
                     label="throttled target: 5x upstream")
    left.yaxis.set_major_formatter(ticker.FuncFormatter(
        lambda v, _: f"{v / 1e6:.1f}M" if v >= 1e6 else f"{v / 1e3:.0f}k"))
    left.set_title("Rows deleted per second (higher is better)")
    left.set_ylabel("rows/s")
    if "single" in by or "upstream" in by:
        left.legend(fontsize=8)
    idle = results["writer_idle"]["p99_ms"]
    bars = right.bar(names, [m["writer"]["p99_ms"] for m in methods], color=colours)
    right.bar_label(bars, fmt="%.1f", fontsize=8)
    right.axhline(idle, color="#2ca02c", linestyle="--", label=f"idle p99 {idle:.1f} ms")
    right.axhline(2 * idle, color="#d62728", linestyle=":", label="target: 2x idle")
    right.set_title("Writer upsert p99 during each method (lower is better)")
    right.set_ylabel("ms")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
    meta = results["meta"]
    fig.suptitle(f"statesweep benchmark: {meta['rows']:,} rows, batch {meta['batch']}, "
                 f"load {meta['load_before']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` in *out_dir*; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(results))
    chart(results, paths[2])
    return paths
