"""The run store's atomic steps, as Lua scripts Redis runs one at a time.

Each script is one step of a run that several processes race to take: planning a run, a chunk
starting, a chunk counted once, the window topped up, a run aborted. Doing each as one script
means the run finishes exactly once, a redelivered chunk is counted once, and two processes
topping up the window never send the same chunk number twice.

Keys of one run: R (hash, the record), F (hash, the in-flight window: chunk number ->
``lo:hi|sent_at|s`` for sent or ``|p`` for parked); global: L (the single-flight lock), P (the
pause hash). Numbers pass through string.format('%d') so ids stay exact past 1e14.
"""

from __future__ import annotations

from workers.metrics import COUNT_METRICS_LUA

_PRELUDE = r"""
local function d(x) return string.format('%d', x) end

local function hold_reason(R, P, now, external, max_run)
  if redis.call('EXISTS', P) == 1 then return 'paused' end
  if external ~= '' then return external end
  local limit = tonumber(max_run)
  if limit > 0 then
    local since = tonumber(redis.call('HGET', R, 'window_started_at') or '0')
    if since > 0 and tonumber(now) - since > limit then return 'max_run_seconds' end
  end
  return ''
end

-- Returns 1 when this starts a new hold episode (log it once), else 0.
local function note_hold(R, reason, now)
  local current = redis.call('HGET', R, 'held') or ''
  if current == reason then return 0 end
  redis.call('HSET', R, 'held', reason, 'held_since', now)
  if current == '' then redis.call('HINCRBY', R, 'holds', 1) end
  return 1
end

local function clear_hold(R)
  if (redis.call('HGET', R, 'held') or '') ~= '' then redis.call('HSET', R, 'held', '') end
end

local function finish_if_complete(R, F, L, run_id, now)
  local h = redis.call('HMGET', R, 'planning_done', 'state', 'chunks_failed')
  if h[1] == '1' and h[2] == 'running' and redis.call('HLEN', F) == 0 then
    local final = 'finished'
    if tonumber(h[3] or '0') > 0 then final = 'failed' end
    redis.call('HSET', R, 'state', final, 'finished_at', now, 'held', '')
    if redis.call('GET', L) == run_id then redis.call('DEL', L) end
    return 1
  end
  return 0
end

-- The window lives as long as its run's record: a window hash made after the record's EXPIRE
-- (the first chunk written into it) gets the record's TTL, so it never outlives the run.
local function keep_with(R, F)
  local ttl = redis.call('TTL', R)
  if ttl > 0 and redis.call('TTL', F) == -1 then redis.call('EXPIRE', F, ttl) end
end

-- A window entry: range|sent_at|state[|resends]; state c (cut, its message not yet known to be
-- published), s (published, no worker has taken it yet), t (a worker took it: BEGIN), p
-- (parked by a hold). resends counts the times it was sent
-- again since a worker last took it.
local function entry(v)
  local rng, sent, st, n = string.match(v, '^([^|]*)|([^|]*)|(%a)|?(%d*)$')
  return rng, tonumber(sent), st, tonumber(n) or 0
end

-- A chunk sent and not taken by any worker is sent again after resend_after, then after
-- twice that, four times, at most 2^MAX_DOUBLINGS times (no worker consumes: its message
-- waits in the queue, and a copy a period only fills the queue); one taken by a worker that
-- has not finished it is sent again after resend_after (past its hard time limit it runs
-- nowhere). Never more than one copy of a chunk a period: sent_at moves with each send.
-- A taken chunk whose worker's heartbeat lapsed (alive false: its process died) is due at
-- once, and one whose worker beats (alive true) never is, however long it runs; where the step
-- was not told (alive nil), resend_after since it was taken.
-- A chunk cut and not confirmed published within CONFIRM_GRACE seconds: the process that cut
-- it died before it published (or the broker refused it); it is sent again at once. 5 s: a
-- publish (a RabbitMQ confirm included) takes milliseconds, and with the pump's 5 s period a
-- window cut by a killed coordinator goes out again within ~10 s (issue 21: <= 15 s; 10 s here
-- measured up to 15.4 s, bench/results/recovery.md). A publisher slower than that costs one
-- extra copy, which deletes nothing more and is not counted twice.
local MAX_DOUBLINGS = 3
local CONFIRM_GRACE = 5
local function resend_due(st, sent, n, now, resend_after, alive)
  if st == 't' and alive ~= nil then return not alive end
  if st == 'c' then return tonumber(now) - sent > CONFIRM_GRACE end
  local period = tonumber(resend_after)
  if st == 's' then period = period * 2 ^ math.min(n, MAX_DOUBLINGS) end
  return tonumber(now) - sent > period
end

-- Which taken chunks' workers are alive: KEYS from first on are the heartbeat keys of the
-- chunks named in beats (chunk numbers, in the same order), read in this step.
local function heartbeats(first, beats)
  local alive = {}
  for i, n in ipairs(beats) do
    alive[n] = redis.call('EXISTS', KEYS[first + i - 1]) == 1
  end
  return alive
end

-- Tops up the window: parked chunks, and chunks whose resend is due (a lost message, a dead
-- publisher or worker), are sent again, then new chunks are cut from the cursor until the
-- window is full. Appends number, range pairs to out. Returns the room left for chunks the
-- caller must cut itself (the walk planner needs the database for each cut).
local function top_up(R, F, now, window, resend_after, out, alive)
  clear_hold(R)
  alive = alive or {}
  local all = redis.call('HGETALL', F)
  for i = 1, #all, 2 do
    local rng, sent, st, n = entry(all[i + 1])
    if st == 'p' then
      redis.call('HSET', F, all[i], rng .. '|' .. now .. '|c')
      table.insert(out, all[i]); table.insert(out, rng)
    elseif resend_due(st, sent, n, now, resend_after, alive[all[i]]) then
      redis.call('HSET', F, all[i], rng .. '|' .. now .. '|c|' .. d(n + 1))
      redis.call('HINCRBY', R, 'resends', 1)
      table.insert(out, all[i]); table.insert(out, rng)
    end
  end
  local room = tonumber(window) - redis.call('HLEN', F)
  if redis.call('HGET', R, 'planning_done') == '1' or room <= 0 then return 0 end
  local kind = redis.call('HGET', R, 'kind')
  if kind == 'walk' or kind == 'expiry' then return room end
  while room > 0 and redis.call('HGET', R, 'planning_done') ~= '1' do
    local h = redis.call('HMGET', R, 'cursor', 'end', 'size')
    local lo, e, size = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
    local rng
    if lo + size >= e then
      -- The last block range is open-ended: pages appended since planning are covered.
      if kind == 'blocks' then rng = d(lo) .. ':' else rng = d(lo) .. ':' .. d(e) end
      redis.call('HSET', R, 'cursor', d(e), 'planning_done', '1', 'planned_at', now)
    else
      rng = d(lo) .. ':' .. d(lo + size)
      redis.call('HSET', R, 'cursor', d(lo + size))
    end
    local n = redis.call('HINCRBY', R, 'chunks_planned', 1)
    redis.call('HSET', F, n, rng .. '|' .. now .. '|c')
    table.insert(out, d(n)); table.insert(out, rng)
    room = room - 1
  end
  keep_with(R, F)
  return 0
end

-- Holds or tops up; returns {room, reason, new_episode}.
local function gate_and_top_up(R, F, P, now, external, max_run, window, resend_after, out,
                               alive)
  local reason = hold_reason(R, P, now, external, max_run)
  if reason ~= '' then return {0, reason, note_hold(R, reason, now)} end
  return {top_up(R, F, now, window, resend_after, out, alive), '', 0}
end
"""

