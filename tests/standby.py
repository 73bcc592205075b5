"""A real streaming standby for tests: a private PostgreSQL primary and a standby cloned from it
with ``pg_basebackup -R``, both in one temporary directory on spare ports, stopped and removed
when the block ends, also when the test fails.

PostgreSQL refuses to run as root, so when the tests run as root the servers run as the
``postgres`` OS user (``runuser -u postgres --``) in a directory chowned to it. Binaries come
from ``pg_config --bindir``, else the newest ``/usr/lib/postgresql/*/bin``. A missing binary skips
locally and fails with CI=true (``tests/services.py``'s rule).

Both servers listen on 127.0.0.1 with trust authentication for the ``postgres`` role and keep
their sockets in the temporary directory, so nothing touches the machine's own PostgreSQL.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from tests.services import CI

BINARIES = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
RUN_AS = "postgres"

# Settings of both servers. fsync is off because these clusters are thrown away; a status
# interval of 1 s makes the standby report its replay position often, so the primary's view of
# the lag is fresh within a second instead of the default ten.
SERVER_CONF = """
listen_addresses = '127.0.0.1'
unix_socket_directories = '{sockets}'
port = {port}
wal_level = replica
max_wal_senders = 4
hot_standby = on
wal_receiver_status_interval = 1s
fsync = off
shared_buffers = 32MB
max_connections = 100
"""


def find_bindir() -> Path | None:
    """The folder of PostgreSQL's server binaries, or None."""
    candidates: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 check=True, timeout=10).stdout.strip()
            candidates.append(out)
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                         else 0, reverse=True)
    for folder in candidates:
        if all((Path(folder) / b).is_file() for b in BINARIES):
            return Path(folder)
    return None


