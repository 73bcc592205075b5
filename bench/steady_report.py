"""bench.steady's outputs: per method the means over its cycles (and its first cycle apart),
ratios to Airflow's loop measured in the same run, issue 20's steady-state targets held or
missed, and every cycle's row."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

#: What each summary column averages over a method's cycles.
FIELDS = ("wall_s", "record_seconds", "pg_cpu_s", "machine_cpu_s", "rows",
          "rows_read_per_deleted", "heap_blocks_per_deleted", "expired_left", "plan_ms")


def _mean(cycles: list[dict[str, Any]], key: str) -> float | None:
    values = [c[key] for c in cycles if c.get(key) is not None]
    return round(mean(values), 3) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarise(results: dict[str, Any]) -> None:
    """Adds each method's summaries, its ratios to upstream, and the targets."""
    for m in results["methods"]:
        cycles = m["cycles"]
        m["mean"] = {k: _mean(cycles, k) for k in FIELDS}
        m["mean_after_first"] = {k: _mean(cycles[1:], k) for k in FIELDS}
        m["first"] = {k: cycles[0].get(k) for k in FIELDS}
        # Pooled over the cycles: a run whose statistics land in the next window (a backend
        # flushes them up to 10 s late) moves reads between two cycles, not out of the sum.
        read = sum(c.get("rows_read", (c["rows_read_per_deleted"] or 0) * c["rows"])
                   for c in cycles)
        m["rows_read_per_deleted_pooled"] = round(read / max(1, sum(c["rows"] for c in cycles)),
                                                  3)
        m["writer_p99_ms_max"] = max(c["writer"]["p99_ms"] for c in cycles)
        m["pages"] = {"start": m["built"]["pages"], "end": cycles[-1]["pages"],
                      "growth": round(cycles[-1]["pages"] / m["built"]["pages"] - 1, 4)}
        m["planners"] = sorted({c["planner"] for c in cycles if c.get("planner")})
    base = next((m for m in results["methods"] if m["name"] == "upstream"), None)
    for m in results["methods"]:
        m["vs_upstream"] = {
            part: {"wall_s": _ratio(m[part]["wall_s"], base[part]["wall_s"]) if base else None,
                   # statesweep's run record (trigger to last chunk, no CLI) to the loop's wall
                   "record_seconds": _ratio(m[part]["record_seconds"], base[part]["wall_s"])
                   if base else None,
                   "pg_cpu_s": _ratio(m[part]["pg_cpu_s"], base[part]["pg_cpu_s"])
                   if base else None}
            for part in ("mean", "mean_after_first", "first")}
    results["targets"] = targets(results)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 20's steady-state targets, per statesweep method, over the mean of all cycles."""
    out = []
    for m in results["methods"]:
        if not m["workers"]:
            continue
        plan = [c["plan_ms"] for c in m["cycles"] if c.get("plan_ms") is not None]
        checks = [
            ("wall per run <= 0.5x Airflow's loop", m["vs_upstream"]["mean"]["wall_s"], 0.5),
            ("PostgreSQL CPU per run <= 0.25x Airflow's", m["vs_upstream"]["mean"]["pg_cpu_s"],
             0.25),
            ("rows read per row deleted <= 1.5 (pooled over cycles)",
             m["rows_read_per_deleted_pooled"], 1.5),
            ("plan <= 20 ms (max over cycles)", max(plan) if plan else None, 20.0),
            ("table pages grow < 10%", m["pages"]["growth"], 0.10),
        ]
        for what, value, limit in checks:
            held = value is not None and (value < limit if "<" in what and "<=" not in what
                                          else value <= limit)
            out.append({"method": m["name"], "target": what, "value": value, "limit": limit,
                        "held": held})
    return out


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# Steady state: {meta['rows']:,} rows, {meta['cycles']} cycles every "
        f"{meta['interval']:g} s, ~1% of the table expiring per interval",
        "",
        f"Command: `{meta['command']}`  ",
        f"When: {meta['started']}; load before {meta['load_before']}, after "
        f"{meta['load_after']} on {meta['cpus']} CPUs; PostgreSQL {meta['postgres']}; writer "
        f"{meta['writer_rate']:g} upserts/s; batch {meta['batch']}. Ratios are to `upstream` in "
        "this same run. Wall of statesweep is the `statesweep cleanup --wait` process's (CLI "
        "start-up included); `run s` is the run record's (trigger to last chunk).",
        "",
        "| method | part | wall s | × upstream | run s | × upstream wall | PG CPU s | × upstream "
        "| machine CPU s "
        "| rows deleted | rows read / deleted | heap blocks / deleted | expired left | plan ms |",
        "| --- | --- |" + " ---: |" * 12,
    ]
    for m in results["methods"]:
        for part, label in (("mean", "mean"), ("first", "cycle 1"),
                            ("mean_after_first", "mean of 2..")):
            s, r = m[part], m["vs_upstream"][part]
            lines.append(
                f"| {m['name']} | {label} | {_f(s['wall_s'])} | {_f(r['wall_s'])} | "
                f"{_f(s['record_seconds'])} | {_f(r['record_seconds'])} | {_f(s['pg_cpu_s'])} | "
                f"{_f(r['pg_cpu_s'])} | "
                f"{_f(s['machine_cpu_s'])} | {_f(s['rows'], 0)} | "
                f"{_f(s['rows_read_per_deleted'])} | {_f(s['heap_blocks_per_deleted'], 3)} | "
                f"{_f(s['expired_left'], 0)} | {_f(s['plan_ms'], 1)} |")
    lines += ["", "| method | pages at start → end (growth) | rows read / deleted, pooled | "
              "writer p99 ms alone / max over runs | planners chosen |",
              "| --- | --- | ---: | --- | --- |"]
    for m in results["methods"]:
        p = m["pages"]
        lines.append(f"| {m['name']} | {p['start']:,} → {p['end']:,} ({p['growth']:+.1%}) | "
                     f"{m['rows_read_per_deleted_pooled']:.2f} | "
                     f"{m['writer_alone']['p99_ms']:.1f} / {m['writer_p99_ms_max']:.1f} | "
                     f"{', '.join(m['planners']) or '-'} |")
    lines += ["", "## Targets (issue 20)", "", "| method | target | measured | |",
              "| --- | --- | ---: | --- |"]
    for t in results["targets"]:
        lines.append(f"| {t['method']} | {t['target']} | {_f(t['value'], 3)} | "
                     f"{'hold' if t['held'] else 'MISS'} |")
    lines += ["", "## Every cycle", "", "| method | cycle | wall s | PG CPU s | rows | rows read"
              " / deleted | stats coverage | left | pages | writer p99 ms | planner | plan ms "
              "| reason |", "| --- | ---: |" + " ---: |" * 8 + " --- | ---: | --- |"]
    for m in results["methods"]:
        for c in m["cycles"]:
            lines.append(
                f"| {m['name']} | {c['cycle']} | {c['wall_s']:.2f} | {c['pg_cpu_s']:.2f} | "
                f"{c['rows']:,} | {_f(c['rows_read_per_deleted'])} | "
                f"{_f(c['stats_coverage'], 3)} | {c['expired_left']:,} | {c['pages']:,} | "
                f"{c['writer']['p99_ms']:.1f} | {c.get('planner') or '-'} | "
                f"{_f(c.get('plan_ms'), 1)} | {c.get('planner_reason') or '-'} |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(results))
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.steady_report RESULTS.json``: summarise and write its .md again."""
    import sys

    path = Path((argv if argv is not None else sys.argv[1:])[0])
    results = json.loads(path.read_text())
    summarise(results)
    write_outputs(results, path.parent, path.stem)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