# KEYS R F L P RUNS; ARGV run_id now cutoff batch source planner reason kind start end size
# expected window lock_ttl resend_after external max_run keep max_size selection
START = _PRELUDE + r"""
local R, F, L, P, RUNS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local run_id, now = ARGV[1], ARGV[2]
if redis.call('GET', L) ~= run_id then return {'lost'} end
local state = redis.call('HGET', R, 'state')
if state and state ~= 'queued' and state ~= 'planning' then return {'exists', state} end
local started = redis.call('HGET', R, 'started_at') or now
local done = '0'
-- A cut kind's plan that starts at a key has no end ('') until its last cut.
if ARGV[10] ~= '' and tonumber(ARGV[10]) <= tonumber(ARGV[9]) then done = '1' end
redis.call('HSET', R, 'run_id', run_id, 'state', 'running', 'cutoff', ARGV[3],
  'batch_size', ARGV[4], 'source', ARGV[5], 'planner', ARGV[6], 'planner_reason', ARGV[7],
  'kind', ARGV[8], 'cursor', ARGV[9], 'start', ARGV[9], 'end', ARGV[10], 'size', ARGV[11],
  'expected_rows', ARGV[12], 'chunks_planned', 0, 'chunks_done', 0, 'rows_deleted', 0,
  'chunks_failed', 0, 'planning_done', done, 'started_at', started, 'planned_at', now,
  'window_started_at', now, 'last_progress_at', now, 'held', '', 'holds', 0, 'resends', 0,
  'max_size', ARGV[19], 'selection', ARGV[20])
redis.call('EXPIRE', R, ARGV[18])
redis.call('EXPIRE', F, ARGV[18])
redis.call('ZADD', RUNS, started, run_id)
redis.call('EXPIRE', RUNS, ARGV[18])
redis.call('EXPIRE', L, ARGV[14])
local out = {}
local g = gate_and_top_up(R, F, P, now, ARGV[16], ARGV[17], ARGV[13], ARGV[15], out)
local fin = finish_if_complete(R, F, L, run_id, now)
return {'started', fin, g[1], g[2], g[3], unpack(out)}
"""

