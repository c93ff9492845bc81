"""docs/benchmarks.md and its plot, from the aggregated results of a run: the targets
and why each miss missed, the per-message budget, the per-Python table, the ratios,
then each measuring module's sections and the cache scale's (from its newest saved
run).
"""

from __future__ import annotations

import os
import re

from . import budget, per_python, scale, suite
from . import targets as T
from .harness import Aggregated
from .report import machine, ratio, render


def misses(results: Aggregated) -> str:
    """Why each target missed in this run was missed, and what would close it, from
    the run's own figures (benchmarks/targets.py)."""
    missed = T.reasons(results)
    if not missed:
        return "Every message-path and kept target measured in this run was met."
    lines = ["Where a target is missed, why (this run's figures), and what would close it:", ""]
    for target, why in missed:
        lines.append(f"- **{target}**: {why}")
    return "\n".join(lines)


def ratios(results: Aggregated) -> list[str]:
    """The comparisons the targets are stated in, from medians of the same run."""
    out: list[str] = []
    lat = results.get("latency", {})
    me = lat.get("ivip-ipc-async")
    if me:
        for peer in (
            "raw inotify (floor)",
            "redis pub/sub",
            "multiprocessing Pipe",
            "multiprocessing Pipe (asyncio receiver)",
        ):
            if peer in lat:
                out.append(
                    f"latency p50, ivip-ipc-async / {peer}: "
                    f"{ratio(me['p50'][0], lat[peer]['p50'][0])}"
                )
    tp = results.get("throughput", {})
    for mine in (T.AWAITED, T.CONCURRENT, T.BATCHED):
        for peer in ("redis pub/sub (pipelined)", "redis pub/sub (awaited)", T.PIPE):
            if mine in tp and peer in tp:
                out.append(
                    f"msg/s, {mine} / {peer}: {ratio(tp[mine]['msg/s'][0], tp[peer]['msg/s'][0])}"
                )
    fo = results.get("fanout", {})
    base = tp.get(T.AWAITED)
    if base and "ivip-ipc-async 1->16" in fo:
        out.append(
            "fan-out 1->16, slowest receiver's msg/s / 1->1 msg/s: "
            f"{ratio(fo['ivip-ipc-async 1->16']['min msg/s per receiver'][0], base['msg/s'][0])}"
        )
    cache = results.get("cache", {})
    me_c = cache.get("ivip-ipc-async")
    if me_c:
        for peer in ("diskcache", "redis GET/SET"):
            if peer in cache:
                out.append(
                    f"cache get ops/s, ivip-ipc-async / {peer}: "
                    f"{ratio(me_c['get'][0], cache[peer]['get'][0])}"
                )
    return out


def target_tables(results: Aggregated) -> list[str]:
    """The targets on the page: the message path's first, then the kept ones, then the
    earlier."""
    lines: list[str] = []
    for title, group in T.all_targets(results).items():
        level = "###" if title == T.EARLIER else "##"
        lines += [f"{level} {title}", ""]
        if title == T.EARLIER:
            lines += [
                "The earlier targets that the two tables above do not restate (those they "
                "restate, tighter, are dropped here).",
                "",
            ]
        lines += ["| target | measured (median) | met |", "|---|---|---|"]
        for target in group:
            mark = "n/a" if target.met is None else ("yes" if target.met else "**no**")
            lines.append(f"| {target.name} | {target.measured} | {mark} |")
        lines.append("")
        if title == T.KEPT:
            lines += [misses(results), ""]
    return lines


def write_markdown(
    path: str, results: Aggregated, repeats: int, command: str, notes: list[str], plot: str | None
) -> None:
    """The whole page."""
    lines = [
        "# Benchmarks",
        "",
        "Measured by the benchmark suite in `benchmarks/`, this library beside its peers "
        "**in one run, on one machine**, with separate OS processes for senders and "
        "receivers. Each scenario ran "
        f"{repeats} time(s); tables show the median, and min–max across runs in small type.",
        "",
        f"Command: `{command}`",
        "",
        "Commands: the full run, `python -m benchmarks --publish` (3 repeats, medians); one "
        "module's scenarios alone, rewriting only its sections, `python -m "
        "benchmarks.MODULE --publish` (the command is under each section); the "
        "per-Python figures, `python -m benchmarks.per_python` (run before the full run: "
        "the page reads its newest saved files); this page again from a saved run, "
        "`python -m benchmarks --render benchmarks/results/<time>.json --publish`.",
        "",
        machine(),
        "",
        "The machine is shared and noisy: read ratios measured in the same run rather "
        "than absolute times, and expect a few tens of percent between runs.",
        "",
    ]
    lines += target_tables(results)
    lines += render(budget.sections(results, repeats))
    lines += render(per_python.sections(results))
    if plot:
        lines += [f"![latency and throughput]({os.path.basename(plot)})", ""]
    summary = ratios(results)
    if summary:
        lines += ["## Ratios (medians, same run)", ""] + [f"- {s}" for s in summary] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    for module in suite.MODULES:
        if module is not budget:
            lines += render(module.sections(results, repeats))
    lines += kept_sections(path)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def kept_sections(path: str) -> list[str]:
    """The sections of the page at `path` that the suite does not write, kept as they
    are: the cache scale's (`python -m benchmarks.scale --publish` writes it)."""
    try:
        with open(path) as f:
            page = f.read()
    except FileNotFoundError:
        return []
    match = re.search(rf"^## {re.escape(scale.TITLE)}\n.*?(?=^## |\Z)", page, flags=re.S | re.M)
    return [match.group(0).rstrip("\n"), ""] if match else []


def plot(path: str, results: Aggregated) -> str | None:
    """Latency and throughput bars, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    lat = results.get("latency", {})
    names = list(lat)
    if names:
        xs = range(len(names))
        ax1.bar([x - 0.2 for x in xs], [lat[n]["p50"][0] for n in names], 0.4, label="p50")
        ax1.bar([x + 0.2 for x in xs], [lat[n]["p99"][0] for n in names], 0.4, label="p99")
        ax1.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax1.set_yscale("log")
        ax1.set_ylabel("ms (log)")
        ax1.set_title("one-way latency, 1 -> 1")
        ax1.legend()
    tp = results.get("throughput", {})
    names = list(tp)
    if names:
        ax2.bar(range(len(names)), [tp[n]["msg/s"][0] for n in names], color="tab:green")
        ax2.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax2.set_ylabel("messages/s received")
        ax2.set_title("throughput 1 -> 1, ~100-byte messages")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def targets_text(results: Aggregated) -> str:
    """The targets as the console prints them."""
    groups = T.all_targets(results)
    width = max(len(t.name) for group in groups.values() for t in group)
    lines: list[str] = []
    for title, group in groups.items():
        lines.append(f"{title}:")
        for t in group:
            mark = " n/a" if t.met is None else (" yes" if t.met else "  NO")
            lines.append(f"{mark}  {t.name:<{width}}  {t.measured.replace('**', '')}")
        lines.append("")
    return "\n".join(lines)
