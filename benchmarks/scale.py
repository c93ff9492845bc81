"""The cache at scale: the set rate and a joiner's start against the number of keys,
a reader's RSS per key and the bytes stored per key, up to a million keys, for this
library's directory and Redis backends beside diskcache and plain Redis.

    python -m benchmarks.scale [--keys 1000000] [--step 50000]
        [--joins 250000,500000,1000000] [--only directory redis-backend diskcache redis]
        [--repeat 1] [--option NAME=VALUE ...] [--stop-below 2000] [--publish | --out PAGE]

For each contender, one process (the filler) sets small entries (`{"id": j, "name":
"x" * 40}` under `k{j}`, no TTL), 1,000 at a time, and reports the rate of each
`--step` keys. At each size in `--joins` it pauses (the directory backend: until a
snapshot covers every key) and a joiner process starts: the wall time until it can
read (this library: `AsyncIPC.start()`, the mirror loaded; diskcache: `Cache(dir)`;
plain Redis: a connection; the reference, a dict of the same decoded values built in the reader
itself), the worst loop stall meanwhile (a 1 ms ticker), its RSS
growth per key, and whether it reads the last key. Then the bytes per key where the
data is kept: the namespace's files (directory backend, diskcache; in /dev/shm), or
the Redis server's memory (`MEMORY USAGE` of 1,000 sampled entry keys, plus the
backend's stream spread over the keys). A step slower than `--stop-below` sets/s ends
that contender's run. This library runs on its default settings (but any
`--option`); the Redis contenders use namespaces of their own, deleted after.

The raw figures go to benchmarks/results/scale-<time>.json; `--publish` rewrites the
page's "Cache scale" section and its plot, docs/benchmarks-scale.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .harness import (
    BASE,
    REDIS,
    ROOT,
    Worker,
    drop_redis,
    emit,
    open_ipc,
    redis_available,
    save,
    wait_go,
)
from .report import PAGE, fmt, machine, replace_sections

TITLE = "Cache scale"
CONTENDERS = {
    "directory": "ivip-ipc-async (directory)",
    "redis-backend": "ivip-ipc-async (Redis)",
    "diskcache": "diskcache",
    "redis": "plain Redis (redis-py SET)",
    "dict": "a dict in one process (reference)",
}
PLOT = os.path.join(ROOT, "docs", "benchmarks-scale.png")


def value(j: int) -> dict[str, Any]:
    return {"id": j, "name": "x" * 40}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- the filler and the joiner (each in its own process) ---------------------------------


async def fill(
    kind: str, target: str, options: dict[str, Any], keys: int, step: int, joins: list[int]
) -> None:
    """Set `keys` keys, 1,000 at a time; a line per `step`; pause at each of `joins`."""
    closer: Any
    settled: Any = None
    if kind in ("directory", "redis-backend"):
        from ivip_ipc_async import AsyncCache

        ipc = await open_ipc(target, **options).start()
        cache: AsyncCache[Any] = AsyncCache(ipc)

        async def put(first: int) -> None:
            await asyncio.gather(
                *(cache.set(f"k{j}", value(j), 0) for j in range(first, first + 1000))
            )

        async def settled() -> dict[str, Any]:
            if kind == "directory":  # wait for a snapshot of every key: the second
                # from now (the first may have begun before the last set)
                seen = ipc.stats()["snapshots_written"]
                deadline = time.monotonic() + 120
                while ipc.stats()["snapshots_written"] <= seen + 1:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
            # What the last snapshot file (a base or a delta) took to write (a private
            # figure, read for this only), and every snapshot byte written so far.
            snaps = getattr(ipc.medium.backend, "_snapshots", None)
            return {
                "snapshot_s": getattr(snaps, "took", None),
                "snapshot_bytes_written": ipc.stats().get("snapshot_bytes_written"),
            }

        closer = ipc.destroy
    elif kind == "dict":
        held: dict[str, Any] = {}

        async def put(first: int) -> None:
            for j in range(first, first + 1000):
                held[f"k{j}"] = value(j)

        async def closer() -> None:
            held.clear()
    elif kind == "diskcache":
        import diskcache

        dc = diskcache.Cache(target)

        async def put(first: int) -> None:
            for j in range(first, first + 1000):
                dc.set(f"k{j}", value(j))

        async def closer() -> None:
            dc.close()
    else:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS)
        prefix = target

        async def put(first: int) -> None:
            pipe = client.pipeline(transaction=False)
            for j in range(first, first + 1000):
                pipe.set(f"{prefix}k{j}", json.dumps(value(j)))
            await pipe.execute()

        closer = client.aclose
    last = time.perf_counter()
    for first in range(0, keys, 1000):
        await put(first)
        done = first + 1000
        if done % step == 0:
            now = time.perf_counter()
            emit({"keys": done, "rate": step / (now - last)})
            last = now
        if done in joins:
            emit({"paused": done, **(await settled() if settled else {})})
            await asyncio.to_thread(wait_go)
            last = time.perf_counter()
    emit({"end": keys})
    await asyncio.to_thread(wait_go)
    await closer()


async def join(kind: str, target: str, options: dict[str, Any], keys: int) -> None:
    """Start a reader, time it, tick meanwhile, and report its RSS growth per key."""
    worst = 0.0
    stop = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now

    if kind in ("directory", "redis-backend"):
        from ivip_ipc_async import AsyncCache
    elif kind == "diskcache":
        import diskcache
    else:
        import redis.asyncio as aioredis
    closer: Any
    before = rss()
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    if kind in ("directory", "redis-backend"):
        ipc = await open_ipc(target, **options).start()
        took = time.perf_counter() - t0
        cache: AsyncCache[Any] = AsyncCache(ipc)

        async def get(key: str) -> Any:
            return await cache.get(key)

        closer = ipc.destroy
    elif kind == "dict":  # the same decoded values, built in the reader itself
        held = {f"k{j}": value(j) for j in range(keys)}
        took = time.perf_counter() - t0

        async def get(key: str) -> Any:
            return held.get(key)

        async def closer() -> None:
            held.clear()
    elif kind == "diskcache":
        dc = diskcache.Cache(target)
        took = time.perf_counter() - t0

        async def get(key: str) -> Any:
            return dc.get(key)

        async def closer() -> None:
            dc.close()
    else:
        client = aioredis.Redis.from_url(REDIS)
        await client.ping()
        took = time.perf_counter() - t0

        async def get(key: str) -> Any:
            raw = await client.get(f"{target}{key}")
            return json.loads(raw) if raw else None

        closer = client.aclose
    await asyncio.sleep(0.2)
    stop = True
    await tick
    grown = rss() - before
    last = await get(f"k{keys - 1}")
    await closer()
    emit(
        {
            "start_s": took,
            "worst_stall_ms": worst * 1000,
            "rss_per_key": grown / keys,
            "has_last": last == value(keys - 1),
        }
    )


# -- bytes per key where the data is kept -------------------------------------------------


def disk(path: str) -> int:
    """Bytes of the regular files under `path`."""
    return sum(
        f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink()
    )


def redis_bytes_per_key(pattern: str, rest: str | None, keys: int) -> float:
    """Mean `MEMORY USAGE` of up to 1,000 keys matching `pattern`, plus the `MEMORY
    USAGE` of the key `rest` (the backend's stream) spread over `keys`."""
    import redis

    client = redis.Redis.from_url(REDIS)
    try:
        sample: list[int] = []
        for key in client.scan_iter(match=pattern, count=1000):
            sample.append(int(client.memory_usage(key) or 0))
            if len(sample) >= 1000:
                break
        extra = int(client.memory_usage(rest, samples=0) or 0) if rest else 0
    finally:
        client.close()
    return (statistics.fmean(sample) if sample else float("nan")) + extra / keys


# -- one contender, one run -------------------------------------------------------------


def measure(
    kind: str, keys: int, step: int, joins: list[int], options: dict[str, Any], stop_below: float
) -> dict[str, Any]:
    """Fill one contender, with a joiner at each of `joins`: {"steps": [...], "joins": [...]}."""
    scratch = tempfile.mkdtemp(prefix="ivip-scale-", dir=BASE)
    namespace = f"bench-scale-{uuid.uuid4().hex[:8]}"
    target = {
        "directory": scratch,
        "redis-backend": f"{REDIS}#{namespace}",
        "diskcache": scratch,
        "redis": f"bench-{namespace}:",
        "dict": "",
    }[kind]
    used = options if kind in ("directory", "redis-backend") else {}
    steps: list[dict[str, Any]] = []
    joined: list[dict[str, Any]] = []
    filler = Worker(fill, kind, target, used, keys, step, joins)
    try:
        while True:
            msg = filler.line(timeout=3600)
            if "rate" in msg:
                steps.append(msg)
                print(f"  {kind}: {msg['keys']:>9,} keys {msg['rate']:>9,.0f} sets/s", flush=True)
                if msg["rate"] < stop_below:
                    print(f"  {kind}: stopped, below {stop_below:,.0f} sets/s", flush=True)
                    break
            elif "paused" in msg:
                n = msg["paused"]
                joiner = Worker(join, kind, target, used, n)
                try:
                    got = {**joiner.line(timeout=1800), **msg, "keys": n}
                finally:
                    joiner.close()
                if kind in ("directory", "diskcache"):
                    got["disk_per_key"] = disk(scratch) / n
                elif kind == "redis-backend":
                    tag = f"ivip:{{{namespace}}}"
                    got["server_per_key"] = redis_bytes_per_key(f"{tag}:c:*", f"{tag}:log", n)
                elif kind == "redis":
                    got["server_per_key"] = redis_bytes_per_key(f"{target}k*", None, n)
                joined.append(got)
                print(f"  {kind}: joiner at {n:,}: {_join_text(got)}", flush=True)
                filler.go()
            elif "end" in msg:
                break
    finally:
        filler.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if kind in ("redis-backend", "redis"):
            drop_redis(namespace)
    return {"steps": steps, "joins": joined}


def _join_text(got: dict[str, Any]) -> str:
    stored = got.get("disk_per_key", got.get("server_per_key", float("nan")))
    return (
        f"start {got['start_s']:.2f} s, worst stall {got['worst_stall_ms']:.1f} ms, "
        f"RSS {got['rss_per_key']:.0f} B/key, stored {stored:.0f} B/key, "
        f"reads the last key: {got['has_last']}"
    )


# -- the table and the plot ---------------------------------------------------------------


def _median(runs: list[dict[str, Any]], part: str, keys: int, field: str) -> float:
    values = [
        row[field]
        for run in runs
        for row in run[part]
        if row["keys"] == keys and isinstance(row.get(field), (int, float))
    ]
    return statistics.median(values) if values else float("nan")


def summary(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per contender: the median over repeats of each step's rate and each join's figures."""
    out: dict[str, Any] = {}
    for kind, runs in results.items():
        step_keys = sorted({row["keys"] for run in runs for row in run["steps"]})
        join_keys = sorted({row["keys"] for run in runs for row in run["joins"]})
        fields = ("start_s", "worst_stall_ms", "rss_per_key", "disk_per_key", "server_per_key")
        out[kind] = {
            "rate": {k: _median(runs, "steps", k, "rate") for k in step_keys},
            "joins": {k: {f: _median(runs, "joins", k, f) for f in fields} for k in join_keys},
            "has_last": all(row["has_last"] for run in runs for row in run["joins"]),
            "repeats": len(runs),
        }
    return out


def _k(n: int) -> str:
    """250000 -> 250k, 1000000 -> 1M."""
    return f"{n / 1_000_000:g}M" if n >= 1_000_000 else f"{n / 1000:g}k"


def tables(summed: dict[str, Any]) -> list[str]:
    """Two tables: sets/s per step, and the joiners' figures."""
    steps = sorted({k for s in summed.values() for k in s["rate"]})
    shown = [k for k in steps if k <= 300_000 or k % 100_000 == 0]
    lines = [
        "| sets/s at | " + " | ".join(_k(k) for k in shown) + " | last / first |",
        "|---" * (len(shown) + 2) + "|",
    ]
    for kind, s in summed.items():
        rates = s["rate"]
        cells = [fmt(rates[k]) if k in rates else "" for k in shown]
        first, last = (rates[min(rates)], rates[max(rates)]) if rates else (0, 0)
        change = f"{last / first:.2f}x" if first else ""
        lines.append(f"| {CONTENDERS[kind]} | " + " | ".join(cells) + f" | {change} |")
    lines += [
        "",
        "| contender, keys | reader ready | worst loop stall | reader RSS per key "
        "| stored per key | reads the last key |",
        "|---|---|---|---|---|---|",
    ]
    for kind, s in summed.items():
        for n, j in s["joins"].items():
            disk_b, server = j["disk_per_key"], j["server_per_key"]
            if disk_b == disk_b:
                stored = f"{fmt(disk_b)} B on disk"
            else:
                stored = f"{fmt(server)} B in Redis" if server == server else ""
            lines.append(
                f"| {CONTENDERS[kind]}, {n:,} | {fmt(j['start_s'])} s "
                f"| {fmt(j['worst_stall_ms'])} ms | {fmt(j['rss_per_key'])} B | {stored} "
                f"| {'yes' if s['has_last'] else '**no**'} |"
            )
    return lines


def reading(summed: dict[str, Any]) -> list[str]:
    """How to read the tables, with the ratios this run gives."""
    lines = [
        "How to read it: this library's readers hold every entry in memory (the mirror: "
        "a `get` is a dict lookup, no round trip), so their start loads every key and "
        "their RSS grows with the keys; a diskcache reader opens SQLite and reads a key "
        "from it at each `get`, and a plain Redis reader holds nothing (a `GET` is a round "
        "trip): their start is flat and their RSS per key near zero by design. The dict "
        "row is the floor of holding the same decoded values in a process (built in one "
        "go on the loop: its stall is that build). `stored per "
        "key` is disk for the directory backend and diskcache (tmpfs here), the server's "
        "memory for the two Redis rows.",
        "",
    ]
    floor = summed.get("dict", {}).get("joins", {})
    for kind in ("directory", "redis-backend"):
        joins = summed.get(kind, {}).get("joins", {})
        both = [n for n in joins if n in floor]
        if both:
            n = max(both)
            mine, ref = joins[n]["rss_per_key"], floor[n]["rss_per_key"]
            lines.append(
                f"- {CONTENDERS[kind]} at {n:,} keys: a reader's RSS per key {fmt(mine)} B, "
                f"{mine / ref:.2f}x the dict's {fmt(ref)} B."
            )
    return [*lines, ""] if len(lines) > 2 else lines


def plot(path: str, summed: dict[str, Any]) -> str | None:
    """Four panels against the number of keys: sets/s, joiner start, RSS and stored bytes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (rate_ax, start_ax), (rss_ax, stored_ax) = axes
    for kind, s in summed.items():
        label = CONTENDERS[kind]
        rate_ax.plot(list(s["rate"]), list(s["rate"].values()), marker=".", label=label)
        joins = s["joins"]
        xs = list(joins)
        start_ax.plot(xs, [joins[k]["start_s"] for k in xs], marker="o", label=label)
        rss_ax.plot(xs, [joins[k]["rss_per_key"] for k in xs], marker="o", label=label)
        stored = [
            joins[k]["disk_per_key"]
            if joins[k]["disk_per_key"] == joins[k]["disk_per_key"]
            else joins[k]["server_per_key"]
            for k in xs
        ]
        stored_ax.plot(xs, stored, marker="o", label=label)
    for ax, title, unit in (
        (rate_ax, "sets/s while filling (1,000 at a time)", "sets/s"),
        (start_ax, "a joiner's start (until it can read)", "seconds"),
        (rss_ax, "reader RSS growth per key", "bytes/key"),
        (stored_ax, "stored per key (disk; Redis: server memory)", "bytes/key"),
    ):
        ax.set_title(title)
        ax.set_xlabel("keys")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _k(int(x)) if x else "0"))
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    rate_ax.set_yscale("log")
    rate_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def section(saved: dict[str, Any], image: str | None) -> list[str]:
    """The page's "Cache scale" section from a saved run."""
    summed = summary(saved["results"])
    repeats = max((s["repeats"] for s in summed.values()), default=0)
    lines = [
        f"Command: `{saved['command']}` ({repeats} run(s) of each contender; medians "
        "where more than one), written by that command's `--publish` (not by `python -m "
        "benchmarks --publish`, which keeps this section as it is).",
        "",
        "Workload: one process sets `{'id': j, 'name': 'x' * 40}` under `k{j}` (no TTL), "
        "1,000 at a time (this library: `asyncio.gather` of 1,000 `cache.set`; diskcache: "
        "1,000 `Cache.set` in a row; plain Redis: a redis-py asyncio pipeline of 1,000 "
        "`SET` of the JSON); this library on its default settings. At each joiner size "
        "the filler pauses (the directory backend: until a snapshot covers every key) and "
        "a new process starts a reader: `reader ready` is `AsyncIPC.start()` (the mirror "
        "loaded: from the directory, or from Redis), diskcache's `Cache(dir)`, plain "
        "Redis's connection; the reference row builds a plain dict of the same decoded "
        "values in the reader itself; its worst loop stall meanwhile (a 1 ms ticker); its RSS "
        "growth per key. `stored per key`: the files in /dev/shm (directory backend, "
        "diskcache), or the Redis server's memory (`MEMORY USAGE` of 1,000 sampled entry "
        "keys, plus the backend's stream spread over the keys).",
        "",
        " ".join([saved.get("machine", ""), saved.get("load", ""), *saved.get("notes", [])]),
        "",
        *tables(summed),
        "",
        *reading(summed),
    ]
    if image:
        lines += [f"![cache scale]({os.path.basename(image)})", ""]
    return lines


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} {five:.1f} {fifteen:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--step", type=int, default=50_000)
    parser.add_argument("--joins", default="250000,500000,1000000")
    parser.add_argument("--only", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--option", action="append", default=[], help="NAME=JSON, this library")
    parser.add_argument("--stop-below", type=float, default=2000.0)
    parser.add_argument("--out", help="rewrite the Cache scale section of this page")
    parser.add_argument("--publish", action="store_true", help=f"the same in {PAGE}")
    parser.add_argument("--render", metavar="RESULTS_JSON", help="publish a saved run again")
    parser.add_argument("--note", action="append", default=[], help="a line for the page")
    args = parser.parse_args(argv)
    out = PAGE if args.publish else args.out
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
    else:
        options = {}
        for item in args.option:
            name, _, raw = item.partition("=")
            options[name] = json.loads(raw)
        joins = [int(n) for n in args.joins.split(",") if n]
        kinds = [k for k in args.only if redis_available() or "redis" not in k]
        command = " ".join(
            ["python -m benchmarks.scale", *(sys.argv[1:] if argv is None else argv)]
        )
        results: dict[str, list[dict[str, Any]]] = {}
        loads = [load_average()]
        saved = {"command": command, "results": results, "machine": machine()}
        path = None
        for i in range(args.repeat):
            for kind in kinds:
                print(f"{kind}, run {i + 1}/{args.repeat} (load {load_average()})", flush=True)
                results.setdefault(kind, []).append(
                    measure(kind, args.keys, args.step, joins, options, args.stop_below)
                )
                loads.append(load_average())
                saved["load"] = (
                    "Load average (1, 5, 15 min) at the start and after each contender's "
                    f"run: {'; '.join(loads)}, on {os.cpu_count()} CPUs."
                )
                path = save(saved, path, prefix="scale-")  # what is done so far
        print("saved", path)
    saved["notes"] = [*saved.get("notes", []), *args.note]
    print("\n".join(tables(summary(saved["results"]))))
    if out is None:
        print(f"\npage not written (--publish rewrites the {TITLE} section of {PAGE})")
        return 0
    image = plot(os.path.join(os.path.dirname(os.path.abspath(out)), os.path.basename(PLOT)),
                 summary(saved["results"]))  # fmt: skip
    with open(out) as f:
        page = f.read()
    with open(out, "w") as f:
        f.write(replace_sections(page, {TITLE: section(saved, image)}))
    print(f"\nwrote the {TITLE} section of {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