# KEYS R F P L B; ARGV chunk range now external max_run kind run_id beat_ttl
BEGIN = _PRELUDE + r"""
local R, F, P, L, B = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local chunk, rng, now = ARGV[1], ARGV[2], ARGV[3]
local h = redis.call('HMGET', R, 'state', 'chunks_planned', 'cutoff', 'size', 'batch_size',
  'kind', 'max_size', 'selection')
if not h[1] then return {'unknown'} end
if h[1] ~= 'running' then return {'ended', h[1]} end
local holder = redis.call('GET', L)
if holder ~= ARGV[7] then return {'lost', holder or ''} end
local entry = redis.call('HGET', F, chunk)
if not entry then
  if tonumber(chunk) <= tonumber(h[2] or '0') then return {'duplicate'} end
  return {'forged', 'never planned'}
end
local planned = string.match(entry, '^([^|]*)|')
-- The bounds alone are not the range: the same numbers are pages to blocks and ids to ids.
if planned ~= rng or ARGV[6] ~= h[6] then return {'forged', h[6] .. ' ' .. planned} end
local reason = hold_reason(R, P, now, ARGV[4], ARGV[5])
if reason ~= '' then
  redis.call('HSET', F, chunk, planned .. '|' .. now .. '|p')
  return {'held', reason, note_hold(R, reason, now)}
end
-- A worker took it: its resends start again from resend_after (workers are consuming).
redis.call('HSET', F, chunk, planned .. '|' .. now .. '|t')
-- Its worker's heartbeat, from this step on: renewed while the chunk runs, it lapses within
-- beat_ttl of the worker's death, and the next top-up sends the chunk again.
redis.call('SET', B, '1', 'EX', ARGV[8])
return {'ok', h[3], h[4], h[5], h[7] or '0', h[8] or ''}
"""

# KEYS R F L; ARGV chunk reason now run_id  (the chunk stopped before its DELETE: replica lag)
PARK = _PRELUDE + r"""
local R, F, L = KEYS[1], KEYS[2], KEYS[3]
if redis.call('GET', L) ~= ARGV[4] then return 0 end
local entry = redis.call('HGET', F, ARGV[1])
if not entry then return 0 end
redis.call('HSET', F, ARGV[1], string.match(entry, '^([^|]*)|') .. '|' .. ARGV[3] .. '|p')
return note_hold(R, ARGV[2], ARGV[3])
"""

