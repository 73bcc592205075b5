"""The docs site's reference pages, generated from the code so they cannot drift.

- ``reference/settings.md``: every field of :class:`workers.settings.Settings`, its variable,
  its default, the Airflow setting it falls back to, and its description from
  :data:`DESCRIPTIONS` below (workers/settings.py is the code's; the prose lives here, and
  tests/unit/test_docs_site.py fails when a setting has none).
- ``reference/cli.md``: ``statesweep --help`` and every command's ``--help``, from the click
  commands themselves, at a fixed width.
- ``reference/metrics.md``: every metric family the exporter serves, collected from
  :class:`workers.exporter.StatesweepCollector` on stand-ins for its run store, database and
  workers (no service is reached), with :data:`METRIC_NOTES`.

Also the site's home page: README.md, its ``docs/…`` links made site-relative.

Used as an MkDocs hook (mkdocs.yml ``hooks:``), which adds the pages at build time; or run as
``python docs/gen_reference.py OUTDIR`` to write them out for reading without MkDocs.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parents[1]

# --- settings ------------------------------------------------------------------------------

#: What each setting does, by Settings field name; one sentence or a few, Markdown.
DESCRIPTIONS: dict[str, str] = {
    "database_url": "Metadata database, in any spelling Airflow uses "
                    "([connection strings](../airflow.md#connection-strings)).",
    "broker_url": "Celery broker: `redis://` or RabbitMQ's `amqp://` (see "
                  "[Brokers](../configure.md#brokers-redis-or-rabbitmq)).",
    "result_backend": "Celery result backend.",
    "run_store_url": "Where runs, the single-flight lock, the pause and the counters live "
                     "(`redis://`, `rediss://`, `unix:///path/redis.sock?db=0`, or `memory://` "
                     "for one process); a Redis >= 7 with maxmemory-policy `noeviction`, "
                     "checked when a worker or beat starts. Unset: the result "
                     "backend's Redis, else the broker's; a worker or beat that would fall "
                     "back to `memory://` refuses to start (exit 3).",
    "default_retention_days": "Retention of task state that statesweep's own writer library "
                              "writes without an explicit one (`expires_at` = now + this); "
                              "`0` = never expires. It does not change what cleanup deletes: "
                              "cleanup deletes by each row's `expires_at`, whoever wrote it.",
    "cleanup_batch_size": "Expired rows per chunk (and orphaned rows per batch); `0` = one "
                          "chunk for everything. Airflow's `0` (\"no batching\", in every "
                          "generated `airflow.cfg`) is not adopted: statesweep keeps its own "
                          "batch ([Airflow's configuration](../airflow.md)).",
    "table_naming": "`seed` (task_state/asset_state), `airflow` "
                    "(task_state_store/asset_state_store) or `auto` (inspect the database).",
    "state_backend": "Backend class; any other makes the coordinator call its `cleanup()` hook "
                     "instead ([the state backend](../airflow.md#the-state-backend)).",
    "coordinator_schedule": "Coordinator period: seconds (finite, at most a year) or a "
                            "five-field crontab.",
    "orphan_schedule": "Orphaned-asset-state sweep period: seconds or crontab.",
    "control_queue": "Queue of the coordinator and the orphan sweep.",
    "chunk_queue": "Queue of chunk deletes (scale its workers separately).",
    "key_prefix": "Prefix of the run store's Redis keys: letters, digits, `.`, `:`, `_`, "
                  "`-`, and at most one Redis Cluster hash tag in braces (`{statesweep}`), "
                  "which puts every key in one slot (see [the run store's Redis]"
                  "(../configure.md#the-run-stores-redis)).",
    "lock_ttl_seconds": "Single-flight lock TTL while a run is being planned, and the "
                        "coordinator task's time limit (its soft limit 5 s less). With a "
                        "Redis broker it must be below the visibility timeout, so a dead "
                        "coordinator's lock lapses before Redis redelivers its message.",
    "run_timeout_seconds": "How long the lock of a planned run outlives its last finished "
                           "chunk or pump before it frees itself (at least 60 and at least "
                           "the lock TTL).",
    "chunk_soft_time_limit": "Soft time limit of a chunk task (see "
                             "[Time limits](../configure.md#time-limits)).",
    "chunk_time_limit": "Hard time limit of a chunk task (see "
                        "[Time limits](../configure.md#time-limits)).",
    "visibility_timeout": "Redis only: how long a message a worker took and never "
                          "acknowledged waits before another worker gets it; must be at least "
                          "twice the hard limit. Independently, a chunk sent more than the "
                          "hard limit + 30 s ago that has not finished is sent again by the "
                          "next pump or trigger (a trigger that does so reports `resumed`).",
    "lock_timeout_ms": "Per-chunk lock timeout.",
    "statement_timeout_ms": "Per-chunk statement timeout; it also ends a chunk transaction "
                            "left idle by a vanished client (PostgreSQL). Must be below the "
                            "chunk's soft time limit, so the database cancels a slow DELETE "
                            "(the chunk retries) before the time limit cuts it off.",
    "chunk_rate_limit": "Chunk starts per second/minute/hour for all workers together "
                        "(`10/s`, `600/m`, `1000/h`): trades cleanup speed for CPU and I/O "
                        "left to the writers (see [Throttling](../operate.md#throttling)).",
    "planner": "How a run is cut into chunks: `expiry` (intervals of the `expires_at` index, "
               "at most `batch_size` rows each: the steady state), `blocks` (PostgreSQL heap "
               "page ranges), `ids` (primary-key arithmetic: MySQL, MariaDB, SQLite), `walk` "
               "(an index walk, `batch_size` expired rows a chunk), or `auto` (by regime: "
               "`blocks`/`ids` for a backlog of 12% or more of the table on PostgreSQL, 5% "
               "elsewhere, `expiry` otherwise; the run record says why). For a run narrowed "
               "to dag ids, `auto` takes `dags` (id ranges of those dags' rows, read through "
               "the dag_id index) where that reads less than a plan of the table; it is not a "
               "value of this setting. A planner the database cannot serve is refused before "
               "anything is deleted.",
    "max_chunks_in_flight": "The window: chunks of a run queued or running at once.",
    "active_hours": "UTC windows in which chunks may start, `HH:MM-HH:MM[,…]` "
                    "(`22:00-06:00`).",
    "max_run_seconds": "A run sends chunks for at most this many seconds, then holds until "
                       "the next trigger.",
    "max_replica_lag_seconds": "Hold chunks while a replica lags more than this.",
    "target_chunk_seconds": "Size chunks to take about this many seconds each, from the last "
                            "chunks' timing; unset, by rows (`STATESWEEP_CLEANUP_BATCH_SIZE`).",
    "pump_interval_seconds": "How often beat's pump tops up the active run's window and sends "
                             "again what was parked or lost: with a chunk's 6 s heartbeat, what "
                             "a killed worker held goes out again within about this plus 6 s. "
                             "An idle pump logs nothing.",
    "replica_urls": "MySQL/MariaDB: the replicas whose lag to read, comma-separated URLs "
                    "(required with the lag limit there); PostgreSQL reads its standbys on the "
                    "primary and needs none.",
    "chunk_task_events": "Chunk tasks send Celery task events, so Flower lists every chunk. "
                         "`false` saves three event publishes per chunk in the worker; run "
                         "progress stays in the run store, `status` and the exporter.",
    "protect_unfinished_dag_runs": "Keep expired task state of a dag run that is `queued` or "
                                   "`running` until it finishes (a retry reads the state its "
                                   "earlier try wrote). Checked in each chunk's DELETE; needs "
                                   "Airflow's `dag_run.state` (statesweep's standalone schema "
                                   "has none, so nothing is protected there). `false` deletes "
                                   "it as Airflow's own cleanup does.",
    "dag_ids": "Beat's runs clean only these dag ids (comma-separated, as `airflow db clean "
               "--dag-ids`); empty: every dag. Ad-hoc runs take `--dag-ids` instead "
               "([choosing what to clean](../airflow.md#choosing-what-to-clean-as-airflow-db-"
               "clean-does)).",
    "exclude_dag_ids": "Beat's runs leave these dag ids alone (comma-separated, as `airflow db "
                       "clean --exclude-dag-ids`); a dag id may not be in both lists.",
    "clean_grace": "Beat's grace period, a duration (`600`, `90s`, `30m`, `6h`, `2d`, `1w`; "
                   "`0` = none): each beat run cleans state that expired before the "
                   "database's now() minus it, so state stays that long past its expiry. "
                   "It only narrows: the cutoff is never later than now().",
    "db_clean_keep_days": "Beat's db-clean (`airflow db clean` on the workers, "
                          "[db-clean](../db-clean.md)): `0` = off; N > 0 cleans Airflow's "
                          "metadata tables of rows older than the database's now() minus N "
                          "days, archived, every `STATESWEEP_DB_CLEAN_SCHEDULE`.",
    "db_clean_tables": "The tables beat's db-clean cleans (comma-separated, as `airflow db "
                       "clean --tables`); empty: every table of the detected Airflow version.",
    "db_clean_schedule": "Beat's db-clean period: seconds or crontab (only with "
                         "`STATESWEEP_DB_CLEAN_KEEP_DAYS` > 0).",
    "orphan_soft_time_limit": "Soft time limit of the orphan sweep (its hard limit is 30 s "
                              "more); its batches commit on their own, so a sweep cut short "
                              "keeps its progress.",
    "log_format": "`console`, or `json` lines in production.",
    "log_level": "Log level: `DEBUG`, `INFO`, `WARNING` or `ERROR`.",
    "exporter_cache_seconds": "`statesweep exporter`: how long the backlog queries' result "
                              "and the workers' inspect answer are reused between scrapes "
                              "(`0` = every scrape).",
    "exporter_query_timeout_ms": "`statesweep exporter`: statement timeout of each backlog "
                                 "query; a query that hits it makes "
                                 "`statesweep_up{part=\"database\"}` 0, never a slow scrape.",
    "exporter_backlog_count": "`exact` counts expired rows over the `expires_at` index; "
                              "`estimate` takes PostgreSQL's planner estimate (for very large "
                              "tables; see [Monitoring](../monitor.md#the-exporter)).",
}

#: How an empty or zero default reads: the rule is off, or something else stands in.
UNSET: dict[str, str] = {
    "run_store_url": "(the result backend's Redis, else the broker's)",
    "active_hours": "(none: any hour)",
}


@dataclass(frozen=True)
class SettingDoc:
    field: str
    variable: str
    default: str  # as written in the table: `value`, or "(none…)" for an unset rule
    airflow: str  # Airflow's variable and airflow.cfg key it falls back to, or ""
    description: str


def settings_docs() -> list[SettingDoc]:
    from workers import airflow_config
    from workers.settings import AIRFLOW_FALLBACKS, PREFIX, setting_fields

    out = []
    for f in setting_fields():
        assert f.default is not MISSING, f.name
        value = f.default
        if value in ("", 0.0) and not isinstance(value, bool):
            default = UNSET.get(f.name, "(none)")
        else:
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            default = f"`{shown}`"
        airflow = ""
        if f.name in airflow_config.AIRFLOW_KEYS:
            section, key = airflow_config.AIRFLOW_KEYS[f.name]
            airflow = f"`{AIRFLOW_FALLBACKS[f.name.upper()]}`, `[{section}] {key}`"
        out.append(SettingDoc(f.name, PREFIX + f.name.upper(), default, airflow,
                              DESCRIPTIONS.get(f.name, "")))
    return out


def settings_page() -> str:
    rows = "\n".join(
        f"| `{s.variable}` | {s.default} | {s.airflow} | {s.description} |"
        for s in settings_docs())
    return f"""# Settings

