"""One-way latency, 1 -> 1: from `notify` to the receiver's handler, beside Redis
pub/sub, a `multiprocessing` Pipe (blocking, and waited on by an asyncio loop), the
raw inotify floor and `watchfiles.awatch`.

    python -m benchmarks.latency [--repeat 3] [--quick] [--publish]
"""

from __future__ import annotations

import os
import sys
from typing import Any

from . import messaging as m
from .harness import Aggregated, Result, Size, fan, latency_summary, redis_available, scratch_dir
from .report import Sections, alone, rerun, table

TITLE = "One-way latency, 1 -> 1 (ms)"
WORKLOAD = (
    "One sender process, one receiver process. 500 messages of about 100 bytes, "
    "5 ms apart; each carries the sender's `CLOCK_MONOTONIC` time and the receiver's "
    "handler records the difference. ivip-ipc-async: `await ipc.notify()` to an "
    "`ipc.on()` handler. Redis: `PUBLISH` to a subscriber, both through redis-py's "
    "asyncio client (hiredis). Pipe: `multiprocessing` Pipe, blocking `recv_bytes`; "
    "Pipe (asyncio receiver): the same Pipe, its receiver waiting on an asyncio loop "
    "(`loop.add_reader` on the Pipe's fd, then `recv_bytes`), the wake-up path every "
    "asyncio receiver has (the latency target is judged against the plain Pipe). "
    "Raw inotify: the floor for any file-based design, an inotify fd on the receiver's "
    "asyncio loop and a read of the appended line. watchfiles: `awatch` on the file."
)


def summary(result: dict[str, Any]) -> dict[str, float]:
    """p50/p90/p99/max (ms) of a receiver's latencies."""
    return latency_summary(result["latencies_ns"])


def latency(size: Size, codec: str) -> Result:
    """1 -> 1, small messages 5 ms apart: notify-to-handler latency."""
    n = size.latency_messages
    out: Result = {}
    with scratch_dir() as d:
        got, _ = fan(
            [(m.ivip_receiver, (d, n, codec))],
            [(m.ivip_sender, (d, n, 100, 0.005, "awaited", codec))],
        )
        out["ivip-ipc-async"] = summary(got[0])
    if redis_available() and not size.lean:
        got, _ = fan(*m.redis_roles(n, 100, 0.005))
        out["redis pub/sub"] = summary(got[0])
    out["multiprocessing Pipe"] = summary(m.pipe_run(n, 100, 0.005))
    out["multiprocessing Pipe (asyncio receiver)"] = summary(m.pipe_run(n, 100, 0.005, True))
    if size.lean:
        return out
    for role, label, extra in (
        (m.inotify_receiver, "raw inotify (floor)", ()),
        (m.watchfiles_receiver, "watchfiles.awatch step=50", (50,)),
        (m.watchfiles_receiver, "watchfiles.awatch step=1", (1,)),
    ):
        with scratch_dir() as d:
            path = os.path.join(d, "data")
            open(path, "wb").close()
            got, _ = fan([(role, (path, n, *extra))], [(m.file_appender, (path, n, 0.005))])
            out[label] = summary(got[0])
    return out


SCENARIOS = {"latency": latency}


def sections(results: Aggregated, repeats: int) -> Sections:
    if not results.get("latency"):
        return {}
    return {
        TITLE: [
            rerun("latency"),
            "",
            f"Workload: {WORKLOAD}",
            "",
            table(results["latency"], repeats),
            "",
        ]
    }


if __name__ == "__main__":
    sys.exit(alone("python -m benchmarks.latency", SCENARIOS, sections))
