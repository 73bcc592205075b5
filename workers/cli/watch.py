"""Waking a follower the moment its run changes, instead of sleeping between polls.

Redis tells a client when keys change (client-side caching's invalidation messages; in BCAST
mode for every key under a prefix, whether the client read it or not). A follower tracks the
prefix of its run's keys (the record, its window) on one connection and listens for the messages
on a second, so each step a worker takes on the run (started, a chunk counted, finished, failed,
aborted, skipped) wakes `cleanup --wait` and `status --follow` within a round trip, and the
writers change nothing. Where Redis cannot (``memory://``, a server or proxy without
CLIENT TRACKING) following polls as before: a wait is then a sleep.
"""

from __future__ import annotations

import time
from typing import Any

#: The channel Redis sends invalidation messages on, for a RESP2 connection that subscribes.
INVALIDATE = "__redis__:invalidate"


def run_key_prefix(prefix: str, run_id: str) -> str:
    """The prefix of every key of one run: ``<prefix>:run:<id>`` and ``…:inflight`` (see
    workers.runs). Run ids have one length, so no id is a prefix of another."""
    return f"{prefix}:run:{run_id}"


class Watch:
    """A wait that ends when the run changes, or after *timeout* seconds at the latest."""

    blocking = False

    def wait(self, timeout: float) -> bool:
        """Sleep *timeout* seconds; True if the run may have changed (always, here)."""
        time.sleep(timeout)
        return True

    def close(self) -> None:
        pass

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class RedisWatch(Watch):
    """Invalidation messages for one run's keys, on two connections of their own."""

    blocking = True

    def __init__(self, client: Any, listener: Any, tracker: Any) -> None:
        # The client owns the pool: once it is collected, its connections are closed.
        self._client = client
        self._listener = listener
        self._tracker = tracker
        self._lost = False

    @classmethod
    def open(cls, url: str, key_prefix: str) -> RedisWatch:
        import redis

        # RESP2: the messages arrive on a subscribed connection, which redis-py reads as
        # plain replies (RESP3 would deliver them as pushes to a handler).
        client = redis.Redis.from_url(url, protocol=2, socket_connect_timeout=3.0,
                                      socket_timeout=3.0)
        listener = client.connection_pool.get_connection()
        tracker = client.connection_pool.get_connection()
        try:
            listener.send_command("CLIENT", "ID")
            listener_id = listener.read_response()
            listener.send_command("SUBSCRIBE", INVALIDATE)
            listener.read_response()
            # Tracking lives as long as the tracker's connection: it is kept open, unused.
            tracker.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", listener_id,
                                 "BCAST", "PREFIX", key_prefix)
            tracker.read_response()
        except BaseException:
            listener.disconnect()
            tracker.disconnect()
            raise
        return cls(client, listener, tracker)

    def wait(self, timeout: float) -> bool:
        """Block until a key of the run changed (True) or *timeout* passed (False)."""
        import redis

        if self._lost:
            return super().wait(timeout)
        try:
            if not self._listener.can_read(timeout=timeout):
                return False
            while self._listener.can_read(timeout=0):  # one wake for a burst of changes
                self._listener.read_response()
        except (redis.RedisError, OSError):
            # The watch is an optimisation: following goes on by polling the run store, which
            # reports its own errors.
            self.close()
            time.sleep(timeout)
        return True

    def close(self) -> None:
        self._lost = True  # redis-py would reconnect a closed connection, untracked
        self._listener.disconnect()
        self._tracker.disconnect()
        self._client.close()


def watch_run(url: str, prefix: str, run_id: str) -> Watch:
    """A watch on run *run_id*: blocking on Redis, else a sleep. Open it before reading the run,
    so a change between the read and the wait still wakes the wait."""
    from workers.settings import is_redis_store

    if not is_redis_store(url):
        return Watch()
    import redis

    try:
        return RedisWatch.open(url, run_key_prefix(prefix, run_id))
    except (redis.RedisError, OSError):  # no CLIENT TRACKING (Redis < 6, a proxy): poll
        return Watch()
