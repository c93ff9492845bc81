"""The cache at scale: set rate, a joiner's start, memory and disk against the
number of keys (issue #22).

Run: `python -m benchmarks.cache_scale [--keys 1000000] [--step 50000]
[--joins 250000,500000,1000000] [--path DIR|redis://...] [--option NAME=VALUE ...]
[--stop-below 2000] [--out FILE.json]`

One process (the filler) sets small entries (`{"id": j, "name": "x" * 40}`, no
TTL), 1,000 gathered at a time, on the backend's default settings (but any
`--option`), and prints the rate of each `--step` keys. At each size in
`--joins` it pauses, waits until a snapshot covers what it wrote (directory:
`snapshots_written` moved on twice), and a joiner process starts: its `start()` wall
time, the worst loop stall during it (a 1 ms ticker), and its RSS growth per
key once the cache holds every key; then the disk the namespace uses per key.
A step slower than `--stop-below` sets/s ends the run (the cliff). The
directory runs in /dev/shm. Prints a table (and JSON with `--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def say(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def value(j: int) -> dict[str, Any]:
    return {"id": j, "name": "x" * 40}


# -- roles (each in its own process) ------------------------------------------------


async def role_fill(path: str, options: dict[str, Any], keys: int, step: int, joins: str) -> None:
    from ivip_ipc_async import AsyncCache, AsyncIPC

    pauses = {int(n) for n in joins.split(",") if n}
    async with AsyncIPC(path, namespace="scale", **options) as ipc:
        cache: AsyncCache[Any] = AsyncCache(ipc)
        last = time.perf_counter()
        for first in range(0, keys, 1000):
            await asyncio.gather(
                *(cache.set(f"k{j}", value(j), 0) for j in range(first, first + 1000))
            )
            done = first + 1000
            if done % step == 0:
                now = time.perf_counter()
                say({"keys": done, "rate": step / (now - last), "rss": rss()})
                last = now
            if done in pauses:
                stats = ipc.stats()
                if "snapshots_written" in stats:  # wait for a snapshot of every key:
                    # the second from now (the first may have begun before the last set)
                    seen = stats["snapshots_written"]
                    deadline = time.monotonic() + 120
                    while ipc.stats()["snapshots_written"] <= seen + 1:
                        if time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.05)
                # The directory's snapshot: what the last one took to write (a
                # private figure, read here for the measurement only).
                snaps = getattr(getattr(ipc, "_backend", None), "_snapshots", None)
                say(
                    {
                        "paused": done,
                        "snapshot_s": getattr(snaps, "took", None),
                        "snapshot_bytes": getattr(snaps, "bytes", None),
                    }
                )
                await asyncio.to_thread(sys.stdin.readline)
                last = time.perf_counter()
        say({"end": keys})
        await asyncio.to_thread(sys.stdin.readline)


async def role_join(path: str, options: dict[str, Any], keys: int) -> None:
    from ivip_ipc_async import AsyncCache, AsyncIPC

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

    before = rss()
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    ipc = AsyncIPC(path, namespace="scale", **options)
    await ipc.start()
    took = time.perf_counter() - t0
    cache: AsyncCache[Any] = AsyncCache(ipc)
    await asyncio.sleep(0.2)
    stop = True
    await tick
    last = await cache.get(f"k{keys - 1}")
    say(
        {
            "start_s": took,
            "worst_stall_ms": worst * 1000,
            "rss_per_key": (rss() - before) / keys,
            "has_last": last == value(keys - 1),
        }
    )
    await ipc.destroy()


# -- the driver ---------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.cache_scale", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--step", type=int, default=50_000)
    parser.add_argument("--joins", default="250000,500000,1000000")
    parser.add_argument("--path", default="")
    parser.add_argument("--option", action="append", default=[])
    parser.add_argument("--stop-below", type=float, default=2000.0)
    parser.add_argument("--out", default="")
    parser.add_argument("--role", default="")
    parser.add_argument("--options-json", default="{}")
    args = parser.parse_args()
    if args.role:
        options = json.loads(args.options_json)
        if args.role == "fill":
            asyncio.run(role_fill(args.path, options, args.keys, args.step, args.joins))
        else:
            asyncio.run(role_join(args.path, options, args.keys))
        return
    options = {}
    for item in args.option:
        name, _, raw = item.partition("=")
        options[name] = json.loads(raw)
    tmp = None
    path = args.path
    if not path:
        tmp = tempfile.mkdtemp(prefix="cache-scale-", dir="/dev/shm")
        path = tmp
    common = ["--path", path, "--options-json", json.dumps(options)]
    fill = spawn("--role", "fill", "--keys", str(args.keys), "--step", str(args.step),
                 "--joins", args.joins, *common)  # fmt: skip
    rows: list[dict[str, Any]] = []
    joins: list[dict[str, Any]] = []
    assert fill.stdout is not None
    assert fill.stdin is not None
    try:
        for line in fill.stdout:
            msg = json.loads(line)
            if "rate" in msg:
                rows.append(msg)
                print(f"{msg['keys']:>9,} keys  {msg['rate']:>9,.0f} sets/s", flush=True)
                if msg["rate"] < args.stop_below:
                    print(f"stopped: below {args.stop_below:,.0f} sets/s", flush=True)
                    break
            elif "paused" in msg:
                n = msg["paused"]
                joiner = spawn("--role", "join", "--keys", str(n), *common)
                out, _ = joiner.communicate(timeout=600)
                got = json.loads(out.strip().splitlines()[-1])
                got["keys"] = n
                got["snapshot_s"] = msg["snapshot_s"]
                got["snapshot_bytes"] = msg["snapshot_bytes"]
                if tmp:
                    got["disk_per_key"] = disk(Path(tmp) / "scale") / n
                joins.append(got)
                print(
                    f"  joiner at {n:,}: start {got['start_s']:.2f} s, worst stall "
                    f"{got['worst_stall_ms']:.1f} ms, RSS {got['rss_per_key']:.0f} B/key, "
                    f"disk {got.get('disk_per_key', 0):.0f} B/key, has last: {got['has_last']}; "
                    f"the last snapshot took {got['snapshot_s'] or 0:.2f} s",
                    flush=True,
                )
                fill.stdin.write("go\n")
                fill.stdin.flush()
            elif "end" in msg:
                break
    finally:
        fill.kill()
        fill.wait()
        for pipe in (fill.stdin, fill.stdout):
            if pipe is not None:
                pipe.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if rows:
        first = rows[0]["rate"]
        print(f"last step / first step: {rows[-1]['rate'] / first:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"steps": rows, "joins": joins}, indent=1))


if __name__ == "__main__":
    main()