# KEYS R F L P M N beat...; ARGV run_id chunk rows now lock_ttl window resend_after external
# max_run new_size units error seconds table xids chunk-number...  (the heartbeat key of each
# chunk number at ARGV 16 on is KEYS 7 on)
# N, the chunk's commit notes (hash: transaction id -> rows, written just before each of its
# DELETEs commits): *rows* includes the rows of the notes named in *xids* (comma-separated:
# the caller's own DELETE and those of dead copies it found committed). Each note is counted
# by the one step that removes it; a note another step counted already comes off *rows*, so a
# DELETE that committed is counted once, whichever copy's step comes first, even when the
# process that committed it died before its own step. The reply's second element is the
# rows this step counted (*rows* less the notes counted before; 0 for a failed chunk).
FINISH = _PRELUDE + COUNT_METRICS_LUA + r"""
local R, F, L, P, M, N = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local run_id, chunk, rows, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
if redis.call('EXISTS', R) == 0 then return {-1, 0, 0, 0, '', 0} end
-- A running run changes only while its lock names it: a run whose lock lapsed (or passed on)
-- neither counts nor sends; the next trigger ends it (PLAN).
if redis.call('HGET', R, 'state') == 'running' and redis.call('GET', L) ~= run_id then
  return {-2, 0, 0, 0, '', 0}
end
if ARGV[15] ~= '' then
  for xid in string.gmatch(ARGV[15], '[^,]+') do
    local noted = tonumber(redis.call('HGET', N, xid) or '-1')
    if noted >= 0 then
      redis.call('HDEL', N, xid)
    else
      rows = math.max(0, rows - tonumber(string.match(xid, ':(%d+)$') or '0'))
    end
  end
end
local net = rows
if ARGV[12] ~= '' then net = 0 end
if redis.call('HDEL', F, chunk) == 0 then
  -- Counted already (a resent copy finished first). Its rows still count: a row is deleted
  -- by one committed transaction only, so the sum over every attempt is exact.
  if ARGV[12] == '' and tonumber(rows) > 0 then
    redis.call('HINCRBY', R, 'rows_deleted', rows)
    redis.call('HINCRBY', M, 'rows_deleted:' .. ARGV[14], rows)
  end
  return {0, net, 0, 0, '', 0}
end
-- The same step counts the chunk into the metrics every exporter reads (workers.metrics).
count_metrics(M, ARGV[14], rows, ARGV[13], ARGV[12] ~= '')
redis.call('HINCRBY', R, 'chunks_done', 1)
if ARGV[12] ~= '' then
  redis.call('HINCRBY', R, 'chunks_failed', 1)
  redis.call('HSET', R, 'error', ARGV[12])
else
  redis.call('HINCRBY', R, 'rows_deleted', rows)
  redis.call('HINCRBY', R, 'obs_rows', rows)
  redis.call('HINCRBY', R, 'obs_units', ARGV[11])
  redis.call('HSET', R, 'last_progress_at', now)
  if tonumber(ARGV[10]) > 0 then redis.call('HSET', R, 'size', ARGV[10]) end
end
if redis.call('GET', L) == run_id then redis.call('EXPIRE', L, ARGV[5], 'GT') end
if redis.call('HGET', R, 'state') ~= 'running' then return {1, net, 0, 0, '', 0} end
local out = {}
local g = {0, '', 0}
if ARGV[12] == '' then
  local beats = {}
  for i = 16, #ARGV do table.insert(beats, ARGV[i]) end
  g = gate_and_top_up(R, F, P, now, ARGV[8], ARGV[9], ARGV[6], ARGV[7], out,
                      heartbeats(7, beats))
end
local fin = finish_if_complete(R, F, L, run_id, now)
return {1, net, fin, g[1], g[2], g[3], unpack(out)}
"""

