"""Print the reliability suite's scenario lines as one table.

    STATESWEEP_RELIABILITY_REPORT=/tmp/rel.jsonl .venv/bin/python -m pytest tests/reliability
    .venv/bin/python -m tests.reliability.report /tmp/rel.jsonl
"""

from __future__ import annotations

import json
import sys
from typing import Any

COLUMNS = ("expired_before", "expired_after", "live_before", "live_after")
SHOWN = {"scenario", "seconds", "result", *COLUMNS}


def _cell(value: Any) -> str:
    return "–" if value is None else str(value)


def table(lines: list[dict[str, Any]]) -> str:
    out = ["| scenario | expired before | expired after | live before | live after | result "
           "| s | notes |", "|---|---:|---:|---:|---:|---|---:|---|"]
    for d in lines:
        notes = ", ".join(f"{k}={v}" for k, v in d.items() if k not in SHOWN)
        name = d["scenario"].removeprefix("test_")
        cells = [name, *(_cell(d.get(c)) for c in COLUMNS), d["result"],
                 _cell(d.get("seconds")), notes]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(path: str) -> None:
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    print(table(lines))


if __name__ == "__main__":
    main(sys.argv[1])
