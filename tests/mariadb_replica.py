"""A real MariaDB replica for tests: a private primary and a private replica ``mariadbd``, each
in its own data directory (``mariadb-install-db``) on a spare port, the replica following the
primary by GTID. Both are killed and removed when the block ends, also when the test fails. The
machine's own MariaDB is never touched.

As root the servers run with ``--user=mysql`` in a directory chowned to it. A missing binary
skips locally and fails with CI=true (``tests/services.py``'s rule).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, create_engine, text

from tests.services import CI
from tests.standby import free_port

RUN_AS = "mysql"


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or next(
            (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)
        if found:
            return found
    return None


def _missing(reason: str) -> None:
    if CI:
        pytest.fail(f"{reason} (CI=true: a missing MariaDB binary is a failure)")
    pytest.skip(f"{reason}; install mariadb-server to run this test")


@dataclass
class MariaServer:
    name: str
    datadir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str = "mysql", user: str = "root") -> str:
        return f"mysql://{user}@127.0.0.1:{self.port}/{database}"

    def engine(self, database: str = "mysql", user: str = "root") -> Engine:
        return create_engine(self.url(database, user).replace("mysql://", "mysql+pymysql://"),
                             isolation_level="AUTOCOMMIT")


@dataclass
class ReplicaPair:
    """A running MariaDB primary and a replica following it; see :func:`mariadb_replica_pair`."""

    root: Path
    primary: MariaServer
    replica: MariaServer

    def on(self, server: MariaServer, *statements: str) -> None:
        engine = server.engine()
        try:
            with engine.connect() as conn:
                for statement in statements:
                    conn.execute(text(statement))
        finally:
            engine.dispose()

    def replica_status(self) -> dict[str, object]:
        engine = self.replica.engine()
        try:
            with engine.connect() as conn:
                row = conn.execute(text("SHOW SLAVE STATUS")).mappings().first()
        finally:
            engine.dispose()
        return dict(row) if row is not None else {}

    def wait_replicating(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = self.replica_status()
            if status.get("Slave_IO_Running") == "Yes" and status.get("Slave_SQL_Running") == "Yes":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica not replicating after {timeout}s: {status}")
            time.sleep(0.1)

    def stop_applying(self) -> None:
        """Stop the replica's SQL thread: replication is stopped, the lag reads NULL."""
        self.on(self.replica, "STOP SLAVE SQL_THREAD")

    def start_applying(self) -> None:
        self.on(self.replica, "START SLAVE SQL_THREAD")

    @contextmanager
    def apply_blocked(self, database: str, table: str) -> Iterator[Connection]:
        """Hold a write lock on *table* on the replica: the SQL thread waits on it, so writes to
        it on the primary pile up and ``Seconds_Behind_Master`` grows; released on exit."""
        engine = self.replica.engine(database)
        try:
            with engine.connect() as conn:
                conn.execute(text(f"LOCK TABLES `{table}` WRITE"))
                try:
                    yield conn
                finally:
                    conn.execute(text("UNLOCK TABLES"))
        finally:
            engine.dispose()


def _tmpdir(server: MariaServer) -> Path:
    """The server's own temporary directory beside its data directory, owned as its parent."""
    tmp = server.datadir.parent / f"{server.name}-tmp"
    if not tmp.exists():
        tmp.mkdir()
        owner = tmp.parent.stat()
        os.chown(tmp, owner.st_uid, owner.st_gid)
    return tmp


def _start(server: MariaServer, server_id: int, as_user: list[str]) -> None:
    mariadbd = _binary("mariadbd", "mysqld")
    assert mariadbd is not None
    root = server.datadir.parent
    cmd = [mariadbd, "--no-defaults", *as_user, f"--datadir={server.datadir}",
           f"--tmpdir={_tmpdir(server)}",
           f"--port={server.port}", "--bind-address=127.0.0.1",
           f"--socket={root / (server.name + '.sock')}",
           f"--pid-file={root / (server.name + '.pid')}",
           f"--log-error={root / (server.name + '.err')}",
           f"--server-id={server_id}", f"--log-bin={server.datadir / 'bin'}",
           "--innodb-buffer-pool-size=32M", "--innodb-flush-log-at-trx-commit=2",
           "--sync-binlog=0"]
    server.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        if server.proc.poll() is not None:
            err = root / (server.name + ".err")
            raise RuntimeError(f"mariadbd {server.name} exited:\n"
                               f"{err.read_text(errors='replace')[-3000:] if err.exists() else ''}")
        try:
            engine = server.engine()
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _stop(server: MariaServer) -> None:
    if server.proc is not None and server.proc.poll() is None:
        server.proc.kill()  # thrown away anyway: no clean shutdown needed
        server.proc.wait(timeout=30)


@contextmanager
def mariadb_replica_pair() -> Iterator[ReplicaPair]:
    install = _binary("mariadb-install-db", "mysql_install_db")
    if install is None or _binary("mariadbd", "mysqld") is None:
        _missing("mariadbd / mariadb-install-db not found")
        raise AssertionError("unreachable")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="statesweep-mariadb-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam(RUN_AS)
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            _missing(f"running as root and there is no {RUN_AS!r} OS user to run mariadbd as")
            raise AssertionError("unreachable") from None
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = [f"--user={RUN_AS}"]
    pair = ReplicaPair(root, MariaServer("primary", root / "primary"),
                       MariaServer("replica", root / "replica"))
    try:
        for server in (pair.primary, pair.replica):
            # Its own temporary directory, not /tmp: two harnesses bootstrapping at once (the
            # suite runs on several processes) removed each other's temporary tables there.
            tmp = _tmpdir(server)
            done = subprocess.run(
                [install, "--no-defaults", *as_user, f"--datadir={server.datadir}",
                 f"--tmpdir={tmp}",
                 "--auth-root-authentication-method=normal", "--skip-test-db"],
                capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{install} failed:\n{done.stdout}\n{done.stderr}")
        _start(pair.primary, 1, as_user)
        _start(pair.replica, 2, as_user)
        pair.on(pair.primary, "CREATE USER repl@'%'",
                "GRANT REPLICATION SLAVE ON *.* TO repl@'%'")
        pair.on(pair.replica,
                f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={pair.primary.port}, "
                "MASTER_USER='repl', MASTER_USE_GTID=slave_pos",
                "START SLAVE")
        pair.wait_replicating()
        yield pair
    finally:
        _stop(pair.replica)
        _stop(pair.primary)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mariadb_replica() -> Iterator[ReplicaPair]:
    """A fresh private MariaDB primary + replica for one test."""
    with mariadb_replica_pair() as pair:
        yield pair
