"""The "where the time goes" part of a benchmark report: the planners profiled, EXPLAIN ANALYZE
of the statements, CPU per part of the system, and per-method notes."""

from __future__ import annotations

from typing import Any

_CPU_COLUMNS = ("PostgreSQL: method", "PostgreSQL: writer", "coordinator worker",
                "chunk workers", "writer process", "bench client", "machine total")


def _cpu_column(label: str) -> str:
    if label.startswith("postgres backends of"):
        return "PostgreSQL: writer" if label.endswith("bench_writer") else "PostgreSQL: method"
    return {"writer": "writer process", "bench client (this process)": "bench client",
            "coordinator worker": "coordinator worker", "chunk workers": "chunk workers"}.get(
        label, "machine total")


def planning_summary(prof: dict[str, Any]) -> str:
    """One line: each planner setting's best time and statements."""
    return ", ".join(f"{k} {v['ms_best']} ms/{v['statements']} stmts"
                     for k, v in prof.get("planning", {}).items())


def _planning_lines(prof: dict[str, Any]) -> list[str]:
    out = ["| STATESWEEP_PLANNER | chose | ms (first / best of 3) | statements | est. chunks | "
           "expected rows | Python peak KiB | why |", "| --- | --- |" + " ---: |" * 5 + " --- |"]
    for setting, p in prof.get("planning", {}).items():
        out.append(f"| {setting} | {p['planner']} | {p['ms_first']} / {p['ms_best']} | "
                   f"{p['statements']} | {p['estimated_chunks']:,} | {p['expected_rows']:,} | "
                   f"{p['python_peak_kib']} | {p['reason']} |")
    exp = prof.get("planning_experiment")
    if exp:
        errors = ", ".join(f"{k} {v['rows_error']:+.1%}" for k, v in exp.items()
                           if isinstance(v, dict) and v.get("rows_error") is not None)
        cuts = exp["walk_cuts"]
        out += ["", f"- Estimates against the truth ({exp['expired_rows']:,} expired, "
                f"{exp['ideal_chunks']:,} chunks of a full batch): expected rows off by "
                f"{errors or '-'}. PostgreSQL CPU while planning: "
                f"{prof.get('planning_postgres_cpu_s', '-')} s.",
                f"- The walk's cuts (one per chunk, on the sending path): first {cuts['cuts']} "
                f"took p50 {cuts['ms_p50']} ms, max {cuts['ms_max']} ms; about "
                f"{cuts['run_ms_estimate']:,} ms over a run's {exp['ideal_chunks']:,} chunks."]
    return out


def throttle_lines(results: dict[str, Any]) -> list[str]:
    """The throttle trade-off curve: writer p99 against rows/s, unthrottled 2 workers first."""
    points = [m for m in results["methods"] if m.get("throttle")]
    if not points:
        return []
    base = [m for m in results["methods"] if m["name"] == "statesweep_2w"]
    out = ["## Throttle trade-off (issue 11: writer p99 <= 2x idle at >= 5x upstream)", "",
           "| method | target chunk s | chunks in flight | rows/s | × upstream | chunk ms p50 / "
           "p99 | rows per chunk p50 | writer p99 ms (× idle) |",
           "| --- |" + " ---: |" * 7]
    for m in base + points:
        t = m.get("throttle") or ["-", 16]
        d = m["detail"]
        up = "-" if m.get("ratio_upstream") is None else f"{m['ratio_upstream']:.1f}"
        x = "-" if m.get("writer_p99_x_idle") is None else f"{m['writer_p99_x_idle']:.2f}"
        out.append(f"| {m['name']} | {t[0]} | {t[1]} | {m['rows_per_second']:,.0f} | {up} | "
                   f"{d['chunk_ms_p50']:.0f} / {d['chunk_ms_p99']:.0f} | "
                   f"{d.get('chunk_rows_p50', 0):,.0f} | {m['writer']['p99_ms']:.1f} ({x}x) |")
    return out + [""]


def profile_lines(results: dict[str, Any]) -> list[str]:
    prof = results.get("profile", {})
    out = [*throttle_lines(results), "## Where the time goes", "",
           "Planning (workers.planners.choose in this process, on one autocommit connection as "
           "the coordinator plans):", ""]
    out += _planning_lines(prof)
    out.append("")
    for name, ex in prof.get("explain", {}).items():
        top = " / ".join(x.strip() for x in ex["plan"][:2]) if ex["plan"] else ""
        client = (f"; executed from SQLAlchemy it took {ex['client_ms']} ms"
                  if "client_ms" in ex else "")
        span = f" ({ex['range']})" if "range" in ex else ""
        out.append(f"- EXPLAIN ANALYZE {name}{span}: planning {ex['planning_ms']:.1f} ms, "
                   f"execution {ex['ms']:.1f} ms{client}; `{top[:160]}`")
    out += ["", "CPU seconds used during each method (psutil, read every 0.4 s, so only "
            "methods lasting seconds are measured well; PostgreSQL backends by "
            "application_name, client processes with their children):", "",
            "| method | " + " | ".join(_CPU_COLUMNS) + " |",
            "| --- |" + " ---: |" * len(_CPU_COLUMNS)]
    for m in results["methods"]:
        cpu = m.get("cpu_seconds", {})
        cells = [f"{sum(v for k, v in cpu.items() if _cpu_column(k) == col):.1f}"
                 for col in _CPU_COLUMNS]
        out.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    out.append("")
    for m in results["methods"]:
        out += _method_notes(m)
    return out + [""]


def _method_notes(m: dict[str, Any]) -> list[str]:
    waits = {a: v["lock_waits"] for a, v in m["sampled"].items() if v["lock_waits"]}
    out = [f"- {m['name']}: pg_stat_activity samples waiting on a lock: {waits or 'none'}."]
    d = m["detail"]
    if m["name"] == "upstream":
        out.append(f"- upstream: {d['iterations']} iterations; SELECT total "
                   f"{d['select_ms_total']:.0f} ms (first {d['select_ms_first']} ms, last "
                   f"{d['select_ms_last']} ms), DELETE total {d['delete_ms_total']:.0f} ms.")
    elif m.get("workers"):
        out.append(f"- {m['name']}: planner {d.get('planner')} ({d.get('planner_reason')}); "
                   f"estimated {d.get('estimated_chunks')} chunks, ran {d['chunks']} (per "
                   f"worker {d['chunks_per_worker']}); summed over chunks: DELETE+COMMIT "
                   f"{d['chunk_ms_sum'] / 1000:.2f} s, whole Celery task "
                   f"{d['task_ms_sum'] / 1000:.2f} s (task p50 {d['task_ms_p50']} ms, max "
                   f"{d['task_ms_max']} ms); {m['seconds']:.2f} s wall. Cold start paid in the "
                   f"warm-up, not here: first task up to {d.get('first_task_ms_max', '-')} ms.")
    for proc, shares in d.get("py_spy", {}).items():
        top = ", ".join(f"{k} {v}%" for k, v in shares.items())
        out.append(f"- py-spy ({m['name']} {proc}, wall-clock samples of the main thread "
                   f"while busy, waits on PostgreSQL and Redis included): {top}.")
    return out
