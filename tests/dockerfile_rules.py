"""What the Dockerfile and .dockerignore must hold: a multi-stage build on a slim Python 3.11
image, a runtime stage with no build tools that runs as a non-root user and installs the
package with the flower extra, no secrets, and a build context that is an allowlist.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.compose_check import ROOT
from tests.compose_rules import SECRET_NAME

BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|libc6?-dev|\w+-dev)\b")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1].strip() + " "
            continue
        word, _, rest = (buf + stripped).partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def check_dockerfile(text: str, ignore_text: str, root: Path = ROOT) -> list[str]:
    instructions = dockerfile_instructions(text)
    args = {k: v for word, rest in instructions if word == "ARG" and "=" in rest
            for k, v in [rest.split("=", 1)]}
    stages: list[list[tuple[str, str]]] = []
    for word, rest in instructions:
        if word == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word, rest))
    if len(stages) < 2:
        return ["the Dockerfile must be multi-stage: build wheels, then a runtime stage"]
    problems = []
    final = stages[-1]
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group()),
                  final[0][1].split()[0])
    if not re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base):
        problems.append(f"the runtime stage must be a slim Python 3.11 image, is {base!r}")
    users = [rest.split(":")[0] for word, rest in final if word == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("the runtime stage must end as a non-root USER")
    for word, rest in final:
        if word == "RUN" and ("install" in rest and BUILD_TOOLS.search(rest)):
            problems.append(f"the runtime stage installs build tools: RUN {rest}")
    if not any(word == "RUN" and "statesweep[flower" in rest for word, rest in final):
        problems.append("the runtime stage must install statesweep with the flower extra")
    for word, rest in instructions:
        names = re.findall(r"(?:^|\s)(\w+)=", rest) or rest.split()[:1]
        if word in ("ENV", "ARG") and any(SECRET_NAME.search(n) for n in names):
            problems.append(f"the image must hold no secrets: {word} {rest}")
    patterns = [p.strip() for p in ignore_text.splitlines() if p.strip() and p[0] != "#"]
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    if patterns[:1] != ["*"] or any(".env" in a for a in allowed):
        problems.append(".dockerignore must start with * and let no .env into the context")
    for word, rest in instructions:
        if word == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                if src.startswith("--"):
                    continue
                if not (root / src).exists() or src.rstrip("/") not in allowed:
                    problems.append(f"COPY {src}: missing or excluded by .dockerignore")
    return problems