<!-- Generated by docs/gen_reference.py from workers/settings.py: edit those, not this. -->

Every setting is an environment variable; how they are read, checked and shown is in
[Configuration](../configure.md), and where Airflow's own configuration stands in for one
in [Airflow's configuration](../airflow.md).

| Variable | Default | Falls back to (Airflow) | Meaning |
| --- | --- | --- | --- |
{rows}

The rules shown "(none)" are off while unset. The numeric ones (target chunk seconds, run
seconds, replica lag) must be positive when set: `0` is refused, naming the variable; unset it
to turn the rule off.
"""


# --- CLI -----------------------------------------------------------------------------------

# click's own cap on help width: what `--help` prints on any terminal at least this wide, and
# fixed, so the page does not depend on the terminal that built it.
HELP_WIDTH = 80


def cli_helps() -> list[tuple[str, str]]:
    """(command line, its --help text) for `statesweep` and every command under it."""
    from workers.cli import cli

    out: list[tuple[str, str]] = []

    def walk(cmd: click.Command, name: str, parent: click.Context | None) -> None:
        ctx = click.Context(cmd, info_name=name, parent=parent, terminal_width=HELP_WIDTH,
                            max_content_width=HELP_WIDTH)
        out.append((ctx.command_path, cmd.get_help(ctx)))
        if isinstance(cmd, click.Group):
            for sub in sorted(cmd.list_commands(ctx)):
                child = cmd.get_command(ctx, sub)
                if child is not None and not child.hidden:
                    walk(child, sub, ctx)

    walk(cli, "statesweep", None)
    return out


def cli_page() -> str:
    parts = ["# Command line\n",
             "<!-- Generated by docs/gen_reference.py from workers/cli/: edit those, not this. "
             "-->\n",
             "Each command's `--help`, as the installed `statesweep` prints it. What the "
             "commands are for, with their exit codes: [Command line](../cli.md).\n"]
    for path, text in cli_helps():
        parts.append(f"## `{path}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


# --- metrics -------------------------------------------------------------------------------

#: More than the exporter's one-line help says, by metric name as served.
METRIC_NOTES: dict[str, str] = {
    "statesweep_rows_deleted_total": "Expired task state (`task_state` / `task_state_store`) "
                                     "and orphaned asset state (`asset_state` / "
                                     "`asset_state_store`).",
    "statesweep_chunk_duration_seconds": "Buckets 5 ms … 300 s.",
    "statesweep_backlog_expired_rows": "At the database's clock.",
    "statesweep_last_run_state": "States `planning`, `running`, `finished`, `failed` (and the "
                                 "newest run's own, if another).",
    "statesweep_coordinator_schedule_seconds": "Absent for a crontab schedule.",
    "statesweep_workers": "`role` is `control` or `chunks`, `queue` the configured name.",
    "statesweep_up": "`part` is `run_store`, `database` or `workers`; 0 and an "
                     "`exporter_part_failed` log line if it failed. A failed part's metrics "
                     "are left out rather than shown stale.",
}


@dataclass(frozen=True)
class MetricDoc:
    name: str  # as served: a counter's with _total, a histogram's base name
    type: str
    labels: tuple[str, ...]
    help: str
    part: str  # the exporter part that serves it (run_store, database, workers, or always)
    samples: frozenset[str]  # every sample name (a histogram's _bucket, _sum, _count)


class _StandInRunStore:
    """What the collector reads of a run store: counters with a row for every family, one
    active run and a finished newest run, so every conditional family appears."""

    def __init__(self) -> None:
        import fakeredis

        from workers.metrics import metrics_key

        self.prefix = "statesweep"
        self.client = fakeredis.FakeRedis(decode_responses=True)
        self.client.hset(metrics_key(self.prefix), mapping={"rows_deleted:task_state": 1,
                                                               "db_clean_rows_deleted:log": 1})

    def active_run(self) -> str | None:
        return "run"

    def paused(self) -> None:
        return None

    def recent(self, n: int) -> list[Any]:
        from workers.runs import RunRecord

        return [RunRecord(run_id="run", state="finished", started_at=1.0, finished_at=2.0)]


def collect_families() -> Iterator[tuple[str, Any]]:
    """(part, family) for everything the exporter's collector yields, on stand-ins."""
    from workers.exporter import Backlog, StatesweepCollector, TimedCache
    from workers.settings import Settings

    collector = object.__new__(StatesweepCollector)  # __init__ would reach real services
    collector.settings = Settings()
    collector.registry = _StandInRunStore()  # type: ignore[assignment]
    collector.backlog = TimedCache(0, lambda: Backlog("task_state", 1, 1.0, "asset_state", 1,
                                                      1, 1.0))
    collector.consumers = TimedCache(0, lambda: {("control", "statesweep.control"): 1,
                                                 ("chunks", "statesweep.chunks"): 1})
    parts: dict[str, Callable[[], Iterator[Any]]] = {
        "run_store": collector._run_store, "database": collector._database,
        "workers": collector._workers}
    seen: set[str] = set()
    for part, read in parts.items():
        for family in read():
            seen.add(family.name)
            yield part, family
    for family in collector.collect():
        if family.name not in seen:
            yield "always", family


def exporter_metrics() -> list[MetricDoc]:
    out = []
    for part, family in collect_families():
        samples = frozenset(s.name for s in family.samples)
        labels = tuple(sorted({k for s in family.samples for k in s.labels} - {"le"}))
        name = family.name + "_total" if family.type == "counter" else family.name
        out.append(MetricDoc(name, family.type, labels, family.documentation, part, samples))
    return out


def served_metric_names() -> set[str]:
    """Every series name a PromQL query can select from the exporter."""
    return {s for m in exporter_metrics() for s in m.samples}


def metrics_page() -> str:
    from workers.metrics import CHUNK_SECONDS_BUCKETS

    rows = []
    for m in exporter_metrics():
        labels = "{" + ",".join(m.labels) + "}" if m.labels else ""
        note = METRIC_NOTES.get(m.name, "")
        text = f"{m.help}. {note}" if note else f"{m.help}."
        rows.append(f"| `{m.name}{labels}` | {m.type} | {m.part} | {text} |")
    buckets = ", ".join(f"{b:g}" for b in CHUNK_SECONDS_BUCKETS)
    table = "\n".join(rows)
    return f"""# Metrics

<!-- Generated by docs/gen_reference.py from workers/exporter.py: edit that, not this. -->

What `statesweep exporter` serves on `/metrics`, read at scrape time from the run store, the
database and the workers ([Monitoring](../monitor.md) says what each answers, and
`deploy/grafana/statesweep.json` charts them). *Part* is the one whose failure leaves the
metric out (`statesweep_up{{part=…}} 0`).

| Metric | Type | Part | What it tells |
| --- | --- | --- | --- |
{table}

`statesweep_chunk_duration_seconds` buckets (seconds): {buckets}, `+Inf`.
"""


# --- the home page -------------------------------------------------------------------------

def index_page() -> str:
    """README.md as the site's home page: its links into docs/ made relative to the site."""
    return re.sub(r"\]\(docs/", "](", (ROOT / "README.md").read_text())


PAGES: dict[str, Callable[[], str]] = {
    "index.md": index_page,
    "reference/settings.md": settings_page,
    "reference/cli.md": cli_page,
    "reference/metrics.md": metrics_page,
}


# --- MkDocs hook ---------------------------------------------------------------------------

def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for path, render in PAGES.items():
        files.append(File.generated(config, path, content=render()))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    # docs/design.md links the README as ../README.md (right on GitHub); on the site the README
    # is the home page.
    return markdown.replace("](../README.md)", "](index.md)")


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python docs/gen_reference.py OUTDIR")
    out = Path(argv[0])
    for path, render in PAGES.items():
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render())
        print(target)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1:])
