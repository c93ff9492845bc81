"""Writing docs/benchmarks.md and the plot from aggregated results."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

from . import budget, cache_ops, coordination, per_python
from . import targets as T
from .loop_stall import WORKLOAD as STALL_WORKLOAD
from .loop_stall import stall_table

Aggregated = dict[str, dict[str, dict[str, tuple[float, float, float]]]]

WORKLOADS = {
    "latency": (
        "One sender process, one receiver process. 500 messages of about 100 bytes, "
        "5 ms apart; each carries the sender's `CLOCK_MONOTONIC` time and the receiver's "
        "handler records the difference. ivip-ipc-async: `await ipc.notify()` to an "
        "`ipc.on()` handler. Redis: `PUBLISH` to a subscriber, both through redis-py's "
        "asyncio client (hiredis). Pipe: `multiprocessing` Pipe, blocking `recv_bytes`; "
        "Pipe (asyncio receiver): the same Pipe, its receiver waiting on an asyncio loop "
        "(`loop.add_reader` on the Pipe's fd, then `recv_bytes`), the wake-up path every "
        "asyncio receiver has (issue #15's target is judged against the plain Pipe). "
        "Raw inotify: the floor for any file-based design, an inotify fd on the receiver's "
        "asyncio loop and a read of the appended line. watchfiles: `awatch` on the file."
    ),
    "throughput": (
        "One sender, one receiver, 100,000 messages of about 100 bytes sent as fast as "
        "possible: `awaited` = each `notify` awaited before the next; `concurrent` = "
        "`asyncio.gather` over 1,000 `notify` calls at a time; `batched` = `notify_many` "
        "with 1,000 messages per call, 500,000 messages (so that start-up is noise). "
        "msg/s is counted at the receiver, from the first message's send time to the last "
        "one's arrival; `send msg/s` at the sender, messages handed over per second from "
        "its start to the return of its last call, over the same messages. `receiver CPU "
        "us/msg`: the receiver process's CPU time (all threads) from its first message to "
        "its last, per message. Redis `pipelined` = 1,000 "
        "`PUBLISH` per pipeline. RSS is the receiver's. `asyncio.gather floor`: the same "
        "`gather` over 1,000 coroutines that do nothing, in one process, no I/O: no "
        "`concurrent` sender can beat it."
    ),
    "fanout": (
        "One sender, 4 or 16 receiver processes (on 2 cores). Latency: 250 messages 5 ms "
        "apart, all receivers' samples together. Throughput: 20,000 messages as fast as "
        "possible; msg/s of the slowest and the median receiver."
    ),
    "many_to_one": "Four sender processes, 20,000 messages each, one receiver: msg/s received.",
    "sizes": (
        "One sender, one receiver, messages from 100 B to 1 MiB (about 40 MB in all per "
        "size), each awaited: MB/s received."
    ),
    "cache": (
        "`get` and `set` of one key holding a small dict, in one process, awaited one at a "
        "time (ivip-ipc-async: `await cache.get`, a fresh copy each time; diskcache: "
        "`Cache.get`, sync; Redis: `GET` + `json.loads` through redis-py asyncio). "
        "`visible`: a writer process sets the key every 5 ms (200 times) with its send "
        "time; a reader process polls `get` and records when each new value shows."
    ),
    "idle": (
        "A process that has joined and waits: CPU time (user + system, all threads) per "
        "second of wall time over 10 s, in % of one core, and context switches per second."
    ),
    "redis_backend": (
        'This library\'s Redis backend (`AsyncIPC("redis://127.0.0.1:6379/0", '
        "namespace=...)`) beside plain redis-py asyncio on the same server, one sender "
        "and one receiver process: latency as in scenario 1 (500 messages 5 ms apart; "
        "plain redis-py: `PUBLISH` to a subscriber); `msg/s (awaited)`: 20,000 messages, "
        "each awaited; `redis EVALSHA APPEND (redis-py)`: the floor of this design, plain "
        "redis-py running the backend's own APPEND script (`XADD` + `PUBLISH` + `PTTL` in "
        "Lua), the same 20,000 awaited, with a redis-py subscriber receiving; `cache get/s`: "
        "`await cache.get` of a small dict (served by the mirror) against `GET` + "
        "`json.loads` round trips."
    ),
    "startup": (
        "Time for a new process from `AsyncIPC()` to the return of its first `notify` on "
        "an empty directory; and the same for a late joiner after another process has "
        "set 100,000 keys (it loads the snapshot and the retained log)."
    ),
    "loop_stall": STALL_WORKLOAD,
}

TITLES = {
    "latency": "1. One-way latency, 1 -> 1 (ms)",
    "throughput": "2. Throughput 1 -> 1, and 8. receiver RSS",
    "fanout": "3. Fan-out 1 -> 4 and 1 -> 16",
    "many_to_one": "4. Four senders -> one receiver",
    "sizes": "5. Message size sweep (MB/s)",
    "cache": "6. Cache",
    "idle": "7. Idle cost of a waiting process",
    "startup": "9. Start-up",
    "redis_backend": "10. The Redis backend beside plain redis-py",
    "loop_stall": "11. Loop stalls",
}


def misses(results: Aggregated) -> str:
    """Why each target missed in this run was missed, and what would close it, from
    the run's own figures (benchmarks/targets.py)."""
    missed = T.reasons(results)
    if not missed:
        return "Every issue #15 and kept target measured in this run was met."
    lines = ["Where a target is missed, why (this run's figures), and what would close it:", ""]
    for target, why in missed:
        lines.append(f"- **{target}**: {why}")
    return "\n".join(lines)


