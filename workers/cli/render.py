"""Text the CLI prints on stdout: run summaries, dry runs, status. Bounded whatever the table
size: counts, the top dag_ids and a small sample, never a list of every row."""

from __future__ import annotations

import datetime as dt
from typing import Any

from workers.cli.progress import format_seconds
from workers.cli.stalls import Condition
from workers.runs import RunRecord

OUTSTANDING_SHOWN = 10


def _when(ts: float) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def run_summary(record: RunRecord) -> str:
    """A finished (or failed, or running) run, one field a line."""
    lines = [
        f"run {record.run_id} {record.state}",
        f"  source        {record.source or '-'}",
        *([f"  database      {record.database}"] if record.database else []),
        f"  cutoff        {record.cutoff or '-'}",
        f"  planner       {record.planner or '-'}"
        + (f" ({record.planner_reason})" if record.planner_reason else ""),
        f"  chunks        {record.chunks_done}/{record.estimated_chunks}"
        + ("" if record.planning_done or record.ended else " (estimated)"),
        f"  rows deleted  {record.rows_deleted:,} (planned {record.expected_rows:,})",
        *([f"  kept          {record.protected_rows:,} expired rows of queued or running dag "
           f"runs (oldest expired {record.protected_oldest})"] if record.protected_rows else []),
        *([f"  resends       {record.resends:,} chunk messages sent again (lost, waiting "
           f"for a worker, or their worker died)"] if record.resends else []),
        *([f"  retries       {record.retries:,} chunk retries of a transient error; the "
           f"latest {_when(record.retry_at)}: {record.retry_error}"]
          if record.retries else []),
        f"  started       {_when(record.started_at)}",
        f"  duration      {record.duration:.2f}s",
        f"  rate          {record.rows_per_second:,.0f} rows/s",
    ]
    if record.error:
        lines.append(f"  error         {record.error}")
    return "\n".join(lines)


def run_detail(record: RunRecord, now: Condition) -> str:
    """One run with what it is doing now: queued, held or stalled, and its outstanding chunks."""
    lines = [run_summary(record)]
    if now.note():
        lines.append(f"  now           {now.note()}")
    if now.state == "running":
        lines.append(f"  progress      {_last_chunk(record.chunks_done, now.idle_seconds)}")
    if now.outstanding:
        shown = now.outstanding[:OUTSTANDING_SHOWN]
        lines.append(f"  outstanding   {len(now.outstanding)} chunks in flight:")
        lines += [f"    {o.describe()}" for o in shown]
        if len(now.outstanding) > len(shown):
            lines.append(f"    … and {len(now.outstanding) - len(shown)} more")
    return "\n".join(lines)


def _last_chunk(done: int, idle: float) -> str:
    """Progress time is the window's start until a chunk finishes."""
    if done:
        return f"last chunk finished {idle:.0f}s ago"
    return f"no chunk finished yet (the first sent {idle:.0f}s ago)"


def sweep(data: dict[str, Any]) -> str:
    lines = [f"orphan sweep {data['sweep_id']} {data['state']}",
             f"  table         {data.get('table') or '-'}",
             f"  rows deleted  {data['rows']:,} in {_batches(data['batches'])}",
             f"  started       {_when(data['started_at'])}",
             f"  seconds       {data['seconds']}"]
    if data.get("error"):
        lines.append(f"  error         {data['error']}")
    return "\n".join(lines)


def _batches(n: int) -> str:
    return f"{n} batch" if n == 1 else f"{n} batches"


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
    if data.get("selection") and data["selection"] != "everything expired":
        lines.append(f"  selection     {data['selection']}")
    if data.get("protected_rows"):
        lines.append(f"  kept          {data['protected_rows']:,} expired rows of queued or "
                     f"running dag runs (oldest expired {data['protected_oldest']})")
    if data.get("planner"):
        lines += [f"  planner       {data['planner']} (about {data['estimated_chunks']:,} chunks)",
                  f"  because       {data['planner_reason']}"]
    if data["top_dag_ids"]:
        lines.append(f"top {len(data['top_dag_ids'])} dag_ids by expired rows:")
        width = max(len(d["dag_id"]) for d in data["top_dag_ids"])
        lines += [f"  {d['dag_id']:<{width}}  {d['rows']:>12,}" for d in data["top_dag_ids"]]
    if data["sample"]:
        lines.append(f"sample of expired rows (first {len(data['sample'])} by id):")
        lines += ["  " + "  ".join(f"{k}={v}" for k, v in row.items()) for row in data["sample"]]
    return "\n".join(lines)


def status_table(records: list[RunRecord]) -> list[str]:
    header = ("RUN ID", "STATE", "SOURCE", "PLANNER", "CUTOFF", "CHUNKS", "ROWS", "ROWS/S",
              "DURATION")
    rows = [header] + [(
        r.run_id, r.state, r.source or "-", r.planner or "-", r.cutoff[:19] or "-",
        f"{r.chunks_done}/{r.chunks_planned}", f"{r.rows_deleted:,}",
        f"{r.rows_per_second:,.0f}", format_seconds(r.duration),
    ) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def status(data: dict[str, Any], records: list[RunRecord]) -> str:
    active = data["active_run_id"]
    lines = [f"active run: {active or 'none'}"]
    run = data.get("active_run")
    if run:
        now = run["condition"]
        lines.append(f"  planner {run['planner'] or '-'}: {run['planner_reason'] or '-'}")
        lines.append(f"  progress {run['chunks_done']}/{run['estimated_chunks']} chunks, "
                     f"{run['rows_deleted']:,} rows; "
                     f"{_last_chunk(run['chunks_done'], now['idle_seconds'])}")
        if now["held"]:
            lines.append(f"  held: {now['held']} since {now['held_since']}")
        if now["stalled"]:
            lines.append(f"  STALLED: no chunk finished for {now['idle_seconds']:.0f}s; "
                         f"{len(now['outstanding'])} chunks outstanding "
                         f"(`statesweep status {active}` lists them)")
    paused = data.get("paused")
    if paused:
        until = paused["until"] or "resumed (`statesweep resume`)"
        lines.append(f"PAUSED by {paused['by'] or 'someone'} at {paused['at']} until {until}: "
                     f"{paused['reason'] or '-'}")
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
    if data.get("failed_triggers"):
        lines.append("failed triggers (newest first):")
        lines += [f"  {t['at']}  {t['run_id']}  {t['source'] or '-'}  {t['error']}"
                  for t in data["failed_triggers"]]
    if data.get("sweeps"):
        lines.append("recent orphan sweeps (newest first):")
        lines += [f"  {s['sweep_id']}  {s['state']}  {s['rows']:,} rows in "
                  f"{_batches(s['batches'])}  {s['started_at']}"
                  + (f"  {s['error']}" if s.get("error") else "") for s in data["sweeps"]]
    return "\n".join(lines)


def orphans(data: dict[str, Any]) -> str:
    if data.get("dry_run"):
        return (f"dry run: nothing was deleted\n  table          {data['table']}\n"
                f"  orphaned rows  {data['orphaned_rows']:,}")
    return (f"orphaned asset state swept: {data.get('rows', 0):,} rows in "
            f"{data.get('batches', 0)} batches, {data.get('seconds', 0)}s")
