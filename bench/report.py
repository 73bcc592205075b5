"""Turning one benchmark run into its outputs: the targets it checks, a JSON file, a markdown
table and a PNG chart (rows/s per method and the writer's p99 latency)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen before pyplot loads
from matplotlib import ticker  # noqa: E402

SWEEP_APPS = ("statesweep_coordinator", "statesweep_chunks")


def _method(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((m for m in results["methods"] if m["name"] == name), None)


def _target(name: str, holds: bool, measured: str, goal: str, note: str = "") -> dict[str, Any]:
    return {"target": name, "holds": holds, "measured": measured, "goal": goal, "note": note}


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured; the 5M/batch-10000 ones are judged at
    whatever size ran, and say so."""
    out: list[dict[str, Any]] = []
    meta = results["meta"]
    at = f"at {meta['rows']:,} rows, batch {meta['batch']}"
    two = _method(results, "statesweep_2w")
    single, upstream = _method(results, "single"), _method(results, "upstream")
    if two and single:
        r = two["ratio_single"]
        out.append(_target("statesweep 2 workers >= 0.8x single", r >= 0.8, f"{r:.2f}x", ">= 0.8x",
                           at if r >= 0.8 else f"{at}; short by {(0.8 - r) / 0.8:.0%}"))
    if two and upstream:
        r = two["ratio_upstream"]
        out.append(_target("statesweep 2 workers >= 2x upstream", r >= 2, f"{r:.2f}x", ">= 2x",
                           at if r >= 2 else f"{at}; short by {(2 - r) / 2:.0%}"))
    sweeps = [m for m in results["methods"] if m["name"].startswith("statesweep")]
    if sweeps:
        worst = max(max(m["longest_txn_ms"], m["sampled_longest_ms"]) for m in sweeps)
        out.append(_target("no statesweep transaction > 1 s", worst <= 1000, f"{worst:.0f} ms",
                           "<= 1000 ms", "max of chunk_deleted ms and pg_stat_activity samples"))
        peak = max(m["detail"]["coordinator_rss_peak_mib"] for m in sweeps)
        out.append(_target("coordinator peak RSS < 100 MB", peak * 2**20 < 100e6,
                           f"{peak:.1f} MiB", "< 100 MB (95.4 MiB)",
                           "RSS of the -P solo control worker process that runs the coordinator"))
    idle = results["writer_idle"]["p99_ms"]
    for m in sweeps:
        during = m["writer"]["p99_ms"]
        ratio = during / idle if idle else 0.0
        out.append(_target(f"writer p99 during {m['name']} <= 2x idle", ratio <= 2,
                           f"{during:.1f} ms ({ratio:.2f}x idle {idle:.1f} ms)", "<= 2x idle"))
    return out


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    meta, ds = results["meta"], results["dataset"]
    lines = [
        f"# statesweep benchmark: {meta['rows']:,} rows, batch {meta['batch']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"When: {meta['started']}; load average before {meta['load_before']}, after "
        f"{meta['load_after']} on {meta['cpus']} CPUs; {meta['postgres']}.  ",
        f"Data: {ds['rows']:,} rows, {ds['expired']:,} expired, {ds['never']:,} never expire, "
        f"{ds['refreshed']:,} old rows refreshed; survivors {ds['survivors_rows']:,}. Each "
        f"method runs on a fresh file copy of one template database (built once, VACUUM "
        f"ANALYZEd), with a writer upserting {meta['writer_rate']:.0f} keys/s beside it.",
        "",
        "| method | rows/s | × single | × upstream | seconds | longest txn ms (direct) | "
        "longest txn ms (sampled) | txn p50 ms | txn p99 ms | coordinator RSS MiB | "
        "writer p50 / p99 ms (rate) | end state |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    idle = results["writer_idle"]
    lines.append(f"| (idle) | | | | | | | | | | {idle['p50_ms']:.1f} / {idle['p99_ms']:.1f} "
                 f"({idle['rate']:.0f}/s) | |")
    for m in results["methods"]:
        d = m["detail"]
        rss = (f"{d['coordinator_rss_peak_mib']:.1f} (idle {d['coordinator_rss_baseline_mib']:.1f})"
               if "coordinator_rss_peak_mib" in d else "-")
        lines.append(
            f"| {m['name']} | {_fmt(m['rows_per_second'])} | {m['ratio_single']:.2f} | "
            f"{m['ratio_upstream']:.2f} | {m['seconds']:.1f} | {_fmt(m['longest_txn_ms'])} | "
            f"{_fmt(m['sampled_longest_ms'])} | {_fmt(m['txn_ms_p50'], 1)} | "
            f"{_fmt(m['txn_ms_p99'], 1)} | {rss} | {m['writer']['p50_ms']:.1f} / "
            f"{m['writer']['p99_ms']:.1f} ({m['writer']['rate']:.0f}/s) | "
            f"{'ok' if m['verified'] else 'WRONG'} |")
    lines += ["", f"PostgreSQL, Redis, the workers, the writer and this bench all share the same "
              f"{meta['cpus']} CPUs (see the CPU table below).", "", "Targets:", ""]
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


_CPU_COLUMNS = ("PostgreSQL: method", "PostgreSQL: writer", "coordinator worker",
                "chunk workers", "writer process", "bench client", "machine total")


def _cpu_column(label: str) -> str:
    if label.startswith("postgres backends of"):
        return "PostgreSQL: writer" if label.endswith("bench_writer") else "PostgreSQL: method"
    return {"writer": "writer process", "bench client (this process)": "bench client",
            "coordinator worker": "coordinator worker", "chunk workers": "chunk workers"}.get(
        label, "machine total")


def profile_lines(results: dict[str, Any]) -> list[str]:
    prof = results.get("profile", {})
    out = ["## Where the time goes", ""]
    plan = prof.get("planning")
    if plan:
        out.append(f"- Planning (plan_chunks in one process): {plan['chunks']} chunks in "
                   f"{plan['seconds']} s, step p50 {plan['step_ms_p50']} ms, max "
                   f"{plan['step_ms_max']} ms, Python peak {plan['python_peak_kib']} KiB, "
                   f"PostgreSQL CPU {plan.get('postgres_cpu_s', '-')} s.")
    exp = prof.get("planning_experiment")
    if exp:
        variants = ", ".join(
            f"{k} {v['seconds']} s" + ("" if v.get("same_chunks", True) else " (DIFFERENT chunks)")
            for k, v in exp.items())
        out.append(f"- Planning experiment (bench/plan_experiment.py, same chunks required): "
                   f"{variants}.")
    for name, ex in prof.get("explain", {}).items():
        top = ex["plan"][0].strip() if ex["plan"] else ""
        client = (f"; executed from SQLAlchemy it took {ex['client_ms']} ms"
                  if "client_ms" in ex else "")
        out.append(f"- EXPLAIN ANALYZE {name}: planning {ex['planning_ms']:.1f} ms, execution "
                   f"{ex['ms']:.1f} ms{client}; `{top[:100]}`")
    out += ["", "CPU seconds used during each method (psutil, read every 0.4 s, so only "
            "methods lasting seconds are measured well; PostgreSQL backends by "
            "application_name, client processes with their children):", "",
            "| method | " + " | ".join(_CPU_COLUMNS) + " |",
            "| --- |" + " ---: |" * len(_CPU_COLUMNS)]
    for m in results["methods"]:
        cpu = m.get("cpu_seconds", {})
        cells = []
        for col in _CPU_COLUMNS:
            value = sum(v for k, v in cpu.items() if _cpu_column(k) == col)
            cells.append(f"{value:.1f}")
        out.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    out.append("")
    for m in results["methods"]:
        waits = {a: v["lock_waits"] for a, v in m["sampled"].items() if v["lock_waits"]}
        coordinator = m["sampled"].get("statesweep_coordinator")
        planning = (f"; longest coordinator (planning) transaction sampled "
                    f"{coordinator['ms']:.0f} ms" if coordinator else "")
        out.append(f"- {m['name']}: pg_stat_activity samples waiting on a lock: "
                   f"{waits or 'none'}{planning}.")
        if m["name"] == "upstream":
            d = m["detail"]
            out.append(f"- upstream: {d['iterations']} iterations; SELECT total "
                       f"{d['select_ms_total']:.0f} ms (first {d['select_ms_first']} ms, last "
                       f"{d['select_ms_last']} ms), DELETE total {d['delete_ms_total']:.0f} ms.")
        elif m["name"].startswith("statesweep"):
            d = m["detail"]
            out.append(f"- {m['name']}: coordinator planning {_fmt(d['planning_ms'])} ms; "
                       f"{d['chunks']} chunks per worker {d['chunks_per_worker']}; summed over "
                       f"chunks: DELETE+COMMIT {d['chunk_ms_sum'] / 1000:.2f} s, whole Celery "
                       f"task {d['task_ms_sum'] / 1000:.2f} s (task p50 {d['task_ms_p50']} ms, "
                       f"max {d['task_ms_max']} ms); {m['seconds']:.2f} s wall. Cold start "
                       f"paid in the warm-up, not here: first task up to "
                       f"{d.get('first_task_ms_max', '-')} ms.")
        for proc, shares in m["detail"].get("py_spy", {}).items():
            top = ", ".join(f"{k} {v}%" for k, v in shares.items())
            out.append(f"- py-spy ({m['name']} {proc}, wall-clock samples of the main "
                       f"thread while busy, waits on PostgreSQL and Redis included): {top}.")
    return out + [""]


def chart(results: dict[str, Any], path: Path) -> None:
    methods = results["methods"]
    names = [m["name"] for m in methods]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = ["#4c72b0" if n.startswith("statesweep") else "#8c8c8c" for n in names]
    bars = left.bar(names, [m["rows_per_second"] for m in methods], color=colours)
    left.bar_label(bars, labels=[f"{m['rows_per_second']:,.0f}" for m in methods], fontsize=8)
    by = {m["name"]: m["rows_per_second"] for m in methods}
    if "single" in by:
        left.axhline(0.8 * by["single"], color="#d62728", linestyle=":",
                     label="target: 0.8x single")
    if "upstream" in by:
        left.axhline(2 * by["upstream"], color="#ff7f0e", linestyle="--",
                     label="target: 2x upstream")
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
        ax.tick_params(axis="x", labelsize=8)
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