fmt = T.fmt
ratio = T.ratio


def cell(stat: tuple[float, float, float], repeats: int) -> str:
    median, low, high = stat
    if repeats == 1 or low == high:
        return fmt(median)
    return f"{fmt(median)} <sub>{fmt(low)}–{fmt(high)}</sub>"


def table(rows: dict[str, dict[str, tuple[float, float, float]]], repeats: int) -> str:
    metrics: list[str] = []
    for row in rows.values():
        metrics += [m for m in row if m not in metrics]
    lines = ["| | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, row in rows.items():
        cells = [cell(row[m], repeats) if m in row else "" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
    for mine in (
        "ivip-ipc-async (awaited)",
        "ivip-ipc-async (concurrent)",
        "ivip-ipc-async (batched)",
    ):
        for peer in (
            "redis pub/sub (pipelined)",
            "redis pub/sub (awaited)",
            "multiprocessing Pipe",
        ):
            if mine in tp and peer in tp:
                out.append(
                    f"msg/s, {mine} / {peer}: {ratio(tp[mine]['msg/s'][0], tp[peer]['msg/s'][0])}"
                )
    fo = results.get("fanout", {})
    base = tp.get("ivip-ipc-async (awaited)")
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


def targets(results: Aggregated) -> list[tuple[str, str, bool | None]]:
    """Every target printed by `python -m benchmarks`: (target, measured, met)."""
    return [
        (t.name, t.measured.replace("**", ""), t.met)
        for group in T.all_targets(results).values()
        for t in group
    ]


def target_tables(results: Aggregated) -> list[str]:
    """The targets on the page: issue #15's first, then the kept ones, then the earlier."""
    lines: list[str] = []
    for title, group in T.all_targets(results).items():
        level = "###" if title == "Earlier targets" else "##"
        lines += [f"{level} {title}", ""]
        if title == "Earlier targets":
            lines += [
                "The previous performance issue's targets that the two tables above do "
                "not restate (those it does restate, tighter, are dropped here).",
                "",
            ]
        lines += ["| target | measured (median) | met |", "|---|---|---|"]
        for target in group:
            mark = "n/a" if target.met is None else ("yes" if target.met else "**no**")
            lines.append(f"| {target.name} | {target.measured} | {mark} |")
        lines.append("")
        if title.startswith("Kept"):
            lines += [misses(results), ""]
    return lines


def versions() -> str:
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


def write_markdown(
    path: str, results: Aggregated, repeats: int, command: str, notes: list[str], plot: str | None
) -> None:
    uname = platform.uname()
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
        "Commands: the full run, `python -m benchmarks --publish` (3 repeats, medians); the "
        "per-Python figures, `python -m benchmarks.per_python` (run before it: the "
        "page reads its newest saved files); the budget alone, `python -m "
        "benchmarks.budget`; this page again from a saved run, `python -m benchmarks "
        "--render benchmarks/results/<time>.json --publish`.",
        "",
        f"Machine: {os.cpu_count()} CPUs, {uname.system} {uname.release}, "
        f"Python {sys.version.split()[0]}. Versions: {versions()}.",
        "",
        "The machine is shared and noisy: read ratios measured in the same run rather "
        "than absolute times, and expect a few tens of percent between runs.",
        "",
    ]
    lines += target_tables(results)
    if results.get("budget"):
        lines += [
            "## Per-message budget",
            "",
            f"Workload: {budget.WORKLOAD}",
            "",
            budget.render(results["budget"], repeats),
            "",
            budget.TIMING_NOTE,
            "",
        ]
    lines += per_python.section(results)
    if plot:
        lines += [f"![latency and throughput]({os.path.basename(plot)})", ""]
    summary = ratios(results)
    if summary:
        lines += ["## Ratios (medians, same run)", ""] + [f"- {s}" for s in summary] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    for key, title in TITLES.items():
        if not results.get(key):
            continue
        lines += [
            f"## {title}",
            "",
            f"Workload: {WORKLOADS[key]}",
            "",
            (stall_table if key == "loop_stall" else table)(results[key], repeats),
            "",
        ]
    lines += coordination.section(results, repeats)
    lines += cache_ops.section(results, repeats)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(path: str, results: Aggregated) -> str | None:
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
