"""Monitoring in docker-compose.yml: the exporter, and Prometheus (monitoring profile) loading
deploy/prometheus's config and alert rules and scraping the exporter and Flower."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.compose_check import ROOT, argv
from tests.compose_rules import Doc, services

PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def _option(args: list[str], name: str) -> str | None:
    return next((a.partition("=")[2] for a in args if a.startswith(f"{name}=")), None)


def check_monitoring(doc: Doc, config_text: str | None = None) -> list[str]:
    """Prometheus (monitoring profile) loads the shipped config and alert rules, and scrapes
    the exporter and Flower on the ports their commands listen on."""
    svcs = services(doc)
    problems = []
    exporter = argv(svcs.get("exporter", {}).get("command"))
    if exporter[:2] != ["statesweep", "exporter"]:
        problems.append("exporter: must run `statesweep exporter`")
    prom = svcs.get("prometheus", {})
    if prom.get("profiles") != ["monitoring"]:
        problems.append(f"prometheus: profiles must be [monitoring], is {prom.get('profiles')}")
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in prom.get("volumes") or []}
    config_path = _option(argv(prom.get("command")), "--config.file")
    for shipped in ("prometheus.yml", "alerts.yml"):
        if f"./deploy/prometheus/{shipped}" not in mounts:
            problems.append(f"prometheus: deploy/prometheus/{shipped} is not mounted")
    if mounts.get("./deploy/prometheus/prometheus.yml") != config_path:
        problems.append(f"prometheus: --config.file={config_path} is not the mounted config")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text() if config_text is None
                            else config_text)
    rules_at = {str(Path(config_path or "/").parent / r) for r in config.get("rule_files", [])}
    if mounts.get("./deploy/prometheus/alerts.yml") not in rules_at:
        problems.append("prometheus: the mounted alerts.yml is not in the config's rule_files")
    targets = {t for job in config.get("scrape_configs", [])
               for sc in job.get("static_configs", []) for t in sc.get("targets", [])
               if job.get("metrics_path", "/metrics") == "/metrics"}
    for name in ("exporter", "flower"):
        want = f"{name}:{_option(argv(svcs.get(name, {}).get('command')), '--port')}"
        if want not in targets:
            problems.append(f"prometheus does not scrape {want}/metrics "
                            f"(targets {sorted(targets)})")
    return problems
