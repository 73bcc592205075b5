"""Prometheus and promtool for the tests: Debian's `prometheus` package (`make test` installs
it). Locally a missing binary skips with the reason; with CI=true it fails."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.services import CI

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    msg = f"{name} is not on PATH (Debian package `prometheus`; `make test` installs it)"
    if CI:
        pytest.fail(f"{msg}; CI=true needs it")
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def prometheus(tmp: Path, targets: list[str], *, interval: str = "1s") -> Iterator[str]:
    """A private Prometheus (own port, own storage in *tmp*) scraping *targets*; its URL."""
    binary = require_binary("prometheus")
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(RULES_DIR / "alerts.yml")],
        "scrape_configs": [{"job_name": "statesweep", "static_configs": [{"targets": targets}]}],
    }))
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp}/tsdb",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                output = (tmp / "prometheus.log").read_text()
                raise RuntimeError(f"prometheus did not start:\n{output}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """An instant query's result vector."""
    q = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def value(url: str, promql: str) -> float | None:
    """The single sample of *promql*, or None when it has none."""
    result = query(url, promql)
    return float(result[0]["value"][1]) if len(result) == 1 else None
