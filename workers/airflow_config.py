"""Airflow's configuration, read the way Airflow reads it, without importing Airflow.

For the settings statesweep shares with Airflow, each value comes from the first of:

1. ``STATESWEEP_<NAME>`` (statesweep's own; handled by workers.settings),
2. ``AIRFLOW__<SECTION>__<KEY>``,
3. ``AIRFLOW__<SECTION>__<KEY>_CMD`` (a command whose stdout is the value),
4. ``airflow.cfg``: ``AIRFLOW_CONFIG``, else ``$AIRFLOW_HOME/airflow.cfg``, else
   ``~/airflow/airflow.cfg``; the key itself, then ``<key>_cmd`` in the same section,
5. statesweep's default.

As in Airflow, ``_cmd`` forms are honoured only for sensitive keys (the connection string), the
file is read with configparser and interpolation off, and a command runs without a shell. A
command's output is a secret: errors name the key and the command's exit status, never output.
"""

from __future__ import annotations

import configparser
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from workers.exceptions import SettingsError

# statesweep setting -> (section, key) in Airflow's configuration.
AIRFLOW_KEYS: dict[str, tuple[str, str]] = {
    "database_url": ("database", "sql_alchemy_conn"),
    "default_retention_days": ("state_store", "default_retention_days"),
    "cleanup_batch_size": ("state_store", "state_cleanup_batch_size"),
    "state_backend": ("state_store", "backend"),
    # Beside a CeleryExecutor deployment: the same broker and Redis, statesweep's own queues
    # (statesweep.control, statesweep.chunks) and key prefix, never Airflow's tasks.
    "broker_url": ("celery", "broker_url"),
    "result_backend": ("celery", "result_backend"),
}
# Airflow runs `_cmd` only for its sensitive_config_values; of ours, the connection and the
# Celery broker and result backend. (`_secret` needs Airflow's secrets backend: not read.)
CMD_KEYS = {("database", "sql_alchemy_conn"), ("celery", "broker_url"),
            ("celery", "result_backend")}
#: What statesweep takes from Airflow's [celery] section: a Redis or RabbitMQ broker, a Redis
#: result backend (it holds the run store). Anything else (Airflow's usual db+postgresql://
#: result backend, SQS) stays statesweep's own setting, and doctor says why.
ADOPTED_SCHEMES = {"broker_url": ("redis", "rediss", "amqp", "amqps", "pyamqp"),
                   "result_backend": ("redis", "rediss")}
CMD_TIMEOUT_SECONDS = 10.0

# Airflow's own metastore backend (and the name statesweep's standalone schema uses): the
# state lives in the tables statesweep cleans.
METASTORE_NAMES = ("airflow.state.metastore.MetastoreBackend",
                   "airflow.state.metastore.MetastoreStateBackend",
                   "workers.store.MetastoreStateBackend")


@dataclass(frozen=True)
class Found:
    """A raw value and where it came from, in words fit for an error message or `doctor`."""

    raw: str
    source: str


def env_name(section: str, key: str) -> str:
    return f"AIRFLOW__{section.upper()}__{key.upper()}"


def config_path(environ: Mapping[str, str]) -> tuple[Path | None, bool]:
    """The airflow.cfg Airflow would read, and whether it was named explicitly (AIRFLOW_CONFIG).

    Home comes from *environ*, so settings built from a given mapping never read the real ~."""
    if environ.get("AIRFLOW_CONFIG"):
        return Path(environ["AIRFLOW_CONFIG"]).expanduser(), True
    if environ.get("AIRFLOW_HOME"):
        return Path(environ["AIRFLOW_HOME"]).expanduser() / "airflow.cfg", False
    home = environ.get("HOME")
    return (Path(home) / "airflow" / "airflow.cfg" if home else None), False


class AirflowConfig:
    """Airflow's environment variables and airflow.cfg, read once per settings load."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.path, explicit = config_path(environ)
        self.parser: configparser.ConfigParser | None = None
        self.state = "none"  # none | missing | read
        if self.path is None:
            return
        if not self.path.exists():
            if explicit:
                raise SettingsError(f"AIRFLOW_CONFIG={self.path}: no such file")
            self.state = "missing"
            return
        # Interpolation off: a '%' in a password is a '%', as Airflow reads these keys.
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            with self.path.open(encoding="utf-8") as f:
                parser.read_file(f)
        except (OSError, UnicodeDecodeError, configparser.Error) as exc:
            # configparser's message quotes the offending line, which may hold a password.
            reason = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
            raise SettingsError(f"airflow.cfg {self.path} cannot be read: {reason}") from None
        self.parser = parser
        self.state = "read"

    def lookup(self, section: str, key: str) -> Found | None:
        """The value of ``[section] key`` by Airflow's precedence, or None if unset."""
        name = env_name(section, key)
        if name in self.environ:
            return Found(self.environ[name], name)
        sensitive = (section, key) in CMD_KEYS
        if sensitive and self.environ.get(f"{name}_CMD"):
            return Found(run_cmd(self.environ[f"{name}_CMD"], f"{name}_CMD"), f"{name}_CMD")
        if self.parser is None or not self.parser.has_section(section):
            return None
        where = f"airflow.cfg {self.path} [{section}]"
        if self.parser.has_option(section, key):
            return Found(self.parser.get(section, key), f"{where} {key}")
        if sensitive and self.parser.has_option(section, f"{key}_cmd"):
            label = f"{where} {key}_cmd"
            return Found(run_cmd(self.parser.get(section, f"{key}_cmd"), label), label)
        return None

    def describe(self) -> str:
        """Which airflow.cfg was considered, for `doctor`."""
        if self.path is None:
            return "none (no AIRFLOW_CONFIG, AIRFLOW_HOME or HOME)"
        return f"{self.path} ({'read' if self.state == 'read' else 'not found'})"


def run_cmd(command: str, label: str) -> str:
    """Run a ``_cmd`` value as Airflow does (split like a shell, no shell) and return stdout.

    Its output is the secret itself, so no error quotes it, nor the command's stderr."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise SettingsError(f"{label}: the command cannot be parsed ({exc})") from None
    if not argv:
        raise SettingsError(f"{label}: the command is empty")
    try:
        done = subprocess.run(argv, capture_output=True, timeout=CMD_TIMEOUT_SECONDS,
                              check=False)
    except subprocess.TimeoutExpired:
        raise SettingsError(
            f"{label}: the command did not finish within {CMD_TIMEOUT_SECONDS:g}s") from None
    except OSError as exc:
        raise SettingsError(f"{label}: the command cannot be run ({exc.strerror})") from None
    if done.returncode != 0:
        raise SettingsError(f"{label}: the command failed with exit status {done.returncode} "
                            "(its output is not shown: it may hold a secret)")
    value = done.stdout.decode("utf-8", errors="replace").strip()
    if not value:
        raise SettingsError(f"{label}: the command printed nothing")
    return value


def is_metastore(backend: str) -> bool:
    return backend.strip() in METASTORE_NAMES
