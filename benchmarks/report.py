"""The floor of the page: figures and tables in Markdown, the machine line, one
section of docs/benchmarks.md rewritten in place, and the command line every
measuring module shares when it runs alone (`python -m benchmarks.MODULE`).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import sys
from collections.abc import Callable, Mapping
from importlib import metadata

from .harness import ROOT, Aggregated, Scenario, aggregate, run, save, sized

PAGE = os.path.join(ROOT, "docs", "benchmarks.md")

Sections = dict[str, list[str]]
"""Page sections: {title: body lines}, each rendered under `## title`."""


def fmt(value: float) -> str:
    """A figure with as many digits as it deserves."""
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio(a: float, b: float) -> str:
    if not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}x"


def cell(stat: tuple[float, float, float], repeats: int) -> str:
    """The median, and min–max in small type when the runs differed."""
    median, low, high = stat
    if repeats == 1 or low == high:
        return fmt(median)
    return f"{fmt(median)} <sub>{fmt(low)}–{fmt(high)}</sub>"


def table(rows: dict[str, dict[str, tuple[float, float, float]]], repeats: int) -> str:
    """One row per contender, one column per metric any of them has."""
    metrics: list[str] = []
    for row in rows.values():
        metrics += [m for m in row if m not in metrics]
    lines = ["| | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, row in rows.items():
        cells = [cell(row[m], repeats) if m in row else "" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions() -> str:
    """The library's and the peers' versions, and the Redis server's."""
    names = ["ivip-ipc-async", "redis", "hiredis", "diskcache", "watchfiles", "orjson"]
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    server = "no Redis server"
    try:
        import redis

        server = "Redis server " + str(redis.Redis().info("server")["redis_version"])
    except Exception:
        pass
    return ", ".join(parts) + f"; {server}"


def machine() -> str:
    """One line: CPUs, kernel, Python, versions."""
    uname = platform.uname()
    return (
        f"Machine: {os.cpu_count()} CPUs, {uname.system} {uname.release}, "
        f"Python {sys.version.split()[0]}. Versions: {versions()}."
    )


def rerun(module: str) -> str:
    """The line under a section that says how to reproduce it alone."""
    return (
        f"Run alone: `python -m benchmarks.{module} --publish` (rewrites only this "
        "module's sections; `python -m benchmarks --publish` runs it with the rest)."
    )


def render(sections: Sections) -> list[str]:
    """The sections as page lines."""
    lines: list[str] = []
    for title, body in sections.items():
        lines += [f"## {title}", "", *body]
    return lines


def replace_sections(page: str, sections: Sections) -> str:
    """`page` with each `## title` section replaced by the new one (appended if absent)."""
    for title, body in sections.items():
        text = "\n".join(render({title: body}))
        pattern = rf"^## {re.escape(title)}\n.*?(?=^## |\Z)"
        match = re.search(pattern, page, flags=re.S | re.M)
        if match:
            page = page[: match.start()] + text + "\n" + page[match.end() :]
        else:
            page = page.rstrip("\n") + "\n\n" + text + "\n"
    return page


def alone(
    prog: str,
    scenarios: Mapping[str, Scenario],
    sections: Callable[[Aggregated, int], Sections],
    argv: list[str] | None = None,
) -> int:
    """`python -m benchmarks.MODULE`: run one module's scenarios, print them, save the
    raw results, and with `--publish` (or `--out PATH`) rewrite only that module's
    sections of the page."""
    parser = argparse.ArgumentParser(prog=prog, description=sys.modules["__main__"].__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario (median)")
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--codec", default="json", choices=["json", "orjson"])
    parser.add_argument("--out", help="rewrite this module's sections of this page")
    parser.add_argument("--publish", action="store_true", help=f"the same in {PAGE}")
    args = parser.parse_args(argv)
    out = PAGE if args.publish else args.out
    command = " ".join([prog, *(sys.argv[1:] if argv is None else argv)])

    def progress(done: int, total: int, what: str) -> None:
        print(f"[{done}/{total}] {what}", flush=True)

    raw = run(scenarios, args.repeat, sized(args.quick), args.codec, progress)
    print("saved", save({"command": command, "raw": raw}, prefix=f"{prog.split('.')[-1]}-"))
    aggregated = aggregate(raw)
    for name, rows in aggregated.items():
        print(f"\n{name}")
        for contender, metrics in rows.items():
            shown = ", ".join(f"{k} {fmt(v[0])}" for k, v in metrics.items())
            print(f"  {contender}: {shown}")
    if out is None:
        print(f"\npage not written (--publish rewrites this module's sections of {PAGE})")
        return 0
    with open(out) as f:
        page = f.read()
    new = sections(aggregated, args.repeat)
    with open(out, "w") as f:
        f.write(replace_sections(page, new))
    print(f"\nwrote the sections {', '.join(new)} of {out}")
    return 0