def _missing(reason: str) -> None:
    if CI:
        pytest.fail(f"{reason} (CI=true: a missing PostgreSQL binary is a failure)")
    pytest.skip(f"{reason}; install PostgreSQL's server package to run this test")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class StandbyPair:
    """A running primary and its streaming standby; see :func:`standby_pair`."""

    root: Path
    bindir: Path
    primary_port: int
    standby_port: int

    @property
    def primary_dir(self) -> Path:
        return self.root / "primary"

    @property
    def standby_dir(self) -> Path:
        return self.root / "standby"

    def primary_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.primary_port}/{database}"

    def standby_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.standby_port}/{database}"

    def primary_engine(self, database: str = "postgres") -> Engine:
        return _engine(self.primary_url(database))

    def standby_engine(self, database: str = "postgres") -> Engine:
        return _engine(self.standby_url(database))

    def create_database(self, name: str) -> str:
        """A new database on the primary (it reaches the standby through WAL); its URL."""
        engine = self.primary_engine()
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.primary_url(name)

    def _on_standby(self, sql: str) -> object:
        engine = self.standby_engine()
        try:
            with engine.connect() as conn:
                return conn.execute(text(sql)).scalar()
        finally:
            engine.dispose()

    def pause_replay(self) -> None:
        """The standby keeps receiving WAL but stops applying it: its lag grows with writes."""
        self._on_standby("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self._on_standby("SELECT pg_wal_replay_resume()")

    def replay_paused(self) -> bool:
        return self._on_standby("SELECT pg_get_wal_replay_pause_state() <> 'not paused'") is True

    def streaming_standbys(self) -> int:
        engine = self.primary_engine()
        try:
            with engine.connect() as conn:
                return int(conn.execute(text(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                )).scalar_one())
        finally:
            engine.dispose()

    def wait_streaming(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.streaming_standbys() < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"standby not streaming after {timeout}s:\n{self.logs()}")
            time.sleep(0.1)

    def wait_replayed(self, timeout: float = 60) -> None:
        """Until the standby has applied all WAL the primary had written when this was called
        (replay must not be paused, or this times out)."""
        engine = self.primary_engine()
        try:
            with engine.connect() as conn:
                target = str(conn.execute(text("SELECT pg_current_wal_lsn()")).scalar_one())
        finally:
            engine.dispose()
        deadline = time.monotonic() + timeout
        while self._on_standby(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn") \
                is not True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"standby has not replayed up to {target} in {timeout}s")
            time.sleep(0.1)

    def walreceiver_pid(self) -> int:
        """The standby's WAL receiver process (SIGSTOP it to make the standby go silent)."""
        pid = self._on_standby("SELECT pid FROM pg_stat_wal_receiver")
        if not isinstance(pid, int):
            raise RuntimeError("the standby has no WAL receiver running")
        return pid

    def configure_standby(self, setting: str, value: str) -> None:
        """Set *setting* in the standby's postgresql.conf and reload (reloadable ones only)."""
        with (self.standby_dir / "postgresql.conf").open("a") as f:
            f.write(f"{setting} = '{value}'\n")
        self._on_standby("SELECT pg_reload_conf()")

    def stop_standby(self) -> None:
        """Shut the standby down (immediate): its walsender leaves pg_stat_replication."""
        _pg_ctl(self, self.standby_dir, "stop")

    def start_standby(self) -> None:
        _pg_ctl(self, self.standby_dir, "start", "standby.log")

    def logs(self) -> str:
        parts = []
        for name in ("primary", "standby"):
            log = self.root / f"{name}.log"
            if log.exists():
                parts.append(f"--- {name}.log ---\n{log.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


def _engine(url: str) -> Engine:
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://"),
                         isolation_level="AUTOCOMMIT", pool_pre_ping=True)


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", RUN_AS, "--", *cmd]


def _run(cmd: list[str], root: Path, timeout: float = 120) -> None:
    done = subprocess.run(_as_server_user(cmd), capture_output=True, text=True,
                          timeout=timeout, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                           f"{done.stdout}\n{done.stderr}")


def _configure(data: Path, root: Path, port: int, extra: Mapping[str, str]) -> None:
    conf = data / "postgresql.conf"
    with conf.open("a") as f:
        f.write(SERVER_CONF.format(sockets=root, port=port))
        f.writelines(f"{name} = '{value}'\n" for name, value in extra.items())


def _pg_ctl(pair: StandbyPair, data: Path, action: str, log: str | None = None) -> None:
    cmd = [str(pair.bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
    if log:
        cmd += ["-l", str(pair.root / log)]
    cmd.append(action)
    if action == "stop":
        cmd += ["-m", "immediate"]
    _run(cmd, pair.root)


@contextmanager
def standby_pair(extra_conf: Mapping[str, str] | None = None) -> Iterator[StandbyPair]:
    """Start a primary and a streaming standby; yield once the standby streams; stop and
    remove both on the way out, whatever happened inside. *extra_conf* is added to both
    servers' postgresql.conf (e.g. ``{"log_min_duration_statement": "0"}``)."""
    extra = dict(extra_conf or {})
    bindir = find_bindir()
    if bindir is None:
        _missing("PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) not found via "
                 "pg_config --bindir or /usr/lib/postgresql/*/bin")
        raise AssertionError("unreachable")  # pytest.skip/fail raised
    if os.geteuid() == 0:
        try:
            server_user = pwd.getpwnam(RUN_AS)
        except KeyError:
            _missing(f"running as root and there is no {RUN_AS!r} OS user to run PostgreSQL as")
            raise AssertionError("unreachable") from None
        if shutil.which("runuser") is None:
            _missing("running as root and runuser is not installed")
    root = Path(tempfile.mkdtemp(prefix="statesweep-standby-"))
    if os.geteuid() == 0:
        os.chown(root, server_user.pw_uid, server_user.pw_gid)
    pair = StandbyPair(root, bindir, free_port(), free_port())
    started: list[Path] = []
    try:
        _run([str(bindir / "initdb"), "-D", str(pair.primary_dir), "-U", "postgres",
              "--auth=trust", "-E", "UTF8", "--no-sync"], root)
        _configure(pair.primary_dir, root, pair.primary_port, extra)
        with (pair.primary_dir / "pg_hba.conf").open("a") as f:
            f.write("host replication postgres 127.0.0.1/32 trust\n")
        started.append(pair.primary_dir)  # before start: a half-started server is stopped too
        _pg_ctl(pair, pair.primary_dir, "start", "primary.log")
        # -R writes primary_conninfo and standby.signal; -X stream copies the WAL of the backup.
        _run([str(bindir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(pair.primary_port),
              "-U", "postgres", "-D", str(pair.standby_dir), "-R", "-X", "stream",
              "--no-sync", "-c", "fast"], root)
        # The copied postgresql.conf carries the primary's port: the last setting wins.
        _configure(pair.standby_dir, root, pair.standby_port, extra)
        started.append(pair.standby_dir)
        _pg_ctl(pair, pair.standby_dir, "start", "standby.log")
        pair.wait_streaming()
        yield pair
    finally:
        for data in reversed(started):
            try:
                _pg_ctl(pair, data, "stop")
            except (RuntimeError, subprocess.SubprocessError):
                pass  # removed below either way; an orphan would hold only a temp port
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def standby() -> Iterator[StandbyPair]:
    """A fresh primary + streaming standby for one test."""
    with standby_pair() as pair:
        yield pair
