"""Text the CLI prints on stdout: run summaries, dry runs, status. Bounded whatever the table
size: counts, the top dag_ids and a small sample, never a list of every row."""

from __future__ import annotations

import datetime as dt
from typing import Any

from workers.cli.progress import format_seconds
from workers.runs import RunRecord


def _when(ts: float) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def run_summary(record: RunRecord) -> str:
    """A finished (or failed, or running) run, one field a line."""
    lines = [
        f"run {record.run_id} {record.state}",
        f"  source        {record.source or '-'}",
        f"  cutoff        {record.cutoff or '-'}",
        f"  chunks        {record.chunks_done}/{record.chunks_planned}"
        + ("" if record.planning_done or record.state == "finished" else " (planning)"),
        f"  rows deleted  {record.rows_deleted:,} (planned {record.expected_rows:,})",
        f"  started       {_when(record.started_at)}",
        f"  duration      {record.duration:.2f}s",
        f"  rate          {record.rows_per_second:,.0f} rows/s",
    ]
    if record.error:
        lines.append(f"  error         {record.error}")
    return "\n".join(lines)


def dry_run(data: dict[str, Any]) -> str:
    lines = [
        "dry run: nothing was deleted",
        f"  table         {data['table']}",
        f"  cutoff        {data['cutoff']}",
        f"  expired rows  {data['expired_rows']:,}",
        f"  batch size    {data['batch_size']:,}"
        + (" (one chunk)" if not data["batch_size"] else ""),
        f"  chunks        {data['chunks']:,}",
    ]
    if data["top_dag_ids"]:
        lines.append(f"top {len(data['top_dag_ids'])} dag_ids by expired rows:")
        width = max(len(d["dag_id"]) for d in data["top_dag_ids"])
        lines += [f"  {d['dag_id']:<{width}}  {d['rows']:>12,}" for d in data["top_dag_ids"]]
    if data["sample"]:
        lines.append(f"sample of expired rows (first {len(data['sample'])} by id):")
        lines += ["  " + "  ".join(f"{k}={v}" for k, v in row.items()) for row in data["sample"]]
    return "\n".join(lines)


def status_table(records: list[RunRecord]) -> list[str]:
    header = ("RUN ID", "STATE", "SOURCE", "CUTOFF", "CHUNKS", "ROWS", "ROWS/S", "DURATION")
    rows = [header] + [(
        r.run_id, r.state, r.source or "-", r.cutoff[:19] or "-",
        f"{r.chunks_done}/{r.chunks_planned}", f"{r.rows_deleted:,}",
        f"{r.rows_per_second:,.0f}", format_seconds(r.duration),
    ) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def status(data: dict[str, Any], records: list[RunRecord]) -> str:
    active = data["active_run_id"]
    lines = [f"active run: {active or 'none'}"]
    backlog = data["backlog"]
    if "error" in backlog:
        lines.append(f"backlog: unknown ({backlog['error']})")
    else:
        lines.append(f"backlog: {backlog['expired_rows']:,} expired rows in {backlog['table']} "
                     f"(expires_at < {backlog['now']})")
    if records:
        lines.append(f"recent runs (newest first, {len(records)} shown):")
        lines += ["  " + line for line in status_table(records)]
    else:
        lines.append("recent runs: none recorded")
    return "\n".join(lines)


def orphans(data: dict[str, Any]) -> str:
    if data.get("dry_run"):
        return (f"dry run: nothing was deleted\n  table          {data['table']}\n"
                f"  orphaned rows  {data['orphaned_rows']:,}")
    return (f"orphaned asset state swept: {data.get('rows', 0):,} rows in "
            f"{data.get('batches', 0)} batches, {data.get('seconds', 0)}s")
