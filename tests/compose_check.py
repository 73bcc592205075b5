"""Reading docker-compose.yml the way Compose does: variable interpolation (``${VAR}``,
``${VAR:-default}``, ``${VAR:?error}``, ``$$``, nested defaults), ``.env`` files, and the
services with their resolved commands and environments. tests/unit/test_compose.py checks
the result against the code; with no Docker engine here, this is how the file stays correct.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPS = (":-", ":?", ":+", "-", "?", "+")


class MissingVariable(ValueError):
    """A ``${VAR:?message}`` whose variable is unset or empty, as Compose refuses it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"required variable {name} is missing a value: {message}")
        self.name = name


@dataclass
class Var:
    name: str
    op: str = ""
    word: list[str | Var] = field(default_factory=list)


def parse(text: str) -> list[str | Var]:
    """*text* as literal strings and variable references."""
    return _parse(text, 0, nested=False)[0]


def _parse(text: str, i: int, *, nested: bool) -> tuple[list[str | Var], int]:
    out: list[str | Var] = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            out.append("".join(buf))
            buf.clear()

    while i < len(text):
        if nested and text[i] == "}":
            break
        if text.startswith("$$", i):
            buf.append("$")
            i += 2
        elif text.startswith("${", i):
            m = _NAME.match(text, i + 2)
            if m is None:
                raise ValueError(f"invalid interpolation at {i} in {text!r}")
            op = next((o for o in _OPS if text.startswith(o, m.end())), "")
            j = m.end() + len(op)
            word: list[str | Var] = []
            if op:
                word, j = _parse(text, j, nested=True)
            if j >= len(text) or text[j] != "}":
                raise ValueError(f"unclosed ${{ in {text!r}")
            flush()
            out.append(Var(m.group(), op, word))
            i = j + 1
        elif text[i] == "$" and (m := _NAME.match(text, i + 1)):
            flush()
            out.append(Var(m.group()))
            i = m.end()
        else:
            buf.append(text[i])
            i += 1
    flush()
    return out, i


def evaluate(nodes: list[str | Var], env: Mapping[str, str]) -> str:
    """Compose's semantics; a default is evaluated only when it is used, as Compose does."""
    parts: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
            continue
        value = env.get(node.name)
        # The colon forms treat an empty value as unset.
        present = bool(value) if node.op.startswith(":") else value is not None
        if node.op in (":?", "?") and not present:
            raise MissingVariable(node.name, evaluate(node.word, env))
        if node.op in (":-", "-") and not present:
            parts.append(evaluate(node.word, env))
        elif node.op in (":+", "+"):
            parts.append(evaluate(node.word, env) if present else "")
        else:
            parts.append(value or "")
    return "".join(parts)


def variables(nodes: list[str | Var]) -> Iterator[Var]:
    """Every variable referenced, including those nested in defaults."""
    for node in nodes:
        if isinstance(node, Var):
            yield node
            yield from variables(node.word)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string in *value* (keys are left as they are, as in Compose)."""
    if isinstance(value, str):
        return evaluate(parse(value), env)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def strings(value: Any) -> Iterator[str]:
    """Every string value in a parsed YAML tree."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def load_compose(text: str | None = None) -> dict[str, Any]:
    """The compose file as YAML (anchors and ``<<`` merges applied), before interpolation."""
    doc = yaml.safe_load(COMPOSE_FILE.read_text() if text is None else text)
    assert isinstance(doc, dict)
    return doc


def parse_env_file(text: str) -> dict[str, str]:
    """The variables a ``.env`` file sets (comment lines set nothing)."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[name.strip()] = value
    return env


def documented_names(text: str) -> set[str]:
    """Names a ``.env`` file documents: set (``NAME=``) or shown commented (``# NAME=``)."""
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))


def environment(service: Mapping[str, Any]) -> dict[str, str | None]:
    """A service's environment as a dict; None marks a pass-through (``NAME:`` / ``- NAME``)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        out: dict[str, str | None] = {}
        for item in raw:
            name, sep, value = str(item).partition("=")
            out[name] = value if sep else None
        return out
    return {str(k): None if v is None else str(v) for k, v in raw.items()}


def container_env(service: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """What the container sees: pass-throughs take their value from *env* or stay unset."""
    out: dict[str, str] = {}
    for name, value in environment(service).items():
        if value is not None:
            out[name] = value
        elif name in env:
            out[name] = env[name]
    return out


def argv(command: Any) -> list[str]:
    """A command (list, or string split as Compose splits it) as an argument list."""
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def healthcheck_argv(service: Mapping[str, Any]) -> list[str]:
    """The healthcheck's command; a CMD-SHELL one up to its first pipe or ``&&``."""
    test = (service.get("healthcheck") or {}).get("test")
    if not test:
        return []
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if test[0] == "CMD":
        return [str(a) for a in test[1:]]
    if test[0] == "CMD-SHELL":
        words = shlex.split(str(test[1]))
        for stop in ("|", "&&", "||", ";"):
            if stop in words:
                words = words[: words.index(stop)]
        return words
    return []


def resolved_services(doc: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Every service (all profiles) with its variables interpolated from *env*."""
    return {name: interpolate(copy.deepcopy(svc), env)
            for name, svc in (doc.get("services") or {}).items()}
