"""The logs of one run, read back: every agent's JSON lines and the driver's.

Each record has `t` (CLOCK_MONOTONIC ns, one clock for every process), `p` (the
process: agent name or "driver"), `n` (the agent's node, `<process>.<life>`),
`ev`, and the event's own fields. A line cut short (read while being written)
is skipped.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["History", "load"]


@dataclass
class History:
    records: list[dict[str, Any]]
    stderr: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.records.sort(key=lambda r: r["t"])
        self.by_proc: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in self.records:
            self.by_proc[r["p"]].append(r)

    @property
    def driver(self) -> list[dict[str, Any]]:
        return self.by_proc.get("driver", [])

    @property
    def backend(self) -> str:
        for r in self.driver:
            if r["ev"] == "t0":
                return str(r.get("backend", "directory"))
        return "directory"

    def logged_since(self, proc: str, ev: str, since: int) -> bool:
        return any(r["ev"] == ev and r["t"] >= since for r in self.by_proc.get(proc, []))

    def count(self, ev: str) -> int:
        return sum(1 for r in self.records if r["ev"] == ev)


def load(logdir: Path) -> History:
    records: list[dict[str, Any]] = []
    stderr: dict[str, str] = {}
    for path in sorted(logdir.glob("*.jsonl")):
        with open(path, "rb") as f:
            for line in f.read().split(b"\n"):
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and "t" in record and "ev" in record:
                    records.append(record)
    for path in sorted(logdir.glob("*.stderr")):
        text = path.read_text(errors="replace")
        if text.strip():
            stderr[path.stem] = text
    return History(records, stderr)
