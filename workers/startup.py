"""What a worker and beat check before they consume or schedule anything: the run store.

Runs, the single-flight lock and the in-flight window live in the run store; every worker, beat
and the CLI must share one. A process that would silently get a store of its own (memory://,
because no setting names a Redis) or a Redis that cannot hold one (older than 7: the run
scripts use ``EXPIRE ... GT``; a maxmemory-policy that may evict a lock or a window mid-run)
refuses to start with one line, rather than fail or lose work mid-run. The CLI's embedded mode
(``statesweep demo``, ``cleanup --local``) never comes here: one process shares its own store.
"""

from __future__ import annotations

from workers.exceptions import SettingsError
from workers.exit_codes import EXIT_SETTINGS
from workers.masking import mask_url
from workers.settings import Settings, is_redis


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


def check_run_store(settings: Settings) -> None:
    """Every run-store check a worker or beat makes at start; StartupRefused on the first."""
    try:
        check_shared_run_store(settings)
    except SettingsError as exc:
        raise StartupRefused(str(exc), EXIT_SETTINGS) from None
