"""What docker-compose.yml and .env.example must agree on with the code.

Each ``check_*`` takes the parsed files and returns a list of problems (empty when all is
well), so tests/unit/test_compose.py can run it on the real files and on broken copies.
"""

from __future__ import annotations

import functools
import re
import subprocess
from collections.abc import Mapping
from typing import Any

import click
from click.testing import CliRunner

from tests.compose_check import (
    ROOT,
    MissingVariable,
    argv,
    container_env,
    documented_names,
    environment,
    healthcheck_argv,
    parse,
    parse_env_file,
    resolved_services,
    strings,
    variables,
)
from tests.processes import CELERY, child_env
from workers.exceptions import SettingsError
from workers.settings import ENV_VARS, Settings

Doc = Mapping[str, Any]
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|BASIC_AUTH")
# Settings compose need not pass: it always sets STATESWEEP_DATABASE_URL, which wins.
NOT_PASSED = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"}
# Variables Compose itself reads from .env.
COMPOSE_OWN = {"COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME", "COMPOSE_FILE"}


def services(doc: Doc) -> dict[str, Any]:
    return dict(doc.get("services") or {})


def celery_parts(args: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(app, subcommand, subcommand args) of ``celery -A app sub ...`` arguments."""
    app = None
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] in ("-A", "--app"):
            app, i = args[i + 1], i + 2
        elif args[i].startswith(("-A=", "--app=")):
            app, i = args[i].partition("=")[2], i + 1
        else:
            i += 1
    return app, (args[i] if i < len(args) else None), args[i + 1:]


def entry_points(doc: Doc, env: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """(where, argv) of every statesweep or celery command: service commands and healthchecks."""
    found = []
    for name, svc in resolved_services(doc, env).items():
        for where, args in ((f"{name}.command", argv(svc.get("command"))),
                            (f"{name}.healthcheck", healthcheck_argv(svc))):
            if args and args[0] in ("statesweep", "celery"):
                found.append((where, args))
    return found


def statesweep_problem(args: list[str]) -> str | None:
    """Why ``statesweep <args>`` is not a real invocation of the CLI, or None."""
    from workers.cli import cli

    cmd: click.Command = cli
    rest, path = list(args), ["statesweep"]
    while isinstance(cmd, click.Group):
        if not rest or rest[0].startswith("-"):
            return f"`{' '.join(path)}` needs a subcommand"
        sub = cmd.get_command(click.Context(cmd), rest[0])
        if sub is None:
            return f"`{' '.join(path)}` has no command {rest[0]!r}"
        path.append(rest.pop(0))
        cmd = sub
    try:
        cmd.make_context(" ".join(path), list(rest))
    except click.ClickException as exc:
        return f"`{' '.join(path + rest)}`: {exc.format_message()}"
    result = CliRunner().invoke(cli, [*args, "--help"])
    if result.exit_code != 0:
        return f"`statesweep {' '.join(args)} --help` exited {result.exit_code}"
    return None


@functools.cache
def _celery_help(args: tuple[str, ...], env: tuple[tuple[str, str], ...]) -> tuple[int, str]:
    proc = subprocess.run([CELERY, *args, "--help"], cwd=ROOT, env=child_env(dict(env)),
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def celery_problem(args: list[str], env: Mapping[str, str]) -> str | None:
    """Why ``celery <args>`` would not start with this environment, or None."""
    app, sub, sub_args = celery_parts(args)
    if app != "workers":
        return f"`celery {' '.join(args)}` must load the app with -A workers, not {app!r}"
    if sub == "flower":
        # Flower passes its options to tornado, so `--help` would not catch a misspelt one.
        from flower.options import default_options

        for arg in sub_args:
            name = arg.lstrip("-").partition("=")[0].replace("-", "_")
            if arg.startswith("--") and name not in default_options:
                return f"`celery {' '.join(args)}`: {arg!r} is not a Flower option"
    code, out = _celery_help(tuple(args), tuple(sorted(env.items())))
    if code != 0:
        tail = out.strip().splitlines()[-1:] or [""]
        return f"`celery {' '.join(args)} --help` exited {code}: {tail[0]}"
    if f"Usage: celery {sub}" not in out:
        return f"`celery {' '.join(args)} --help` did not show the {sub!r} command's help"
    return None


def check_commands(doc: Doc, env_text: str) -> list[str]:
    env = parse_env_file(env_text)
    svcs = resolved_services(doc, env)
    problems = []
    for where, args in entry_points(doc, env):
        svc = svcs[where.partition(".")[0]]
        if args[0] == "statesweep":
            problem = statesweep_problem(args[1:])
        else:
            problem = celery_problem(args[1:], container_env(svc, env))
        if problem:
            problems.append(f"{where}: {problem}")
    return problems


def check_settings(doc: Doc, env_text: str) -> list[str]:
    """Each statesweep container's environment loads as settings, and workers consume the
    queues those settings route to."""
    env = parse_env_file(env_text)
    problems = []
    for name, svc in resolved_services(doc, env).items():
        args = argv(svc.get("command"))
        if not args or args[0] not in ("statesweep", "celery"):
            continue
        try:
            settings = Settings.from_env(container_env(svc, env))
        except SettingsError as exc:
            problems.append(f"{name}: {exc}")
            continue
        _, sub, sub_args = celery_parts(args[1:])
        if args[0] == "celery" and sub == "worker":
            queues = [a.partition("=")[2] for a in sub_args if a.startswith("--queues=")]
            queues += [b for a, b in zip(sub_args, sub_args[1:], strict=False)
                       if a in ("-Q", "--queues")]
            want = {settings.control_queue, settings.chunk_queue}
            got = {q for arg in queues for q in arg.split(",")}
            if got != want:
                problems.append(f"{name}: consumes queues {sorted(got)}, settings route "
                                f"tasks to {sorted(want)}")
    return problems


def check_env_names(doc: Doc, env_text: str) -> list[str]:
    """Every STATESWEEP_/AIRFLOW__/FLOWER_ name passed is one the code reads, and every
    setting reaches the statesweep containers."""
    from flower.options import default_options

    problems = []
    for name, svc in services(doc).items():
        for var in environment(svc):
            if var.startswith(("STATESWEEP_", "AIRFLOW__")) and var not in ENV_VARS:
                problems.append(f"{name}: {var} is not a setting (workers.settings.ENV_VARS)")
            # Only Flower reads FLOWER_ options (preflight checks FLOWER_PASSWORD's value).
            if (var.startswith("FLOWER_") and "flower" in argv(svc.get("command"))
                    and var[7:].lower() not in default_options):
                problems.append(f"{name}: {var} is not a Flower option; Flower ignores it")
        if argv(svc.get("command"))[:1] == ["celery"]:
            for missing in sorted(set(ENV_VARS) - NOT_PASSED - set(environment(svc))):
                problems.append(f"{name}: setting {missing} is not passed to the container")
    for var in {v.name for s in strings(services(doc)) for v in variables(parse(s))}:
        if var.startswith("STATESWEEP_") and var not in ENV_VARS:
            problems.append(f"${{{var}}} looks like a setting but is not one")
    return problems


def check_documented(doc: Doc, env_text: str) -> list[str]:
    """Every variable compose reads is documented in .env.example, and nothing else is."""
    used = {v.name for s in strings(services(doc)) for v in variables(parse(s))}
    used |= {var for svc in services(doc).values()
             for var, value in environment(svc).items() if value is None}
    documented = documented_names(env_text)
    problems = [f"{var} is used by docker-compose.yml but not documented in .env.example"
                for var in sorted(used - documented)]
    problems += [f"{var} is documented in .env.example but docker-compose.yml does not use it"
                 for var in sorted(documented - used - COMPOSE_OWN)]
    return problems


def check_healthchecks(doc: Doc) -> list[str]:
    problems = []
    for name in ("postgres", "redis", "flower", "worker", "exporter", "prometheus"):
        check = services(doc).get(name, {}).get("healthcheck") or {}
        test = check.get("test")
        if not test or check.get("disable") or test == ["NONE"]:
            problems.append(f"{name}: no healthcheck")
    test = " ".join(map(str, (services(doc).get("redis", {}).get("healthcheck") or {})
                        .get("test") or []))
    if "REDIS_PASSWORD" not in test or not re.search(r"REDISCLI_AUTH|\s-a\s|--pass", test):
        problems.append("redis: the healthcheck does not authenticate with REDIS_PASSWORD")
    return problems


def check_beat(doc: Doc) -> list[str]:
    problems = []
    beats = [n for n, s in services(doc).items()
             if celery_parts(argv(s.get("command"))[1:])[1] == "beat"]
    if beats != ["beat"]:
        problems.append(f"exactly one service must run celery beat, found {beats}")
    beat = services(doc).get("beat", {})
    deploy = beat.get("deploy") or {}
    if deploy.get("replicas") != 1 or deploy.get("mode") == "global":
        problems.append(f"beat: deploy.replicas must be 1, is {deploy.get('replicas')!r}")
    if beat.get("scale", 1) != 1:
        problems.append(f"beat: scale must be 1, is {beat.get('scale')!r}")
    for name, svc in services(doc).items():
        args = argv(svc.get("command"))
        if celery_parts(args[1:])[1] == "worker" and {"-B", "--beat"} & set(args):
            problems.append(f"{name}: a worker with an embedded beat scales the beat too")
    return problems


def check_worker_scalable(doc: Doc) -> list[str]:
    worker = services(doc).get("worker", {})
    problems = [f"worker: {key} stops --scale worker=N" for key in
                ("container_name", "ports", "hostname") if key in worker]
    for arg in argv(worker.get("command")):
        if arg.startswith(("--hostname=", "-n=")) and "%h" not in arg:
            problems.append(f"worker: {arg} gives every replica the same node name")
    return problems


def _literal(text: str) -> str:
    """The part of *text* that is not a variable reference."""
    return "".join(n for n in parse(text) if isinstance(n, str))


def check_secrets(doc: Doc, env_text: str) -> list[str]:
    problems = []
    for text in strings(services(doc)):
        # Each ${...} becomes one marker, so a reference's error message cannot hide a URL.
        masked = "".join(n if isinstance(n, str) else "\x01" for n in parse(text))
        for password in re.findall(r"://[^\s/@:]*:([^\s@]+)@", masked):
            if password.replace("\x01", ""):
                problems.append(f"a URL holds a literal password: {text!r}")
    for name, svc in services(doc).items():
        for var, value in environment(svc).items():
            if SECRET_NAME.search(var) and value is not None and _literal(value).strip(":"):
                problems.append(f"{name}: {var} is a literal, not ${{...}} from .env")
        args = argv(svc.get("command"))
        for flag, value in zip(args, args[1:], strict=False):
            if flag in ("--requirepass", "-a", "--password") and "$" not in value:
                problems.append(f"{name}: {flag} takes a literal password")
    refs = [v for s in strings(services(doc)) for v in variables(parse(s))]
    for var in sorted({v.name for v in refs if SECRET_NAME.search(v.name)}):
        if not any(v.name == var and v.op == ":?" for v in refs):
            problems.append(f"{var} is never required with ${{{var}:?...}}")
    try:
        resolved_services(doc, {})
        problems.append("the stack resolves with no .env at all: no secret is required")
    except MissingVariable:
        pass
    for var, value in parse_env_file(env_text).items():
        if SECRET_NAME.search(var) and value != "change-me":
            problems.append(f".env.example: {var} must be the placeholder change-me")
    return problems
