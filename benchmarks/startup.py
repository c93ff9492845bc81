"""Start-up: a new process's time to its first `notify` on an empty directory, and a
late joiner's after another process has set many keys (it loads the snapshot and the
retained log).

    python -m benchmarks.startup [--repeat 3] [--quick] [--publish]

A crowd of joiners starting at once over a long retained log: `python -m
benchmarks.crowd`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from .harness import Aggregated, Result, Size, Worker, emit, scratch_dir, wait_go, workers
from .report import Sections, alone, rerun, table

TITLE = "Start-up"
WORKLOAD = (
    "Time for a new process from `AsyncIPC()` to the return of its first `notify` on "
    "an empty directory; and the same for a late joiner after another process has "
    "set 100,000 keys (it loads the snapshot and the retained log)."
)


async def joiner(path: str) -> None:
    from ivip_ipc_async import AsyncCache, AsyncIPC

    started = time.perf_counter()
    ipc = AsyncIPC(path)
    await ipc.notify("first", 1)
    first_notify = time.perf_counter() - started
    keys = len(AsyncCache(ipc))
    await ipc.destroy()
    emit({"seconds": first_notify, "keys": keys})


async def fill_cache(path: str, keys: int) -> None:
    from ivip_ipc_async import AsyncCache, AsyncIPC

    async with AsyncIPC(path, snapshot_interval=0.2) as ipc:
        cache = AsyncCache(ipc)
        for base in range(0, keys, 1000):
            await asyncio.gather(
                *(
                    cache.set(f"key:{i}", {"id": i, "name": "x"}, 0)
                    for i in range(base, base + 1000)
                )
            )
        version = ipc.mirror.version
        deadline = time.monotonic() + 60
        # wait for a snapshot that holds everything
        while time.monotonic() < deadline:
            backend: Any = ipc.medium.backend
            if backend._snapshots.last_version >= version:
                break
            await asyncio.sleep(0.05)
        emit("ready")
        await asyncio.to_thread(wait_go)


def startup(size: Size, codec: str) -> Result:
    """Start-up: until the first notify; a late joiner loading N keys."""
    out: Result = {}
    with scratch_dir() as d, workers() as started:
        started.append(Worker(joiner, d))
        out["first notify (empty dir)"] = {"seconds": started[-1].line()["seconds"]}
    with scratch_dir() as d, workers() as started:
        started.append(Worker(fill_cache, d, size.late_joiner_keys))
        assert started[-1].line(timeout=600) == "ready"
        started.append(Worker(joiner, d))
        r = started[-1].line()
        out[f"late joiner, {size.late_joiner_keys:,} keys"] = {
            "seconds": r["seconds"],
            "keys loaded": r["keys"],
        }
    return out


SCENARIOS = {"startup": startup}


def sections(results: Aggregated, repeats: int) -> Sections:
    if not results.get("startup"):
        return {}
    return {
        TITLE: [
            rerun("startup"),
            "",
            f"Workload: {WORKLOAD}",
            "",
            table(results["startup"], repeats),
            "",
        ]
    }


if __name__ == "__main__":
    sys.exit(alone("python -m benchmarks.startup", SCENARIOS, sections))
