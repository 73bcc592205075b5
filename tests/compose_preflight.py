"""The preflight service: compose's ``${VAR:?}`` refuses only unset or empty secrets, so a
one-shot container refuses those still set to .env.example's ``change-me``, and every other
service waits for it. Checked by running its script here with its container's environment."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping

from tests.compose_check import (
    MissingVariable,
    argv,
    container_env,
    parse_env_file,
    resolved_services,
)
from tests.compose_rules import SECRET_NAME, Doc, services

PLACEHOLDER = "change-me"


def run_preflight(doc: Doc, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """The preflight service's command, run here with the environment its container gets
    (a POSIX shell script using env, grep, cut, sort and tr, as busybox has them)."""
    svc = resolved_services(doc, env)["preflight"]
    args = argv(svc.get("command"))
    if args[:2] != ["sh", "-c"]:
        raise ValueError(f"preflight.command must be `sh -c SCRIPT`, is {args!r}")
    return subprocess.run(args, env={"PATH": "/usr/bin:/bin", **container_env(svc, env)},
                          capture_output=True, text=True, timeout=30)


def check_placeholders_refused(doc: Doc, env_text: str) -> list[str]:
    """preflight refuses every secret .env.example leaves as change-me, naming it; passes once
    they are replaced; and every other service waits for it, directly or through another."""
    problems = []
    env = parse_env_file(env_text)
    placeholders = sorted(k for k, v in env.items() if SECRET_NAME.search(k) and
                          v == PLACEHOLDER)
    if "preflight" not in services(doc):
        return ["no preflight service refuses change-me"]
    try:
        proc = run_preflight(doc, env)
    except (ValueError, MissingVariable) as exc:
        return [f"preflight: {exc}"]
    if proc.returncode == 0:
        problems.append("preflight passes .env.example's change-me placeholders")
    named = set(proc.stderr.split())
    problems += [f"preflight does not name {var} when it is change-me"
                 for var in placeholders if var not in named]
    real = {k: ("s3cret" if v == PLACEHOLDER else v) for k, v in env.items()}
    if (done := run_preflight(doc, real)).returncode != 0:
        problems.append(f"preflight refuses replaced secrets: {done.stderr.strip()}")

    def waits(name: str, seen: frozenset[str] = frozenset()) -> bool:
        deps = services(doc).get(name, {}).get("depends_on") or {}
        return "preflight" in deps or any(waits(d, seen | {name}) for d in deps
                                          if d not in seen)
    problems += [f"{name}: does not wait for preflight" for name in services(doc)
                 if name != "preflight" and not waits(name)]
    return problems
