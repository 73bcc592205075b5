"""Test hosts as Linux network namespaces, each joined to the root namespace by a veth pair.

Host *i* gets the /30 ``10.213.X.4i`` with ``.4i+1`` on the root end and ``.4i+2`` inside the
namespace, X chosen so that no address of the machine is in 10.213.X.0/24. Nothing is routed
beyond the pair: a host reaches only what the test binds to its root-end address. The
machine's services listen on loopback only, so the test puts :class:`Forwarder` s (or a
private server) on those addresses. Partitioning a host sets its root end down: packets are
dropped both ways, so its TCP connections hang, neither closed nor reset.

Needs root and iproute2; without them a test skips locally and fails under CI=true.
Namespaces, links and every process inside them are removed even when the test fails.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.processes import WorkerProcess, start_worker
from tests.services import CI

IP = shutil.which("ip")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(IP), *args], capture_output=True, text=True, check=check,
                          timeout=30)


@dataclass
class Host:
    """One test host: a namespace, its veth pair and its two addresses."""

    ns: str
    outer: str
    inner: str
    root_addr: str
    addr: str

    def partition(self) -> None:
        _ip("link", "set", self.outer, "down")

    def heal(self) -> None:
        _ip("link", "set", self.outer, "up")

    def command(self, cmd: list[str]) -> list[str]:
        return [str(IP), "netns", "exec", self.ns, *cmd]


def require_netns() -> None:
    reason = None
    if IP is None:
        reason = "iproute2 (ip) is not installed"
    elif os.geteuid() != 0:
        reason = "network namespaces need root"
    if reason is None:
        probe = f"swprobe{uuid.uuid4().hex[:6]}"
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            reason = f"cannot create a network namespace: {made.stderr.strip()}"
        else:
            _ip("netns", "del", probe, check=False)
    if reason:
        if CI:
            pytest.fail(f"{reason} (CI=true: the partition tests must run)")
        pytest.skip(reason)


def _free_subnet() -> int:
    """A free 10.213.X.0/24. Parallel test processes (pytest-xdist's ``gwN``) draw from disjoint
    residues of X, so two of them never pick the same subnet between reading and adding it."""
    used = _ip("-4", "-o", "addr").stdout
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    share = int(worker) % 16 if worker.isdigit() else 0
    free = [x for x in range(256) if x % 16 == share and f" 10.213.{x}." not in used]
    return random.choice(free)


@contextmanager
def network_hosts(count: int) -> Iterator[list[Host]]:
    """*count* hosts, removed with every process in them when the block ends."""
    require_netns()
    tag, x = uuid.uuid4().hex[:6], _free_subnet()
    hosts: list[Host] = []
    try:
        for i in range(1, count + 1):
            h = Host(f"sw-{tag}-h{i}", f"sw{tag}o{i}", f"sw{tag}i{i}",
                     f"10.213.{x}.{4 * i + 1}", f"10.213.{x}.{4 * i + 2}")
            hosts.append(h)
            _ip("netns", "add", h.ns)
            _ip("link", "add", h.outer, "type", "veth", "peer", "name", h.inner)
            _ip("link", "set", h.inner, "netns", h.ns)
            _ip("addr", "add", f"{h.root_addr}/30", "dev", h.outer)
            _ip("link", "set", h.outer, "up")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/30", "dev", h.inner)
            _ip("-n", h.ns, "link", "set", h.inner, "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for h in hosts:
            pids = _ip("netns", "pids", h.ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", h.ns, check=False)
            _ip("link", "del", h.outer, check=False)


# --- reaching the machine's services from the hosts ---------------------------------------------


@dataclass
class Forwarder:
    """Accepts TCP on *port* of each listen address and pipes each connection to *target*.

    It remembers which host each upstream connection serves (by its local port), so a test
    can tell which host a PostgreSQL session in pg_stat_activity belongs to. When either side
    closes, so does the other: the server sees a host's connection end only when the host's
    own side does, or when the server gives up on it (heartbeats, idle timeouts)."""

    listen: tuple[str, ...]
    target: tuple[str, int]
    port: int = 0
    peers: dict[int, str] = field(default_factory=dict)
    _sockets: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopped: bool = False

    def start(self) -> Forwarder:
        for addr in self.listen:
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((addr, self.port))
            self.port = srv.getsockname()[1]
            srv.listen(64)
            self._sockets.append(srv)
            threading.Thread(target=self._accept, args=(srv,), daemon=True).start()
        return self

    def _accept(self, srv: socket.socket) -> None:
        while not self._stopped:
            try:
                down, peer = srv.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            with self._lock:
                self.peers[up.getsockname()[1]] = peer[0]
                self._sockets += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def peer_of(self, upstream_port: int) -> str | None:
        with self._lock:
            return self.peers.get(upstream_port)

    def stop(self) -> None:
        self._stopped = True
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


@contextmanager
def forwarding(listen: tuple[str, ...], target: tuple[str, int]) -> Iterator[Forwarder]:
    fwd = Forwarder(listen, target).start()
    try:
        yield fwd
    finally:
        fwd.stop()


@contextmanager
def redis_on(addresses: tuple[str, ...]) -> Iterator[int]:
    """A private redis-server listening on loopback and *addresses*; yields its port. Private,
    because a test's low visibility timeout would otherwise restore other tests' messages."""
    server = shutil.which("redis-server")
    if server is None:
        if CI:
            pytest.fail("redis-server is not installed (CI=true: a missing service fails)")
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", *addresses,
                             "--protected-mode", "no", "--save", "", "--appendonly", "no",
                             "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)


def start_host_worker(host: Host, env: Mapping[str, str], log_dir: Path, name: str, *,
                      concurrency: int = 1, ready_timeout: float = 60) -> WorkerProcess:
    """A real ``celery worker`` inside *host*'s namespace; returns once it is ready."""
    return start_worker(env, log_dir, name, concurrency=concurrency, ready_timeout=ready_timeout,
                        wrap=host.command)
