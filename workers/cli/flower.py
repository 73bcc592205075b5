"""``statesweep flower``: Flower for statesweep's app, refusing to start without auth.

Flower reads its options from ``FLOWER_<OPTION>`` variables and ignores any it does not know,
so ``FLOWER_USER``/``FLOWER_PASSWORD`` (compose's .env names) leave it open to anyone who can
reach the port. Flower's own switch is ``--basic-auth user:password`` / ``FLOWER_BASIC_AUTH``
(or OAuth with ``--auth`` / ``FLOWER_AUTH``); this command insists on one of them and then runs
``celery -A workers flower`` in its place. Flower is the ``[flower]`` extra.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys

import click

from workers.cli.base import load_settings
from workers.exceptions import InvalidArgument, RefusedError


def check_listen_address(address: str, port: int) -> None:
    """Bind *address*:*port* once and let go, so a port in use (or an address this host does
    not have) is one line naming --address and --port, not Tornado's traceback after exec.

    SO_REUSEADDR as Tornado sets it: a port left in TIME_WAIT by a stopped Flower is free."""
    try:
        infos = socket.getaddrinfo(address or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidArgument(f"--address {address!r} is not an address of this host "
                              f"({exc}); give an IP address or a name that resolves") from None
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise InvalidArgument(
                    f"--port {port} on --address {address} cannot be listened on: "
                    f"{exc.strerror or exc}; pick a free --port or stop what listens there"
                ) from None


def _has_auth(basic_auth: str, args: tuple[str, ...]) -> bool:
    oauth = bool(os.environ.get("FLOWER_AUTH")) or any(
        a == "--auth" or a.startswith("--auth=") for a in args)
    entries = [e for e in basic_auth.split(",") if e]
    basic = bool(entries) and all(
        user and password for user, _, password in (e.partition(":") for e in entries))
    return basic or oauth


@click.command("flower", context_settings={"ignore_unknown_options": True})
@click.option("--basic-auth", envvar="FLOWER_BASIC_AUTH", default="", show_envvar=True,
              help="user:password[,user2:password2]: Flower's basic auth.")
@click.option("--port", type=click.IntRange(1, 65535), default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 in a container).")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(basic_auth: str, port: int, address: str, flower_args: tuple[str, ...]) -> None:
    """Start Flower on statesweep's app, only with authentication configured.

    Further arguments are passed to Flower (e.g. --purge_offline_workers=3600)."""
    if not _has_auth(basic_auth, flower_args):
        raise RefusedError(
            "refusing to start Flower without authentication: anyone reaching the port could "
            "start and revoke tasks. Set FLOWER_BASIC_AUTH=user:password (or pass "
            "--basic-auth user:password, or Flower's OAuth --auth); FLOWER_USER and "
            "FLOWER_PASSWORD are compose's .env names, which Flower itself ignores")
    if importlib.util.find_spec("flower") is None:
        raise RefusedError("Flower is not installed: it is the [flower] extra, "
                           "pip install 'statesweep[flower]'")
    load_settings()  # a bad setting is the usual one error here, not Flower's traceback
    check_listen_address(address, port)
    env = dict(os.environ)
    if basic_auth:
        env["FLOWER_BASIC_AUTH"] = basic_auth  # in the environment, not in argv (ps shows it)
    argv = [sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={port}",
            f"--address={address}", *flower_args]
    os.execve(sys.executable, argv, env)
