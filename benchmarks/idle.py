"""The idle cost of a process that has joined and waits: CPU % of one core and
context switches per second, beside a watchfiles watcher and a Redis subscriber.

    python -m benchmarks.idle [--repeat 3] [--quick] [--publish]
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from .harness import Aggregated, Result, Size, Worker, emit, redis_available, scratch_dir, workers
from .report import Sections, alone, rerun, table

TITLE = "Idle cost of a waiting process"
WORKLOAD = (
    "A process that has joined and waits: CPU time (user + system, all threads) per "
    "second of wall time over 10 s, in % of one core, and context switches per second."
)


def ctx_switches() -> int:
    total = 0
    with open("/proc/self/status") as f:
        for line in f:
            if "ctxt_switches" in line:
                total += int(line.split()[1])
    return total


async def waiter(kind: str, path: str, seconds: float) -> None:
    closer: Any = None
    if kind == "ivip":
        from ivip_ipc_async import AsyncIPC

        ipc = AsyncIPC(path)
        await ipc.start()
        closer = ipc.destroy
    elif kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis()
        pubsub = client.pubsub()
        await pubsub.subscribe("bench-idle")

        async def listen() -> None:
            while True:
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=3600)

        task = asyncio.create_task(listen())

        async def close() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await pubsub.aclose()
            await client.aclose()

        closer = close
    else:
        import watchfiles

        stop = asyncio.Event()

        async def watch() -> None:
            async for _ in watchfiles.awatch(path, stop_event=stop):
                pass

        task = asyncio.create_task(watch())

        async def close() -> None:
            stop.set()
            await task

        closer = close
    await asyncio.sleep(1.0)
    cpu0, ctx0, wall0 = time.process_time(), ctx_switches(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, ctx1, wall1 = time.process_time(), ctx_switches(), time.monotonic()
    await closer()
    wall = wall1 - wall0
    emit({"cpu_percent": (cpu1 - cpu0) / wall * 100, "wakeups_per_s": (ctx1 - ctx0) / wall})


def idle(size: Size, codec: str) -> Result:
    """A waiting process: CPU % of one core and wake-ups/s."""
    out: Result = {}
    kinds = ["ivip", "watchfiles"] + (["redis"] if redis_available() else [])
    names = {
        "ivip": "ivip-ipc-async",
        "watchfiles": "watchfiles.awatch step=50",
        "redis": "redis pub/sub subscriber",
    }
    for kind in kinds:
        with scratch_dir() as d, workers() as started:
            started.append(Worker(waiter, kind, d, size.idle_seconds))
            out[names[kind]] = started[-1].line(timeout=size.idle_seconds + 60)
    return out


SCENARIOS = {"idle": idle}


def sections(results: Aggregated, repeats: int) -> Sections:
    if not results.get("idle"):
        return {}
    return {
        TITLE: [rerun("idle"), "", f"Workload: {WORKLOAD}", "", table(results["idle"], repeats), ""]
    }


if __name__ == "__main__":
    sys.exit(alone("python -m benchmarks.idle", SCENARIOS, sections))