# KEYS R F L P beat...; ARGV run_id now lock_ttl window resend_after external max_run
# new_budget chunk-number...  (the heartbeat key of each chunk number at ARGV 9 on is KEYS 5 on)
PUMP = _PRELUDE + r"""
local R, F, L, P = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local run_id, now = ARGV[1], ARGV[2]
local state = redis.call('HGET', R, 'state')
if state ~= 'running' then return {'ended', 0, 0, state or '', 0} end
if redis.call('GET', L) ~= run_id then return {'lost', 0, 0, redis.call('GET', L) or '', 0} end
redis.call('EXPIRE', L, ARGV[3], 'GT')
if ARGV[8] == '1' then redis.call('HSET', R, 'window_started_at', now) end
local beats = {}
for i = 9, #ARGV do table.insert(beats, ARGV[i]) end
local out = {}
local g = gate_and_top_up(R, F, P, now, ARGV[6], ARGV[7], ARGV[4], ARGV[5], out,
                          heartbeats(5, beats))
local fin = finish_if_complete(R, F, L, run_id, now)
return {'ok', fin, g[1], g[2], g[3], unpack(out)}
"""

# KEYS R F L; ARGV expected_cursor range next now window run_id -> the new chunk's number, 0
# if another process cut from this cursor first (compare-and-set: a walk or expiry cut needs a
# query in between), -1 if the window is full (two finishers each handed the room they saw
# must not both fill it), -2 if the run's lock does not name it. Cursors and ranges are opaque
# text here (ids, or expiry keys).
CUT = _PRELUDE + r"""
local R, F, L = KEYS[1], KEYS[2], KEYS[3]
if redis.call('GET', L) ~= ARGV[6] then return -2 end
local h = redis.call('HMGET', R, 'cursor', 'state', 'planning_done', 'end')
if h[1] ~= ARGV[1] or h[2] ~= 'running' or h[3] == '1' then return 0 end
if redis.call('HLEN', F) >= tonumber(ARGV[5]) then return -1 end
local n = redis.call('HINCRBY', R, 'chunks_planned', 1)
redis.call('HSET', F, n, ARGV[2] .. '|' .. ARGV[4] .. '|c')
if ARGV[3] == '' then
  redis.call('HSET', R, 'cursor', h[4], 'planning_done', '1', 'planned_at', ARGV[4])
else
  redis.call('HSET', R, 'cursor', ARGV[3])
end
keep_with(R, F)
return n
"""

# KEYS R F L O; ARGV run_id now why  (a person's abort: any queued or running run ends; the
# lock and the planning claim are freed only if they are this run's, never another run's)
ABORT = r"""
local R, F, L, O = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local state = redis.call('HGET', R, 'state')
if state ~= 'running' and state ~= 'queued' and state ~= 'planning' then return state or '' end
redis.call('HSET', R, 'state', 'aborted', 'finished_at', ARGV[2], 'error', ARGV[3], 'held', '')
redis.call('DEL', F, O)
if redis.call('GET', L) == ARGV[1] then redis.call('DEL', L) end
return 'aborted'
"""

# KEYS F; ARGV chunk... : their messages are published (c -> s; any other state stays)
CONFIRM = r"""
for i = 1, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local rng, sent, st, n = string.match(v, '^([^|]*)|([^|]*)|(%a)|?(%d*)$')
    if st == 'c' then
      if n ~= '' then n = '|' .. n end
      redis.call('HSET', KEYS[1], ARGV[i], rng .. '|' .. sent .. '|s' .. n)
    end
  end
end
return 1
"""

# KEYS F R; ARGV chunk now error -> 1 if the chunk, taken by a worker, is waiting for its
# retry: sent again (by Celery, with a countdown), not running, so no heartbeat is missed. With
# *error*, the run's record (if it exists: no key without a TTL) keeps the latest transient
# error its chunks retry and counts the retries, for `--wait` and `status` to say.
REQUEUE = r"""
if ARGV[3] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'retry_error', ARGV[3], 'retry_at', ARGV[2])
  redis.call('HINCRBY', KEYS[2], 'retries', 1)
end
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local rng, sent, st = string.match(v, '^([^|]*)|([^|]*)|(%a)')
if st ~= 't' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], rng .. '|' .. ARGV[2] .. '|s')
return 1
"""

