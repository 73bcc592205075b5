"""Where cleanup runs are recorded, their in-flight window kept, and the single-flight lock lives.

Redis in every real deployment, so the CLI, Flower users and every worker on every host see the
same runs. ``memory://`` (the zero-service demo, coordinator and worker in one process) runs the
very same Lua scripts on an in-process Redis (fakeredis), so there is one implementation.

Keys (``<prefix>`` from STATESWEEP_KEY_PREFIX):
  <prefix>:lock                 the active run's id; TTL renewed by every finished chunk and pump
  <prefix>:pause                hash by/reason/at/until while paused (TTL = until, if given)
  <prefix>:run:<id>             hash: state, cutoff, plan (kind, cursor, end, size), counts, times
  <prefix>:run:<id>:inflight    hash chunk number -> "lo:hi|sent_at|c" (cut), "|s" (sent),
                                "|t" (taken by a worker) or "|p" (parked), and "|n" resends
                                since a worker last took it: the window; a chunk message must
                                match its entry
  <prefix>:run:<id>:claim       the token of the coordinator delivery planning the run (TTL of
                                the lock): only it may fail the run before it starts
  <prefix>:run:<id>:planner     that delivery's heartbeat while it plans (BEAT_TTL_SECONDS):
                                once it lapses the pump sends the coordinator again (REPLAN)
  <prefix>:run:<id>:replan      one such resend per REPLAN_EVERY_SECONDS, whoever pumps
  <prefix>:run:<id>:commit:<n>  chunk n's commit notes: "<xid>:<rows>" -> rows, written just
                                before each of its DELETEs commits (PostgreSQL), removed by the
                                FINISH that counts it: a chunk whose worker died between its
                                COMMIT and its FINISH is counted by the copy sent again
  <prefix>:current              the run that took the lock last: when the lock passes on, that
                                run (its lock lapsed) ends in the same step
  <prefix>:runs                 sorted set of run ids by start time, for `status`
  <prefix>:triggers             hash: the last trigger of each outcome (for `doctor`)
  <prefix>:triggers:failed      list: the latest failed triggers, newest first (for `status`)
  <prefix>:triggers:beat        list: times of the latest beat triggers (a second beat shows)
  <prefix>:sweep:<id>           hash: one orphan sweep (state, rows, batches, error, times)
  <prefix>:sweeps               sorted set of sweep ids by start time
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from workers import runs_lua
from workers.metrics import metrics_key
from workers.planners.base import EXPIRY, ChunkRange, Plan

RUN_RETENTION_SECONDS = 7 * 24 * 3600
RECENT_RUNS_KEPT = 200
RECENT_TRIGGERS_KEPT = 20
# How long a coordinator message's id keeps the run id it was given: far longer than any
# redelivery of it (visibility timeout, a broker outage).
DELIVERY_TTL_SECONDS = 24 * 3600

# A running chunk's heartbeat: BEGIN sets it, its worker renews it every BEAT_EVERY_SECONDS, and
# it lapses BEAT_TTL_SECONDS after the worker died, when the next top-up sends the chunk again.
BEAT_TTL_SECONDS = 6
BEAT_EVERY_SECONDS = 2.0
ENDED = ("finished", "failed", "aborted", "skipped")
# A run left in planning by a dead coordinator is sent again at most once per this period (the
# resent coordinator's first step beats, so a live one is never resent).
REPLAN_EVERY_SECONDS = 15


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    state: str  # queued | planning | running | finished | failed | aborted | skipped
    cutoff: str = ""
    batch_size: int = 0
    source: str = ""
    planner: str = ""
    planner_reason: str = ""
    kind: str = ""
    start: int = 0
    # Where the plan ends and where the next chunk is cut from: units as text, or a cut
    # kind's key (an expiry key is "micros.id"; "" = open).
    end: str = ""
    cursor: str = ""
    size: int = 0
    chunks_planned: int = 0
    chunks_done: int = 0
    expected_rows: int = 0
    rows_deleted: int = 0
    chunks_failed: int = 0
    planning_done: bool = False
    # What the run is narrowed to (workers.selection, encoded; "" = everything expired).
    selection: str = ""
    # The database the run cleans, as its server names it (workers.identity; "" before).
    database: str = ""
    # Expired rows kept at planning because their dag run was queued or running, and when the
    # oldest of them expired (ISO-8601; "" when none).
    protected_rows: int = 0
    protected_oldest: str = ""
    held: str = ""
    held_since: float = 0.0
    holds: int = 0
    # Chunk messages sent again (lost, unconsumed, or their worker died), over the whole run.
    resends: int = 0
    # Coordinator messages sent again because the one planning the run died (REPLAN).
    replans: int = 0
    # Chunks waiting to retry a transient error (the database or broker away): how many times,
    # the latest error and when, so `--wait` and `status` say why a run does not move.
    retries: int = 0
    retry_error: str = ""
    retry_at: float = 0.0
    started_at: float = 0.0
    planned_at: float = 0.0
    window_started_at: float = 0.0
    last_progress_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""

    @property
    def duration(self) -> float:
        end = self.finished_at or time.time()
        return max(0.0, end - self.started_at) if self.started_at else 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows_deleted / self.duration if self.duration > 0 else 0.0

    @property
    def estimated_chunks(self) -> int:
        """Chunks cut so far plus those the rest of the plan would make at the current size."""
        if self.planning_done or self.size <= 0:
            return self.chunks_planned
        if self.kind == EXPIRY:
            return max(self.chunks_planned + 1, -(-self.expected_rows // self.size))
        return self.chunks_planned + max(1, -(-(int(self.end) - int(self.cursor)) // self.size))

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def phase(self) -> str:
        """Where the run is in its one state machine (docs/design.md): a running run whose
        plan is cut to its end is ``finishing`` (its window drains), stored as running with
        planning_done, so every reader of ``running`` stays right."""
        return "finishing" if self.state == "running" and self.planning_done else self.state

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["duration"] = round(self.duration, 3)
        d["rows_per_second"] = round(self.rows_per_second, 1)
        d["estimated_chunks"] = self.estimated_chunks
        d["phase"] = self.phase
        return d

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> RunRecord:
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in h or h[f.name] == "" and f.type != "str":
                continue
            v = h[f.name]
            kw[f.name] = (v == "1" if f.type == "bool" else int(float(v)) if f.type == "int"
                          else float(v) if f.type == "float" else v)
        return cls(**kw)


@dataclass(frozen=True)
class Window:
    """What a step that may top up the window returns: the chunks to send now, the room the
    caller must fill by cutting walk or expiry chunks, and why the run is held (empty = not
    held)."""

    chunks: list[tuple[int, ChunkRange]] = field(default_factory=list)
    cut_room: int = 0
    held: str = ""
    new_hold: bool = False  # this step started a hold episode: log it, once
    finished: RunRecord | None = None
    lost: bool = False  # the run's lock no longer names it: nothing was applied
    # Rows the FINISH step counted: its rows less those of commit notes counted before.
    counted_rows: int = 0


@dataclass(frozen=True)
class Taken:
    """What a coordinator delivery's PLAN step found: outcome ``taken`` (detail: the run's state
    before, '' if new), ``held`` (detail: the run holding the lock), ``ended`` (the run's final
    state) or ``gated`` (why no new run may start)."""

    outcome: str
    detail: str


@dataclass(frozen=True)
class Pause:
    by: str
    reason: str
    at: float
    until: float  # 0 = until resumed

    def as_dict(self) -> dict[str, Any]:
        return {"by": self.by, "reason": self.reason, "at": self.at, "until": self.until}


@dataclass(frozen=True)
class Gate:
    """What the caller knows of flow control that the run store does not: a closed active-hours
    window (or replica lag) as a reason, and the run-time budget. Pause lives in the store."""

    external: str = ""
    max_run_seconds: float = 0


class RunStore:
    """The run store on one Redis client (real, or fakeredis for ``memory://``)."""

    def __init__(self, client: Any, prefix: str = "statesweep",
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.prefix = prefix
        # The time every step is judged by (sent_at, resend periods, run-time budgets); a test
        # moves it to play out an hour in a second. Key TTLs stay Redis's own clock.
        self.clock = clock
        self._scripts = {name: client.register_script(getattr(runs_lua, name)) for name in (
            "PLAN", "START", "BEGIN", "PARK", "FINISH", "PUMP", "CUT", "ABORT", "ENQUEUE",
            "RENEW", "RELEASE", "CLOSE_QUEUED", "SHRINK", "RATE", "FAIL", "REQUEUE", "CONFIRM",
            "PLAN_BEAT", "REPLAN")}

    # --- keys -----------------------------------------------------------------------------

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def run_id_for_delivery(self, message_id: str, fresh: str) -> str:
        """The run id of a coordinator message whose sender named none (beat, ``celery call``,
        Flower's API): *fresh*, of the one format the CLI's ids have, kept for the message's
        id so that every redelivery of that message resumes the same run."""
        key = self._k("delivery", message_id)
        self.client.set(key, fresh, nx=True, ex=DELIVERY_TTL_SECONDS)
        return str(self.client.get(key) or fresh)

    def _run_keys(self, run_id: str) -> list[str]:
        return [self._k("run", run_id), self._k("run", run_id, "inflight")]

    def _beat_key(self, run_id: str, chunk: int | str) -> str:
        return self._k("run", run_id, "beat", str(chunk))

    def _beats(self, run_id: str) -> tuple[list[str], list[str]]:
        """The heartbeat keys of the chunks in the run's window, and their numbers (a step
        reads which are alive itself; a chunk taken after this read is judged by time)."""
        numbers = [str(n) for n in self.client.hkeys(self._k("run", run_id, "inflight"))]
        return [self._beat_key(run_id, n) for n in numbers], numbers

    def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._scripts[name](keys=keys, args=args)

    # --- the single-flight lock -----------------------------------------------------------

    def take(self, run_id: str, ttl: int, token: str = "", *, source: str = "",
             external: str = "", request: str = "") -> Taken:
        """One step (PLAN): take the lock for *run_id* (or find it *run_id*'s already), ending
        the run that let it lapse before. With a *token* (one per coordinator delivery) the run
        moves to ``planning`` and the delivery claims it (only the claimant may fail it before
        it starts, see fail()), unless it has ended, or no new run may start: paused, or
        *external* (a closed active-hours window) says why. The claimant's planner beats from
        this step on (plan_beat()); a claim whose planner stopped beating passes to this
        delivery. *request* (the coordinator's arguments, JSON) is kept for replan()."""
        for _ in range(5):
            prev = str(self.client.get(self._k("current")) or "")
            r = self._call("PLAN", [
                self._k("lock"), self._k("run", run_id), self._k("run", run_id, "claim"),
                self._k("runs"), self._k("current"), self._k("pause"),
                *self._run_keys(prev or run_id), self._k("run", run_id, "planner")],
                [run_id, ttl, token, self.clock(), RUN_RETENTION_SECONDS, "1" if token else "0",
                 prev, external, source, request, BEAT_TTL_SECONDS])
            if r[0] != "retry":
                return Taken(str(r[0]), str(r[1]))
        return Taken("held", "unknown")

    def acquire(self, run_id: str, ttl: int, token: str = "") -> str | None:
        """Take the lock for *run_id*; None on success (or if *run_id* holds it already), else
        what kept it: the run id that holds it (see take())."""
        taken = self.take(run_id, ttl, token)
        return None if taken.outcome == "taken" else taken.detail

    def claimant(self, run_id: str) -> str | None:
        """The token of the coordinator delivery that claimed *run_id*'s planning, if any."""
        v = self.client.get(self._k("run", run_id, "claim"))
        return str(v) if v else None

    def plan_beat(self, run_id: str, token: str) -> bool:
        """The delivery holding *run_id*'s planning claim (*token*) is alive and planning; False
        if the claim passed to another delivery (this one had stalled past the heartbeat)."""
        return bool(self._call("PLAN_BEAT", [self._k("run", run_id, "claim"),
                                             self._k("run", run_id, "planner")],
                               [token, BEAT_TTL_SECONDS]))

    def replan(self, run_id: str, every: int = REPLAN_EVERY_SECONDS) -> str | None:
        """The coordinator arguments (JSON) to send again for *run_id*, left in planning by a
        coordinator whose heartbeat lapsed while it holds the lock; None when it needs none
        (alive, no longer planning, its lock gone, sent already this period)."""
        r = self._call("REPLAN", [self._k("run", run_id), self._k("lock"),
                                  self._k("run", run_id, "planner"),
                                  self._k("run", run_id, "replan")], [run_id, every])
        return str(r[1]) if r[0] == "replan" else None

    def renew(self, run_id: str, ttl: int) -> bool:
        return bool(self._call("RENEW", [self._k("lock")], [run_id, ttl]))

    def release(self, run_id: str, token: str = "") -> None:
        """Free the lock if *run_id* holds it (and the caller's own planning claim)."""
        self._call("RELEASE", [self._k("lock"), self._k("run", run_id, "claim")],
                   [run_id, token])

    def active_run(self) -> str | None:
        v = self.client.get(self._k("lock"))
        return str(v) if v else None

    def lock_ttl(self) -> int:
        return int(self.client.ttl(self._k("lock")))

    # --- a run's life ---------------------------------------------------------------------

    def enqueue(self, run_id: str, source: str) -> bool:
        """Record *run_id* as queued the moment it is sent; False if the id is taken."""
        return bool(self._call("ENQUEUE", [self._k("run", run_id), self._k("runs")],
                               [run_id, self.clock(), source, RUN_RETENTION_SECONDS]))

    def start(self, run_id: str, plan: Plan, *, cutoff: str, batch_size: int, source: str,
              window: int, lock_ttl: int, resend_after: float, gate: Gate,
              selection: str = "") -> Window | str:
        """Write the plan and cut the first window, atomically, while holding the lock.
        Returns the window, or the state of a run that already has this id."""
        # A cut kind's plan starts at a key and has no numeric end: the last cut ends it.
        start, end = (plan.cursor, "") if plan.cursor else (plan.start, plan.end)
        r = self._call("START", [*self._run_keys(run_id), self._k("lock"), self._k("pause"),
                                 self._k("runs")],
                       [run_id, self.clock(), cutoff, batch_size, source, plan.planner,
                        plan.reason[:500], plan.kind, start, end, max(1, plan.size),
                        plan.expected_rows, window, lock_ttl, resend_after, gate.external,
                        gate.max_run_seconds, RUN_RETENTION_SECONDS, plan.max_size,
                        selection])
        if r[0] == "lost":
            return "lock lost"
        if r[0] == "exists":
            return str(r[1])
        self.client.zremrangebyrank(self._k("runs"), 0, -RECENT_RUNS_KEPT - 1)
        return self._window(run_id, plan.kind, r[1:])

    def _window(self, run_id: str, kind: str, r: list[Any]) -> Window:
        finished, room, held, new_hold, *flat = r
        chunks = [(int(flat[i]), ChunkRange.decode(kind, str(flat[i + 1])))
                  for i in range(0, len(flat), 2)]
        return Window(chunks, int(room), str(held), bool(new_hold),
                      self.get(run_id) if finished else None)

    def begin_chunk(self, run_id: str, chunk: int, rng: ChunkRange,
                    gate: Gate) -> tuple[str, list[Any]]:
        """Check a chunk message against the run's window before its DELETE. Returns (status,
        details): ok [cutoff, size, batch, max_size, selection], held [reason, new_episode],
        duplicate, ended [state], unknown, forged [planned range], lost [the lock's holder, or
        '' when nobody holds it]: the run no longer holds its lock, nothing is applied."""
        r = self._call("BEGIN", [*self._run_keys(run_id), self._k("pause"), self._k("lock"),
                                 self._beat_key(run_id, chunk)],
                       [chunk, rng.encode(), self.clock(), gate.external, gate.max_run_seconds,
                        rng.kind, run_id, BEAT_TTL_SECONDS])
        return str(r[0]), list(r[1:])

    def beat(self, run_id: str, chunk: int) -> None:
        """The running chunk's worker is alive (its heartbeat, renewed)."""
        self.client.set(self._beat_key(run_id, chunk), "1", ex=BEAT_TTL_SECONDS)

    def confirm(self, run_id: str, chunks: list[int]) -> None:
        """These chunks' messages are published: until then a chunk is only cut, and one left
        so for seconds (its publisher died between the cut and the publish) is sent again."""
        if chunks:
            self._call("CONFIRM", [self._k("run", run_id, "inflight")], chunks)

    def requeue(self, run_id: str, chunk: int, error: str = "") -> bool:
        """A chunk a worker took waits for its retry (a new message, with a countdown): it is
        sent, no longer running, so its missing heartbeat is no death. *error* (the transient
        error it retries) goes on the run's record with a count of retries."""
        return bool(self._call("REQUEUE", [self._k("run", run_id, "inflight"),
                                           self._k("run", run_id)],
                               [chunk, self.clock(), error[:200]]))

    def park(self, run_id: str, chunk: int, reason: str) -> bool:
        """Hold a chunk that stopped before its DELETE; True if this starts a hold episode."""
        return bool(self._call("PARK", [*self._run_keys(run_id), self._k("lock")],
                               [chunk, reason, self.clock(), run_id]))

    def finish_chunk(self, run_id: str, chunk: int, kind: str, rows: int, units: int, *,
                     lock_ttl: int, window: int, resend_after: float, gate: Gate,
                     new_size: int = 0, error: str = "", seconds: float | None = None,
                     table: str = "", notes: tuple[str, ...] = ()) -> tuple[bool, Window]:
        """Count a chunk once (rows, or *error* for one that failed for good), with its
        metrics (*table*'s rows, the *seconds* it took), and top up the window, in one atomic
        step. Returns (counted, window); window.lost when the run no longer holds its lock
        (nothing applied). *rows* includes those of the commit *notes* named (note_commit()):
        a note counted by another step already comes off them."""
        beat_keys, numbers = self._beats(run_id)
        r = self._call("FINISH", [*self._run_keys(run_id), self._k("lock"), self._k("pause"),
                                  metrics_key(self.prefix), self._notes_key(run_id, chunk),
                                  *beat_keys],
                       [run_id, chunk, rows, self.clock(), lock_ttl, window, resend_after,
                        gate.external, gate.max_run_seconds, new_size, units, error[:500],
                        "" if seconds is None else seconds, table, ",".join(notes),
                        *numbers])
        if int(r[0]) == -2:
            return False, Window(lost=True)
        return int(r[0]) == 1, replace(self._window(run_id, kind, r[2:]),
                                       counted_rows=int(r[1]))

    def _notes_key(self, run_id: str, chunk: int) -> str:
        return self._k("run", run_id, "commit", str(chunk))

    def note_commit(self, run_id: str, chunk: int, xid: int,
                    rows: int) -> tuple[str, dict[str, int]]:
        """Record, just before its COMMIT, that transaction *xid* deletes *rows* of *chunk*;
        returns the note's name, for finish_chunk(), and the chunk's notes not counted yet
        (commit_notes(), read in the same round trip)."""
        note = f"{xid}:{rows}"
        key = self._notes_key(run_id, chunk)
        pipe = self.client.pipeline()
        pipe.hset(key, note, rows)
        pipe.expire(key, RUN_RETENTION_SECONDS)
        pipe.hgetall(key)
        notes = pipe.execute()[2]
        return note, {k: int(v) for k, v in notes.items()}

    def commit_notes(self, run_id: str, chunk: int) -> dict[str, int]:
        """*chunk*'s notes not counted yet: name -> rows."""
        return {k: int(v) for k, v in self.client.hgetall(self._notes_key(run_id, chunk)).items()}

    def drop_note(self, run_id: str, chunk: int, note: str) -> None:
        """A note whose transaction rolled back (it deleted nothing)."""
        self.client.hdel(self._notes_key(run_id, chunk), note)

    def pump(self, run_id: str, kind: str, *, lock_ttl: int, window: int, resend_after: float,
             gate: Gate, new_budget: bool = False) -> Window | None:
        """Top up a running run's window (parked, lost and new chunks); None if it has ended,
        a Window with ``lost`` if its lock no longer names it (nothing applied). *new_budget*
        restarts its STATESWEEP_MAX_RUN_SECONDS clock."""
        beat_keys, numbers = self._beats(run_id)
        r = self._call("PUMP", [*self._run_keys(run_id), self._k("lock"), self._k("pause"),
                                *beat_keys],
                       [run_id, self.clock(), lock_ttl, window, resend_after, gate.external,
                        gate.max_run_seconds, "1" if new_budget else "0", *numbers])
        if r[0] == "ended":
            return None
        if r[0] == "lost":
            return Window(lost=True)
        return self._window(run_id, kind, r[1:])

    def cut(self, run_id: str, cursor: str, rng: ChunkRange, next_cursor: str | None,
            window: int) -> int:
        """Claim the chunk *rng* cut at *cursor* (a walk or expiry chunk); 0 if another process
        cut there first, -1 if *window* chunks are in flight already, -2 if the run no longer
        holds its lock. *next_cursor* None: *rng* was the plan's last chunk."""
        return int(self._call("CUT", [*self._run_keys(run_id), self._k("lock")], [
            cursor, rng.encode(), "" if next_cursor is None else next_cursor, self.clock(),
            window, run_id]))

    def note_protected(self, run_id: str, rows: int, oldest: str) -> None:
        """Record what a run found kept for unfinished dag runs (read once, at planning)."""
        self.client.hset(self._k("run", run_id),
                         mapping={"protected_rows": rows, "protected_oldest": oldest})

    def note_database(self, run_id: str, identity: str) -> None:
        """Record which database the run cleans, once its coordinator took it to plan."""
        self.client.hset(self._k("run", run_id), "database", identity[:500])

    def abort(self, run_id: str, why: str) -> str:
        """End a queued or running run now: 'aborted', or the state it had already ended in.
        The lock is freed only if it names *run_id*."""
        return str(self._call("ABORT", [*self._run_keys(run_id), self._k("lock"),
                                        self._k("run", run_id, "claim")],
                              [run_id, self.clock(), why[:500]]))

    def close_queued(self, run_id: str, why: str) -> bool:
        """A queued run its trigger did not start (another run active, paused, outside active
        hours) ends 'skipped', saying why; True if it was queued."""
        return bool(self._call("CLOSE_QUEUED", [self._k("run", run_id)],
                               ["skipped", why[:500], self.clock()]))

    def shrink(self, run_id: str) -> None:
        """Halve the run's chunk size for the chunks cut from now on (while it holds its
        lock)."""
        self._call("SHRINK", [self._k("run", run_id), self._k("lock")], [run_id])

    def fail(self, run_id: str, error: str, *, started: bool = False, token: str = "") -> str:
        """Mark a run failed and free its lock, in one compare-and-set step on its owner: a
        run not started yet fails for the coordinator delivery that claimed it (*token*), or
        for anyone if none did; a running one only for the process that *started* it, while
        its lock names it or has lapsed. The lock is freed only if it names *run_id*. Returns
        the run's state afterwards: 'failed', or what refused the change (the state of a run
        this caller does not own, 'planning' for a run another delivery is planning)."""
        # run_id too: a run can fail before its plan was written (the database was down).
        return str(self._call("FAIL", [self._k("run", run_id), self._k("lock"), self._k("runs"),
                                       self._k("run", run_id, "claim"),
                                       self._k("run", run_id, "inflight")],
                              [run_id, error[:500], self.clock(), RUN_RETENTION_SECONDS,
                               "1" if started else "0", token]))

    # --- reading ------------------------------------------------------------------------------

    def get(self, run_id: str) -> RunRecord | None:
        h = self.client.hgetall(self._k("run", run_id))
        return RunRecord.from_hash(h) if h else None

    def inflight(self, run_id: str) -> list[tuple[int, ChunkRange, float, bool]]:
        """(chunk, range, sent_at, parked) of each chunk in the run's window."""
        record = self.get(run_id)
        kind = record.kind if record else ""
        out = []
        for n, v in self.client.hgetall(self._k("run", run_id, "inflight")).items():
            rng, sent, st = v.split("|")[:3]  # a fourth part counts the chunk's resends
            out.append((int(n), ChunkRange.decode(kind, rng), float(sent), st == "p"))
        return sorted(out)

    def recent(self, limit: int = 10) -> list[RunRecord]:
        ids = self.client.zrevrange(self._k("runs"), 0, limit - 1)
        return [r for r in (self.get(i) for i in ids) if r is not None]

    def rate_slot(self, per_second: float) -> float:
        """Reserve the next chunk start under STATESWEEP_CHUNK_RATE_LIMIT (all workers share
        it); returns the seconds to wait for that slot."""
        return float(self._call("RATE", [self._k("rate")], [self.clock(), 1.0 / per_second]))

    # --- pause and triggers -------------------------------------------------------------------

    def pause(self, by: str, reason: str, seconds: float | None) -> Pause:
        now = self.clock()
        until = now + seconds if seconds else 0.0
        key = self._k("pause")
        pipe = self.client.pipeline()
        pipe.delete(key)
        pipe.hset(key, mapping={"by": by, "reason": reason, "at": now, "until": until})
        if seconds:
            pipe.pexpire(key, max(1, int(seconds * 1000)))
        pipe.execute()
        return Pause(by, reason, now, until)

    def resume(self) -> Pause | None:
        """Lift the pause; returns what it was, or None if nothing was paused."""
        pipe = self.client.pipeline()
        pipe.hgetall(self._k("pause"))
        pipe.delete(self._k("pause"))
        h, _ = pipe.execute()
        return _pause(h)

    def paused(self) -> Pause | None:
        return _pause(self.client.hgetall(self._k("pause")))

    def note_trigger(self, outcome: str, run_id: str, source: str, detail: str = "") -> None:
        """Remember the last trigger of each outcome (started, skipped, paused, failed, …),
        the latest failures with their error, and when beat last triggered (one pipeline)."""
        now = self.clock()
        entry = f"{now}|{run_id}|{source}|{detail[:300]}"
        pipe = self.client.pipeline()
        pipe.hset(self._k("triggers"), outcome, entry)
        if outcome == "failed":
            pipe.lpush(self._k("triggers", "failed"), entry)
            pipe.ltrim(self._k("triggers", "failed"), 0, RECENT_TRIGGERS_KEPT - 1)
        if source == "beat":
            pipe.lpush(self._k("triggers", "beat"), now)
            pipe.ltrim(self._k("triggers", "beat"), 0, RECENT_TRIGGERS_KEPT - 1)
        pipe.execute()

    def failed_triggers(self, limit: int = RECENT_TRIGGERS_KEPT) -> list[tuple[float, str, str,
                                                                              str]]:
        """(at, run_id, source, error) of the latest failed triggers, newest first."""
        out = []
        for v in self.client.lrange(self._k("triggers", "failed"), 0, limit - 1):
            at, run_id, source, detail = v.split("|", 3)
            out.append((float(at), run_id, source, detail))
        return out

    def beat_trigger_times(self) -> list[float]:
        """When beat's latest coordinator triggers arrived, newest first."""
        return [float(v) for v in self.client.lrange(self._k("triggers", "beat"), 0, -1)]

    # --- orphan sweeps ----------------------------------------------------------------------

    def record_sweep(self, sweep_id: str, state: str, **fields_: Any) -> None:
        """Write (or update) orphan sweep *sweep_id*: state queued | running | finished |
        cut_short | retrying | failed, and rows, batches, seconds, error as given."""
        key = self._k("sweep", sweep_id)
        now = self.clock()
        pipe = self.client.pipeline()
        pipe.hsetnx(key, "started_at", now)
        pipe.hset(key, mapping={"sweep_id": sweep_id, "state": state, "updated_at": now,
                                **{k: str(v)[:500] for k, v in fields_.items()}})
        pipe.expire(key, RUN_RETENTION_SECONDS)
        pipe.zadd(self._k("sweeps"), {sweep_id: now}, nx=True)
        pipe.zremrangebyrank(self._k("sweeps"), 0, -RECENT_RUNS_KEPT - 1)
        pipe.execute()

    def get_sweep(self, sweep_id: str) -> dict[str, Any] | None:
        h = self.client.hgetall(self._k("sweep", sweep_id))
        if not h:
            return None
        out: dict[str, Any] = dict(h)
        for name in ("rows", "batches"):
            out[name] = int(h.get(name) or 0)
        for name in ("seconds", "started_at", "updated_at"):
            out[name] = float(h.get(name) or 0)
        return out

    def recent_sweeps(self, limit: int = 5) -> list[dict[str, Any]]:
        ids = self.client.zrevrange(self._k("sweeps"), 0, limit - 1)
        return [s for s in (self.get_sweep(i) for i in ids) if s is not None]

    def triggers(self) -> dict[str, tuple[float, str, str, str]]:
        out = {}
        for outcome, v in self.client.hgetall(self._k("triggers")).items():
            at, run_id, source, detail = v.split("|", 3)
            out[outcome] = (float(at), run_id, source, detail)
        return out


def _pause(h: dict[str, str]) -> Pause | None:
    if not h:
        return None
    return Pause(h.get("by", ""), h.get("reason", ""), float(h.get("at", 0)),
                 float(h.get("until", 0)))


#: The name the rest of the code uses for the run store's interface.
RunRegistry = RunStore

_stores: dict[tuple[str, str], RunStore] = {}
_memory_server: Any = None


def registry_for(url: str, prefix: str) -> RunStore:
    """The run store for a URL: ``memory://`` (one in-process Redis per process) or Redis."""
    key = (url, prefix)
    if key not in _stores:
        client: Any
        if url.startswith("memory://"):
            global _memory_server
            import fakeredis

            _memory_server = _memory_server or fakeredis.FakeServer()
            client = fakeredis.FakeRedis(server=_memory_server, decode_responses=True)
        else:
            import redis

            client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5,
                                          socket_timeout=10, health_check_interval=30)
        _stores[key] = RunStore(client, prefix)
    return _stores[key]
