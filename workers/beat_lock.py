"""One beat per deployment: the first beat holds ``<prefix>:beat`` in the run store and renews
it; a second beat waits as a standby (one warning line naming the holder) and takes over within
BEAT_LOCK_TTL_SECONDS + STANDBY_POLL_SECONDS of the first one stopping, however it stopped.

Two beats used to double every trigger (still one run, thanks to the run lock, but twice the
messages) until ``doctor`` noticed the second from its triggers. Now the second schedules
nothing: beat's scheduler starts only once ``beat_init`` returns, and ``beat_init`` returns once
this beat holds the lock. The holder renews it from a daemon thread every quarter of its TTL; a
holder that finds the lock gone or taken (the run store lost it, or a long stall let it lapse
and a standby took over) says so and exits, so two beats never schedule at once for longer than
one renewal period.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable

import structlog

from workers.runs import RunStore

log = structlog.get_logger("statesweep.beat")

#: A beat killed outright frees the lock this long after its last renewal: with the standby's
#: poll, beat's pump is back within 13 s of the kill (issue 21: recovery <= 15 s; it was 15 s +
#: a poll every 5 s, up to 20 s, measured 12.8-18.2 s by bench.recovery). A holder stalled
#: for longer than this (four missed renewals) loses the lock and stands down.
BEAT_LOCK_TTL_SECONDS = 12
#: How often a standby tries the lock: one small script call a second.
STANDBY_POLL_SECONDS = 1.0

# KEYS beat; ARGV me ttl -> 1 when *me* holds the lock (taken now or renewed), else 0.
_TAKE_OR_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
  return 1
end
return 0
"""


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class BeatLock:
    """This beat's claim on ``<prefix>:beat``: ``host:pid:token``."""

    def __init__(self, store: RunStore, ttl: int = BEAT_LOCK_TTL_SECONDS) -> None:
        self.store, self.ttl = store, ttl
        self.key = f"{store.prefix}:beat"
        self.me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def try_hold(self) -> bool:
        return bool(self.store.client.eval(_TAKE_OR_RENEW, 1, self.key, self.me, self.ttl))

    def holder(self) -> str:
        return str(self.store.client.get(self.key) or "")

    def wait_to_hold(self, *, sleep: Callable[[float], None] = time.sleep,
                     say: Callable[[str], None] | None = None) -> None:
        """Return once this beat holds the lock; while another does, wait as its standby."""
        said = False
        while not self.try_hold():
            if not said:
                holder = self.holder()
                message = (f"another beat ({holder or 'one that just stopped'}) schedules this "
                           f"deployment (run store key {self.key}); this beat waits as its "
                           f"standby and takes over within "
                           f"{self.ttl + STANDBY_POLL_SECONDS:g}s of it stopping")
                log.warning("beat_standby", holder=holder, key=self.key)
                (say or _stderr)(message)
                said = True
            sleep(STANDBY_POLL_SECONDS)
        if said:
            log.warning("beat_took_over", key=self.key)

    def keep(self, *, on_lost: Callable[[str], None]) -> threading.Thread:
        """Renew the lock every quarter of its TTL from a daemon thread; *on_lost* (with the
        holder found) when it is no longer ours."""
        def renew() -> None:
            while True:
                time.sleep(self.ttl / 4)
                try:
                    if not self.try_hold():
                        on_lost(self.holder())
                        return
                except Exception as exc:  # noqa: BLE001 - the run store is briefly away
                    log.warning("beat_lock_not_renewed", error=type(exc).__name__)

        thread = threading.Thread(target=renew, name="statesweep-beat-lock", daemon=True)
        thread.start()
        atexit.register(self.release)
        return thread

    def release(self) -> None:
        """Give the lock up if it is still ours (beat stopping): a standby takes over at its
        next try, not a whole TTL later."""
        try:
            self.store.client.eval(_RELEASE, 1, self.key, self.me)
        except Exception:  # noqa: BLE001, S110 - exiting anyway; the TTL frees it
            pass


def _stderr(message: str) -> None:
    sys.stderr.write(f"statesweep: beat: {message}\n")
    sys.stderr.flush()


def lost_lock_exit(holder: str) -> None:
    """The lock is another beat's now: stop at once, so two beats never schedule together."""
    _stderr(f"this beat lost its lock to {holder or 'nobody (the run store lost it)'}; exiting "
            "so that one beat schedules")
    os._exit(1)