# KEYS R; ARGV state why now -> 1 if a queued run was closed (its trigger did not start it)
CLOSE_QUEUED = r"""
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'error', ARGV[2], 'finished_at', ARGV[3])
return 1
"""

# KEYS R L; ARGV run_id: shrink the run's chunk size by half (a chunk hit its lock timeout),
# only while the run holds its lock (and so exists: no record is made without a TTL)
SHRINK = r"""
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local size = tonumber(redis.call('HGET', KEYS[1], 'size') or '0')
if size > 1 then redis.call('HSET', KEYS[1], 'size', string.format('%d', math.floor(size / 2))) end
return size
"""

# KEYS R RUNS; ARGV run_id now source keep -> 1 recorded, 0 the id is taken
ENQUEUE = r"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'run_id', ARGV[1], 'state', 'queued', 'source', ARGV[3],
  'started_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS T; ARGV now interval -> seconds this caller waits before its chunk may start. One slot
# every `interval` seconds for all workers together (a virtual schedule, as GCRA): exact over a
# run of any length, unlike a token bucket per worker process.
RATE = r"""
local now, interval = tonumber(ARGV[1]), tonumber(ARGV[2])
local slot = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0'))
redis.call('SET', KEYS[1], string.format('%.6f', slot + interval), 'EX',
  math.max(1, math.ceil(slot + interval - now) + 1))
return string.format('%.6f', slot - now)
"""

# KEYS L R O RUNS C P PR PF PB; ARGV run_id ttl token now keep record prev external source
# request beat_ttl
# A coordinator delivery takes the single-flight lock for *run_id* (or finds it its own
# already) -> {'held', holder} | {'ended', state} | {'gated', reason} | {'retry'} |
# {'taken', state}. C names the run that took the lock last (prev, read by the caller, whose
# record and window are PR and PF): when the lock passes from it to another run, that run let
# its lock lapse (no step for its whole TTL), and it ends 'failed' in this same step, so two
# runs are never planning or running at once. With *record* (a coordinator delivery, which has
# a token), the run's record moves to 'planning' (made if absent, with its TTL) and the
# delivery claims it (O: only the claimant may fail it before it starts); an ended run id, a
# pause (P) or a closed window (external) takes nothing. The claimant's planner beats (PB, the
# claimant's token, a short TTL, renewed while it plans): a claim whose planner stopped beating
# (its process died mid-plan) passes to this delivery, the pump's resend of the coordinator
# (REPLAN), which plans the run again. *request* (the coordinator's arguments, JSON) is kept on
# the record for that resend.
PLAN = r"""
local L, R, O, RUNS, C, P, PR, PF, PB = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
  KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local run_id, ttl, token, now, keep, prev = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[7]
local holder = redis.call('GET', L)
if holder and holder ~= run_id then return {'held', holder} end
if (redis.call('GET', C) or '') ~= prev then return {'retry'} end
local state = redis.call('HGET', R, 'state') or ''
if ARGV[6] == '1' then
  if state == 'finished' or state == 'failed' or state == 'aborted' or state == 'skipped' then
    return {'ended', state}
  end
  if state ~= 'running' then
    if redis.call('EXISTS', P) == 1 then return {'gated', 'paused'} end
    if ARGV[8] ~= '' then return {'gated', ARGV[8]} end
  end
end
if not holder then
  if prev ~= '' and prev ~= run_id then
    local was = redis.call('HGET', PR, 'state')
    if was == 'planning' or was == 'running' then
      redis.call('HSET', PR, 'state', 'failed', 'finished_at', now, 'held', '', 'error',
        'its lock lapsed (no step for its whole TTL); run ' .. run_id .. ' took over')
      redis.call('DEL', PF)
    end
  end
  redis.call('SET', L, run_id, 'EX', ttl)
  redis.call('SET', C, run_id, 'EX', keep)
end
if ARGV[6] == '1' then
  local claim = redis.call('GET', O)
  if claim and claim ~= token and state ~= 'running' and redis.call('EXISTS', PB) == 0 then
    redis.call('SET', O, token, 'EX', ttl)
  else
    redis.call('SET', O, token, 'NX', 'EX', ttl)
  end
  if state ~= 'running' then
    if redis.call('GET', O) == token then redis.call('SET', PB, token, 'EX', ARGV[11]) end
    if ARGV[10] ~= '' then redis.call('HSETNX', R, 'request', ARGV[10]) end
    redis.call('HSET', R, 'run_id', run_id, 'state', 'planning')
    redis.call('HSETNX', R, 'started_at', now)
    redis.call('HSETNX', R, 'source', ARGV[9])
    redis.call('EXPIRE', R, keep)
    redis.call('ZADD', RUNS, 'NX', now, run_id)
    redis.call('EXPIRE', RUNS, keep)
  end
end
return {'taken', state}
"""

