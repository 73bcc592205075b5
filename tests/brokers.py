"""The two brokers a test can run on: Redis and RabbitMQ.

``broker`` is a fixture parametrised indirectly: a test that must hold on both brokers says
``@pytest.mark.parametrize("broker", BROKERS, indirect=True)``; any other gets Redis. RabbitMQ
tests use the machine's server with a virtual host of their own (deleted afterwards), so their
queues, exchanges and Celery's delay queues never meet another test's. A test that restarts
the broker starts a RabbitMQ node of its own (:class:`RabbitNode`) and never touches the
machine's.

The run store and the result backend are Redis whichever broker carries the tasks.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.services import CI, REDIS_URL, require

BROKERS = ["redis", "rabbitmq"]
RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
RABBITMQCTL = shutil.which("rabbitmqctl")
# The packaged server script re-execs itself as the rabbitmq user; a private node runs the
# real one as this user, with its own HOME (and so its own Erlang cookie).
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def _missing(what: str) -> None:
    if CI:
        pytest.fail(f"{what} (CI=true: a missing service is a failure)")
    pytest.skip(what)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """One broker as a test sees it: its URL and how many messages wait or are in flight."""

    name: str
    url: str
    vhost: str = ""
    ctl: list[str] = field(default_factory=list)
    ctl_env: dict[str, str] | None = None
    #: The private node behind this broker, when the test started one.
    node: RabbitNode | None = None

    @property
    def is_amqp(self) -> bool:
        return self.name == "rabbitmq"

    def ready(self, queue: str) -> int:
        """Messages waiting in *queue*. On RabbitMQ from a passive declare, which the queue's
        leader answers exactly (``rabbitmqctl list_queues`` lags by a stats interval)."""
        if not self.is_amqp:
            import redis

            with redis.Redis.from_url(self.url) as client:
                return int(client.llen(queue))  # type: ignore[arg-type]
        from amqp.exceptions import NotFound
        from kombu import Connection

        with Connection(self.url) as conn:
            try:
                _, count, _ = conn.channel().queue_declare(queue, passive=True)
            except NotFound:
                return 0
        return int(count)

    def unacked(self, queue: str) -> int:
        """Redis: messages of *queue* a consumer took and has not acknowledged (kombu's
        ``unacked`` hash). RabbitMQ publishes that count only every few seconds, too late for
        a test that must act while a chunk is held: there, count what the run has neither
        finished nor left waiting in the queue."""
        if self.is_amqp:
            raise NotImplementedError("RabbitMQ's unacked count lags; see the docstring")
        import json

        import redis

        with redis.Redis.from_url(self.url) as client:
            raw = client.hvals("unacked")
        return sum(1 for v in raw if json.loads(v)[2] == queue)  # type: ignore[union-attr]

    def queue_declarations(self) -> dict[str, str]:
        """RabbitMQ: each queue of the vhost with its type and arguments, as one line."""
        out = self.rabbitmqctl("list_queues", "-p", self.vhost, "--quiet", "--no-table-headers",
                               "name", "type", "durable", "arguments")
        return {cols[0]: " ".join(cols[1:]) for cols in map(str.split, out.splitlines())
                if cols}

    def rabbitmqctl(self, *args: str) -> str:
        done = subprocess.run([*self.ctl, *args], capture_output=True, text=True, timeout=60,
                              env=self.ctl_env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout


def machine_rabbitmq() -> list[str]:
    require("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    if RABBITMQCTL is None:
        _missing("rabbitmqctl is not installed")
    return [str(RABBITMQCTL)]


@contextmanager
def rabbit_vhost(ctl: list[str], port: int = RABBIT_PORT, host: str = RABBIT_HOST,
                 env: dict[str, str] | None = None) -> Iterator[Broker]:
    """A virtual host of its own on a RabbitMQ node, guest allowed in it; deleted afterwards."""
    vhost = f"sw_{uuid.uuid4().hex[:10]}"
    broker = Broker("rabbitmq", f"amqp://guest:guest@{host}:{port}/{vhost}", vhost, ctl, env)
    broker.rabbitmqctl("add_vhost", vhost)
    try:
        broker.rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield broker
    finally:
        try:
            broker.rabbitmqctl("delete_vhost", vhost)
        except RuntimeError:
            pass  # a private node already gone takes its vhosts with it


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """The test's broker: Redis (the machine's), or a fresh vhost on the machine's RabbitMQ."""
    name = getattr(request, "param", "redis")
    if name == "redis":
        require("Redis", "127.0.0.1", 6379)
        yield Broker("redis", REDIS_URL)
        return
    with rabbit_vhost(machine_rabbitmq()) as vhost_broker:
        yield vhost_broker


# --- a RabbitMQ node of the test's own ----------------------------------------------------------


@dataclass
class RabbitNode:
    """A private RabbitMQ node: its own node name, ports, data and log directories and Erlang
    cookie, so stopping it affects this test only. *listen* lists the addresses it accepts
    AMQP connections on (127.0.0.1, or a test host's veth address)."""

    base: Path
    listen: tuple[str, ...] = ("127.0.0.1",)
    port: int = field(default_factory=free_port)
    name: str = field(default_factory=lambda: f"sw{uuid.uuid4().hex[:8]}@localhost")
    proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        b = self.base
        return {**os.environ, "HOME": str(b), "RABBITMQ_NODENAME": self.name,
                "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(b / "mnesia"), "RABBITMQ_LOG_BASE": str(b / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(b / "node.pid"),
                "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(b / "advanced.config")}

    @property
    def ctl(self) -> list[str]:
        return [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name]

    def start(self, timeout: float = 90) -> None:
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            _missing("rabbitmq-server is not installed")
        self.base.mkdir(parents=True, exist_ok=True)
        if not hasattr(self, "dist_port"):
            self.dist_port = free_port()
            cookie = self.base / ".erlang.cookie"
            cookie.write_text(uuid.uuid4().hex)
            cookie.chmod(0o400)
            (self.base / "enabled_plugins").write_text("[].\n")
            (self.base / "rabbitmq.conf").write_text(
                "loopback_users = none\n" + "".join(
                    f"listeners.tcp.{i} = {addr}:{self.port}\n"
                    for i, addr in enumerate(self.listen, 1)))
        log = open(self.base / "server.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq node {self.name} exited:\n"
                                   + (self.base / "server.log").read_text()[-3000:])
            try:
                with socket.create_connection((self.listen[0], self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"rabbitmq node {self.name} not up in {timeout}s")

    def rabbitmqctl(self, *args: str) -> str:
        return Broker("rabbitmq", "", ctl=self.ctl, ctl_env=self.env).rabbitmqctl(*args)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.rabbitmqctl("shutdown")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.proc = None


@contextmanager
def own_rabbitmq(base: Path, listen: tuple[str, ...] = ("127.0.0.1",)) -> Iterator[Broker]:
    """A private RabbitMQ node and a vhost on it; the node is shut down afterwards."""
    node = RabbitNode(base, listen)
    node.start()
    try:
        with rabbit_vhost(node.ctl, node.port, listen[0], node.env) as b:
            b.node = node
            yield b
    finally:
        node.stop()
