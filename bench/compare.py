"""``python -m bench.compare bench/results/rows_*.json``: several benchmark results side by side.

One row per (result file, method), ordered by expired fraction then table size, in per-million
figures, so growth with table size (1M, 5M, 20M) and the effect of the expired fraction (1%, 10%,
50%, 90%) read down a column: rows/s, × single, seconds per million expired rows, CPU-seconds
per million expired rows (× single's), planning ms and its share of wall, the first window's
dispatch ms, chunks per million expired rows, longest transaction, coordinator peak RSS.
Markdown to stdout; files that are not bench results are named on stderr and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.targets import add_ratios

HEADER = ("| result | rows | expired | method | rows/s | × single | s per M expired | "
          "CPU-s per M expired (× single) | planning ms (share) | first window ms | "
          "chunks per M expired | longest txn ms | coordinator RSS MiB |")


def _f(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def rows_of(stem: str, results: dict[str, Any]) -> list[str]:
    if "ratio_single" not in (results["methods"] or [{}])[0]:
        add_ratios(results)  # results written before the ratios existed
    meta, ds = results["meta"], results["dataset"]
    share = f"{ds['expired'] / ds['rows']:.0%}"
    out = []
    for m in results["methods"]:
        d = m["detail"]
        per_m = 1e6 / m["rows"] if m["rows"] else None
        cpu = m.get("cpu_s_per_million")
        cpu_x = m.get("cpu_ratio_single")
        plan, plan_share = d.get("planning_ms"), m.get("planning_share")
        chunks = d.get("chunks", d.get("iterations"))
        out.append(" | ".join([
            f"| {stem}", f"{meta['rows']:,}", share, m["name"], _f(m["rows_per_second"]),
            _f(m.get("ratio_single"), 2), _f(m["seconds"] * per_m if per_m else None, 3),
            _f(cpu, 2) + (f" ({cpu_x:.2f}x)" if cpu_x is not None else ""),
            f"{_f(plan, 1)} ({plan_share:.1%})" if plan is not None and plan_share is not None
            else _f(plan, 1),
            _f(d.get("dispatched_ms"), 1),
            _f(chunks * per_m if chunks is not None and per_m else None, 1),
            _f(max(m["longest_txn_ms"], m.get("sampled_longest_ms", 0.0))),
            _f(d.get("coordinator_rss_peak_mib"), 1) + " |"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="bench result JSON files")
    args = p.parse_args(argv)
    loaded: list[tuple[str, dict[str, Any]]] = []
    for path in args.files:
        try:
            results = json.loads(path.read_text())
            results["meta"]["rows"], results["dataset"]["expired"]  # noqa: B018 - shape check
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"bench.compare: skipping {path}: not a bench result ({exc})", file=sys.stderr)
            continue
        loaded.append((path.stem, results))
    if not loaded:
        print("bench.compare: no bench result among the files given", file=sys.stderr)
        return 2
    loaded.sort(key=lambda x: (x[1]["dataset"]["expired"] / x[1]["dataset"]["rows"],
                               x[1]["meta"]["rows"], x[0]))
    print(HEADER)
    print("| --- | ---: | ---: | --- |" + " ---: |" * 9)
    for stem, results in loaded:
        print("\n".join(rows_of(stem, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
