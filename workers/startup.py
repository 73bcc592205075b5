"""What a worker and beat check before they consume or schedule anything: the run store.

Runs, the single-flight lock and the in-flight window live in the run store; every worker, beat
and the CLI must share one. A process that would silently get a store of its own (memory://,
because no setting names a Redis) or a Redis that cannot hold one (older than 7: the run
scripts use ``EXPIRE ... GT``; a maxmemory-policy that may evict a lock or a window mid-run)
refuses to start with one line, rather than fail or lose work mid-run. The CLI's embedded mode
(``statesweep demo``, ``cleanup --local``) never comes here: one process shares its own store.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from workers.exceptions import SettingsError
from workers.exit_codes import EXIT_SETTINGS, EXIT_UNAVAILABLE
from workers.masking import mask_secrets, mask_url
from workers.settings import Settings, is_redis

#: The oldest Redis the run store works on: its scripts set TTLs with ``EXPIRE key ttl GT``.
MIN_REDIS_VERSION = (7, 0)
#: The only maxmemory-policy under which Redis never drops a key to make room: any other may
#: evict the lock (a second run starts) or a run's window (its chunks are lost).
SAFE_MAXMEMORY_POLICY = "noeviction"


class StartupRefused(Exception):
    """A reason for a worker or beat not to start: one line, and the exit code to leave with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def run_store_source(settings: Settings) -> str:
    """The variable the run store's URL comes from (an explicit one, else the Redis result
    backend or broker it falls back to)."""
    if settings.run_store_url:
        return "STATESWEEP_RUN_STORE_URL"
    if is_redis(settings.result_backend):
        return "STATESWEEP_RESULT_BACKEND"
    if is_redis(settings.broker_url):
        return "STATESWEEP_BROKER_URL"
    return "STATESWEEP_RUN_STORE_URL"


def check_shared_run_store(settings: Settings) -> None:
    """A SettingsError when no setting names a shared run store, so this process would fall
    back to one in its own memory that no other worker, beat or CLI sees."""
    if settings.run_store_url or not settings.effective_run_store_url.startswith("memory://"):
        return
    raise SettingsError(
        "STATESWEEP_RUN_STORE_URL is unset and neither STATESWEEP_RESULT_BACKEND="
        f"{mask_url(settings.result_backend)!r} nor STATESWEEP_BROKER_URL="
        f"{mask_url(settings.broker_url)!r} is Redis, so each process would keep its own runs "
        "and lock in memory:// and runs would collide; set STATESWEEP_RUN_STORE_URL to a "
        "Redis 7 every worker, beat and the CLI reach (e.g. redis://HOST:6379/0)")


def parse_version(text: str) -> tuple[int, ...]:
    """``"7.0.15"`` -> (7, 0, 15); the leading numbers only (``"6.2.6-v3"`` -> (6, 2, 6))."""
    numbers = re.findall(r"\d+", text.split("-", 1)[0])
    return tuple(int(n) for n in numbers[:3])


def redis_info_problems(info: Mapping[str, Any]) -> list[str]:
    """What in a Redis INFO reply (``redis_version``, ``maxmemory_policy``) makes it unfit for
    the run store, each as "what was found: why"; empty when it is fit."""
    problems = []
    version = str(info.get("redis_version", ""))
    if not version or parse_version(version)[:2] < MIN_REDIS_VERSION:
        problems.append(f"Redis {version or '(no redis_version in INFO)'} is older than "
                        f"{'.'.join(map(str, MIN_REDIS_VERSION))}, which the run store needs "
                        "(EXPIRE ... GT); upgrade it or point the URL at a Redis 7")
    policy = str(info.get("maxmemory_policy", ""))
    if policy != SAFE_MAXMEMORY_POLICY:
        problems.append(f"maxmemory-policy {policy or '(unknown)'} may evict the run lock or a "
                        f"run's window; set maxmemory-policy {SAFE_MAXMEMORY_POLICY} on it "
                        "(or use a Redis of its own for STATESWEEP_RUN_STORE_URL)")
    return problems


def redis_info(url: str) -> dict[str, Any]:
    """INFO server and memory of the Redis at *url* (short timeouts). INFO, not CONFIG GET:
    managed Redis services often refuse CONFIG."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        info: dict[str, Any] = {**client.info("server"), **client.info("memory")}
        return info
    finally:
        client.close()


def check_run_store_redis(settings: Settings,
                          info_of: Callable[[str], Mapping[str, Any]] = redis_info) -> None:
    """StartupRefused when the run store's Redis is unreachable (EXIT_UNAVAILABLE), too old
    or may evict keys (EXIT_SETTINGS). *info_of* reads INFO from a URL (a seam for tests)."""
    import redis

    url = settings.effective_run_store_url
    if url.startswith("memory://"):
        return
    where = f"{run_store_source(settings)}={mask_url(url)}"
    try:
        info = info_of(url)
    except redis.RedisError as exc:
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupRefused(f"run store {where} is unreachable: {type(exc).__name__}: "
                             f"{mask_secrets(cause)}", EXIT_UNAVAILABLE) from None
    problems = redis_info_problems(info)
    if problems:
        raise StartupRefused(f"run store {where}: {'; '.join(problems)}", EXIT_SETTINGS)


def check_run_store(settings: Settings) -> None:
    """Every run-store check a worker or beat makes at start; StartupRefused on the first."""
    try:
        check_shared_run_store(settings)
    except SettingsError as exc:
        raise StartupRefused(str(exc), EXIT_SETTINGS) from None
    check_run_store_redis(settings)
