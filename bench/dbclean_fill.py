"""Airflow rows for bench.dbclean_compare, as INSERT … SELECT statements the server runs itself
(PostgreSQL's generate_series, MariaDB's sequence engine ``seq_1_to_N``): no row crosses the
client, so 2M task instances take seconds, not a client loop.

Sizes: d dags, r dag runs, k task instances per run, l log rows. Times spread from 90 days
before T to 30 days after it in a scattered order (i * prime % 120), so each table is cut in
many places. Every value derives from the row number (md5 for uuids), so two fills are equal.
Airflow 3.4 renamed task state's map_index to region_index and split xcom: xcom_v2 (by task
instance id) for every task instance, xcom_v1 (by legacy_task_data_owner) for a quarter of them;
3.4's other attempt tables, whose rows a task instance's or dag run's delete cascades to and
Airflow 3.4 archives, get rows too: rtif_v2 (a third of the task instances), task_instance_note
(an eleventh), rtif_v1 (an eighth, under legacy_task_data_owner) and dynamic_region (a tenth of
the dag runs).
"""

# ruff: noqa: S608 - the statements are built from this module's own constants and integers
from __future__ import annotations

T = "2026-06-01T00:00:00+00:00"


class Dialect:
    """The few spellings PostgreSQL and MariaDB disagree on."""

    def __init__(self, name: str) -> None:
        self.pg = name == "postgresql"

    def series(self, n: str, start: int = 1, step: int = 1) -> str:
        if self.pg:
            return f"generate_series({start}::bigint, {n}, {step}) AS g(i)"
        return f"(SELECT CAST(seq AS SIGNED) AS i FROM seq_{start}_to_{n}_step_{step}) AS g"

    def ts(self, days: str, seconds: str = "0") -> str:
        if self.pg:
            return (f"(TIMESTAMPTZ '{T}' + ({days}) * INTERVAL '1 day'"
                    f" + ({seconds}) * INTERVAL '1 second')")
        return (f"(TIMESTAMP'2026-06-01 00:00:00' + INTERVAL ({days}) DAY"
                f" + INTERVAL ({seconds}) SECOND)")

    def div(self, a: str, b: str) -> str:
        return f"(({a}) / ({b}))" if self.pg else f"(({a}) DIV ({b}))"

    def cat(self, *parts: str) -> str:
        return "(" + " || ".join(parts) + ")" if self.pg else f"CONCAT({', '.join(parts)})"

    def uuid(self, *parts: str) -> str:
        if self.pg:
            return f"md5({self.cat(*parts)})::uuid"
        # MariaDB's uuid type takes versions 1-5 with the RFC variant only: set both nibbles.
        return f"INSERT(INSERT(md5({self.cat(*parts)}), 13, 1, '4'), 17, 1, '8')"

    def binary_uuid(self, *parts: str) -> str:
        """A uuid where MariaDB keeps it as binary(16) (dynamic_region)."""
        return self.uuid(*parts) if self.pg else f"UNHEX(md5({self.cat(*parts)}))"

    def blob(self, hex_digits: str) -> str:
        return f"decode('{hex_digits}', 'hex')" if self.pg else f"UNHEX('{hex_digits}')"

    def pick(self, n: str, *choices: str) -> str:
        """The n-th (1-based) of *choices*, NULL allowed."""
        if self.pg:
            return f"(ARRAY[{', '.join(choices)}])[{n}]"
        return f"ELT({n}, {', '.join(choices)})"


