"""Services a reliability test owns outright: a private redis-server it can stop and restart,
and PostgreSQL handles to hold a row lock or to kill the workers' connections.

A private Redis keeps faults local: a low visibility timeout, a restart or a password applies
to this test's broker only, never to the shared Redis other helpers' tests are using.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from sqlalchemy import Connection, Engine, text

from tests.services import CI

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """``redis-server`` on a spare port with no persistence: a restart loses every key."""

    port: int = field(default_factory=free_port)
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> None:
        if REDIS_SERVER is None:
            if CI:
                pytest.fail("redis-server is not installed (CI=true: a missing service fails)")
            pytest.skip("redis-server is not installed")
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited early")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} not up in {timeout}s")

    def stop(self) -> None:
        """SIGKILL: the broker vanishes at once, with no chance to flush or say goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@contextmanager
def own_redis(password: str | None = None) -> Iterator[RedisServer]:
    server = RedisServer(password=password)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def unacked_messages(redis_url: str, queue: str) -> int:
    """Messages a consumer took from *queue* and has not acknowledged (kombu's ``unacked``)."""
    import json

    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.hvals("unacked")
    finally:
        client.close()
    return sum(1 for v in raw if json.loads(v)[2] == queue)


# --- PostgreSQL -----------------------------------------------------------------------------------


@contextmanager
def hold_row_lock(engine: Engine, table: str, row_id: int) -> Iterator[Connection]:
    """Lock one task_state row until the block ends: a chunk containing it waits on the lock,
    which pins that chunk "in flight" for as long as the test needs. *table* comes from
    schema.build_tables, never from input."""
    conn = engine.connect()
    try:
        trans = conn.begin()
        conn.execute(text(f"SELECT id FROM {table} WHERE id = :id FOR UPDATE"),  # noqa: S608
                     {"id": row_id})
        yield conn
        trans.rollback()
    finally:
        conn.close()


def wait_for_lock_waiter(engine: Engine, timeout: float = 30) -> tuple[int, int]:
    """(backend pid, client port) of a session of this database blocked on a row lock."""
    sql = text("SELECT pid, client_port FROM pg_stat_activity WHERE datname = current_database()"
               " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid() LIMIT 1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            row = conn.execute(sql).first()
        if row is not None:
            return int(row.pid), int(row.client_port)
        time.sleep(0.05)
    raise TimeoutError(f"no session blocked on a lock within {timeout}s")


def terminate_other_backends(engine: Engine) -> int:
    """pg_terminate_backend every other session of this test's database; returns how many."""
    sql = text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
               " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with engine.connect() as conn:
        return int(conn.execute(sql).scalar_one())


def owns_local_port(group_id: int, port: int) -> bool:
    """Whether a process of process group *group_id* (a worker and its pool children) has a
    TCP socket bound to local *port*: which worker a PostgreSQL session belongs to. Linux /proc."""
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{cols[9]}]")
        except FileNotFoundError:
            continue
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != group_id:
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                return True
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return False