# KEYS L; ARGV run_id ttl — extends only: a renewal never shortens the TTL (Redis 7 GT).
RENEW = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2], 'GT')
  return 1
end
return 0
"""

# KEYS L O; ARGV run_id token -> 1 if the lock was this run's and is freed. The planning claim
# goes with it, but only the caller's own (token): a duplicate delivery never drops the claim
# of the copy that plans the run.
RELEASE = r"""
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS R L RUNS O F; ARGV run_id error now keep started token -> the run's state afterwards.
# Compare-and-set on the run's owner; nothing changes unless every check passes:
# - an ended run never changes;
# - a run not started yet (queued, planning, or never recorded) fails only for the delivery of its
#   coordinator that claimed it (O holds that delivery's token; no claim: anyone may), so a
#   duplicate delivery that errs while the first plans leaves the run to it ('planning');
# - a running run fails only for the process that started it (started = 1), and only while
#   the lock names it or has lapsed: a run whose lock passed to another run is that run's era,
#   and a duplicate delivery, which lost the race to START, never fails the winner's run.
# The lock is freed in the same step, and only if it names this run.
FAIL = r"""
local R, L, RUNS, O, F = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local run_id, now, token = ARGV[1], ARGV[3], ARGV[6]
local state = redis.call('HGET', R, 'state')
local lock = redis.call('GET', L)
if state == 'running' then
  if ARGV[5] ~= '1' or (lock and lock ~= run_id) then return state end
elseif state and state ~= 'queued' and state ~= 'planning' then
  return state
else
  local claim = redis.call('GET', O)
  if claim and claim ~= token then return 'planning' end
end
redis.call('HSET', R, 'run_id', run_id, 'state', 'failed', 'error', ARGV[2], 'finished_at', now)
redis.call('HSETNX', R, 'started_at', now)
redis.call('EXPIRE', R, ARGV[4])
redis.call('ZADD', RUNS, 'NX', now, run_id)
redis.call('EXPIRE', RUNS, ARGV[4])
redis.call('DEL', O, F)
if lock == run_id then redis.call('DEL', L) end
return 'failed'
"""

# KEYS O PB; ARGV token ttl -> 1 if the caller's delivery still holds the planning claim and its
# heartbeat is renewed, else 0 (another delivery took the claim over: this one plans on, and
# START decides which plan stands).
PLAN_BEAT = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"""

# KEYS R L PB M; ARGV run_id every -> {'replan', request} | {why not}. A run left in planning
# by a coordinator that died (its planner's heartbeat PB lapsed) while it still holds the lock,
# with its coordinator's arguments on record: the caller sends the coordinator again with them.
# M, a marker with a TTL of *every* seconds, lets one resend out per period, whoever pumps.
REPLAN = r"""
local R, L, PB, M = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('GET', L) ~= ARGV[1] then return {'lost'} end
local state = redis.call('HGET', R, 'state') or ''
if state ~= 'planning' then return {state} end
if redis.call('EXISTS', PB) == 1 then return {'alive'} end
local request = redis.call('HGET', R, 'request') or ''
if request == '' then return {'no request'} end
if not redis.call('SET', M, '1', 'NX', 'EX', ARGV[2]) then return {'sent'} end
redis.call('HINCRBY', R, 'replans', 1)
return {'replan', request}
"""