def statements(dialect: str, version: str, d: int, r: int, k: int, l: int) -> list[str]:  # noqa: E741 - the sizes' names
    x = Dialect(dialect)
    v34 = version.startswith("3.4")
    key = '"key"' if x.pg else "`key`"  # a reserved word in MariaDB
    run_of = x.div("i - 1", str(k)) + " + 1"          # a task instance's dag run
    dag_of = x.cat("'dag_'", f"({x.div('i - 1', str(k))}) % {d} + 1")
    ti_uuid = x.uuid("i", "'ti'")
    out = [
        "INSERT INTO dag_bundle (name) VALUES ('b')",
        # A third of the dags parsed recently: only their versions are referenced by task
        # instances (a version still referenced cannot go, and a dag's delete cascades to them).
        f"""INSERT INTO dag (dag_id, is_paused, is_stale, bundle_name, timetable_type,
            partition_mapper_info, max_active_tasks, max_consecutive_failed_dag_runs,
            has_task_concurrency_limits, last_parsed_time)
           SELECT {x.cat("'dag_'", "i")}, false, false, 'b', 'cron', '{{}}', 16, 0, false,
                  {x.ts("((i % 3) - 2) * 30")} FROM {x.series(str(d))}""",
        f"""INSERT INTO dag_version (id, version_number, dag_id, created_at, last_updated)
           SELECT {x.uuid("i", "'v'")}, {x.div("i - 1", str(d))} + 1,
                  {x.cat("'dag_'", f"(i - 1) % {d} + 1")},
                  {x.ts(f"({x.div('i - 1', str(d))} - 2) * 20", "i")}, {x.ts("0")}
           FROM {x.series(str(3 * d))}""",
        f"""INSERT INTO dag_run (id, dag_id, run_id, run_type, run_after, start_date, state)
           SELECT i, {x.cat("'dag_'", f"(i - 1) % {d} + 1")}, {x.cat("'run_'", "i")},
                  CASE WHEN i % 10 = 0 THEN 'manual' ELSE 'scheduled' END,
                  {x.ts("(i * 7919 % 120) - 90", "i")},
                  CASE WHEN i % 50 = 0 THEN NULL ELSE {x.ts("(i * 7919 % 120) - 90", "i")} END,
                  'success'
           FROM {x.series(str(r))}""",
        f"""INSERT INTO task_instance (id, task_id, dag_id, run_id, try_number, pool,
            pool_slots, start_date, state, dag_version_id)
           SELECT {ti_uuid}, {x.cat("'t'", f"(i - 1) % {k}")}, {dag_of},
                  {x.cat("'run_'", run_of)}, 1, 'default_pool', 1,
                  CASE WHEN i % 13 = 0 THEN NULL ELSE {x.ts("(i * 104729 % 120) - 90")} END,
                  'success',
                  CASE WHEN (({x.div('i - 1', str(k))}) % {d} + 1) % 3 = 2 AND i % 5 = 0
                       THEN {x.uuid(f"({x.div('i - 1', str(k))}) % {d} + 1", "'v'")} END
           FROM {x.series(f"{r * k}")}""",
    ]
    if v34:
        out += [
            f"""INSERT INTO xcom_v2 (id, task_instance_id, {key}, timestamp, value)
               SELECT {x.uuid("i", "'x'")}, {ti_uuid}, 'return_value',
                      {x.ts("(i * 31337 % 120) - 90")}, '1'
               FROM {x.series(f"{r * k}")}""",
            f"""INSERT INTO legacy_task_data_owner (dag_id, task_id, run_id, map_index,
                task_instance_id)
               SELECT {dag_of}, {x.cat("'t'", f"(i - 1) % {k}")}, {x.cat("'run_'", run_of)},
                      -1, {ti_uuid}
               FROM {x.series(f"{r * k}", 1, 4)}""",
            f"""INSERT INTO xcom_v1 (dag_run_id, task_id, map_index, {key}, dag_id, run_id,
                timestamp, value)
               SELECT {run_of}, {x.cat("'t'", f"(i - 1) % {k}")}, -1, 'return_value',
                      {dag_of}, {x.cat("'run_'", run_of)},
                      {x.ts("(i * 7331 % 120) - 90")}, '1'
               FROM {x.series(f"{r * k}", 1, 4)}""",
            f"""INSERT INTO rtif_v2 (id, task_instance_id, rendered_fields)
               SELECT {x.uuid("i", "'rt'")}, {ti_uuid}, '{{}}'
               FROM {x.series(f"{r * k}", 3, 3)}""",
            f"""INSERT INTO task_instance_note (ti_id, content, created_at, updated_at)
               SELECT {ti_uuid}, 'n', {x.ts("0")}, {x.ts("0")}
               FROM {x.series(f"{r * k}", 11, 11)}""",
            f"""INSERT INTO rtif_v1 (dag_id, task_id, run_id, map_index, rendered_fields)
               SELECT {dag_of}, {x.cat("'t'", f"(i - 1) % {k}")}, {x.cat("'run_'", run_of)},
                      -1, '{{}}'
               FROM {x.series(f"{r * k}", 1, 8)}""",
            f"""INSERT INTO dynamic_region (id, dag_id, run_id, node_id, family_root_id, path,
                created_at)
               SELECT {x.binary_uuid("i", "'dr'")}, {x.cat("'dag_'", f"(i - 1) % {d} + 1")},
                      {x.cat("'run_'", "i")}, 'n', {x.binary_uuid("i", "'fr'")},
                      {x.blob("70")}, {x.ts("0")}
               FROM {x.series(str(r), 10, 10)}"""]
    else:
        out.append(
            f"""INSERT INTO xcom (dag_run_id, task_id, map_index, {key}, dag_id, run_id,
                timestamp, value)
               SELECT {run_of}, {x.cat("'t'", f"(i - 1) % {k}")}, -1, 'return_value',
                      {dag_of}, {x.cat("'run_'", run_of)},
                      {x.ts("(i * 31337 % 120) - 90")}, '1'
               FROM {x.series(f"{r * k}")}""")
    index = "region_index" if v34 else "map_index"
    out += [
        f"""INSERT INTO task_reschedule (ti_id, start_date, end_date, duration, reschedule_date)
           SELECT {ti_uuid}, {x.ts("(i * 613 % 120) - 90")}, {x.ts("(i * 613 % 120) - 90")}, 1,
                  {x.ts("(i * 613 % 120) - 90")}
           FROM {x.series(f"{r * k}", 7, 7)}""",
        f"""INSERT INTO task_state_store (dag_run_id, task_id, {index}, {key}, dag_id, run_id,
            value, updated_at, expires_at)
           SELECT {x.div("i - 1", "2")} + 1, 't0', -1, {x.cat("'k'", "i % 2")},
                  {x.cat("'dag_'", f"({x.div('i - 1', '2')}) % {d} + 1")},
                  {x.cat("'run_'", x.div("i - 1", "2") + " + 1")}, 'v', {x.ts("0")},
                  CASE WHEN i % 10 = 0 THEN NULL ELSE {x.ts("(i * 17 % 120) - 90")} END
           FROM {x.series(str(2 * r))}""",
        f"""INSERT INTO log (dttm, dag_id, event)
           SELECT {x.ts("(i * 31 % 120) - 90", "i")}, {x.cat("'dag_'", f"i % {d} + 1")}, 'e'
           FROM {x.series(str(l))}""",
        f"""INSERT INTO job (dag_id, latest_heartbeat, state, job_type)
           SELECT CASE WHEN i % 4 = 0 THEN NULL ELSE {x.cat("'dag_'", f"i % {d} + 1")} END,
                  {x.ts("(i * 37 % 120) - 90")}, 'success', 'Job'
           FROM {x.series(str(r))}""",
        # Callbacks in every state Airflow knows and NULL; some scheduled ones have a deadline.
        f"""INSERT INTO callback (id, type, fetch_method, data, priority_weight, state,
            created_at)
           SELECT {x.uuid("i", "'cb'")}, 'triggerer', 'import_path', '{{}}', 1,
                  {x.pick("i % 7 + 1", "'success'", "'failed'", "'running'", "'scheduled'",
                          "NULL", "'pending'", "'queued'")},
                  {x.ts("(i * 41 % 120) - 90")}
           FROM {x.series(str(r // 3))}""",
        f"""INSERT INTO deadline (id, created_at, last_updated_at, dagrun_id, deadline_time,
            missed, callback_id)
           SELECT {x.uuid("i", "'dl'")}, {x.ts("0")}, {x.ts("0")}, i % {r} + 1,
                  {x.ts("(i * 43 % 120) - 90")}, false, {x.uuid("i", "'cb'")}
           FROM {x.series(str(r // 3))} WHERE i % 7 = 3 AND i % 2 = 0""",
        f"""INSERT INTO import_error (timestamp, filename)
           SELECT {x.ts("(i * 47 % 120) - 90")}, {x.cat("'f'", "i")}
           FROM {x.series(str(r // 20))}""",
        f"""INSERT INTO revoked_token (jti, exp)
           SELECT md5({x.cat("i", "'jti'")}), {x.ts("(i * 53 % 120) - 90")}
           FROM {x.series(str(r // 4))}""",
    ]
    return out
