"""Throughput: messages per second 1 -> 1 (awaited, gathered, batched; the receiver's
CPU and RSS), fan-out 1 -> 4 and 1 -> 16, fan-in 4 -> 1, and a message size sweep,
beside Redis pub/sub, a `multiprocessing` Pipe and the `asyncio.gather` floor.

    python -m benchmarks.throughput [--repeat 3] [--quick] [--publish]
"""

from __future__ import annotations

import asyncio
import sys
import time

from . import messaging as m
from .harness import Aggregated, Result, Size, fan, latency_summary, redis_available, scratch_dir
from .report import Sections, alone, rerun, table

WORKLOADS = {
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
}
TITLES = {
    "throughput": "Throughput 1 -> 1, and receiver RSS",
    "fanout": "Fan-out 1 -> 4 and 1 -> 16",
    "many_to_one": "Four senders -> one receiver",
    "sizes": "Message size sweep (MB/s)",
}


def throughput(size: Size, codec: str) -> Result:
    """1 -> 1, ~100-byte messages as fast as possible: msg/s received, RSS."""
    n = size.throughput_messages
    out: Result = {}
    runs = [("awaited", codec), ("concurrent", codec), ("batched", codec)]
    if codec == "json" and not size.lean:
        runs.append(("awaited", "orjson"))  # the opt-in codec, side by side
    for mode, used in runs:
        count = size.batched_messages if mode == "batched" else n
        with scratch_dir() as d:
            got, sent = fan(
                [(m.ivip_receiver, (d, count, used))],
                [(m.ivip_sender, (d, count, 100, 0, mode, used))],
            )
            r = got[0]
            label = mode if used == codec else f"{mode}, {used}"
            out[f"ivip-ipc-async ({label})"] = {
                "msg/s": r["rate"],
                "send msg/s": sent[0]["send_rate"],
                "receiver CPU us/msg": r["cpu_ns_per_msg"] / 1000,
                "rss start MiB": r["rss_kib"][0] / 1024,
                "rss peak MiB": r["rss_kib"][1] / 1024,
                "rss end MiB": r["rss_kib"][2] / 1024,
            }
    if redis_available():
        for mode in ("pipelined",) if size.lean else ("awaited", "pipelined"):
            got, sent = fan(*m.redis_roles(n, 100, 0, mode))
            out[f"redis pub/sub ({mode})"] = {
                "msg/s": got[0]["rate"],
                "send msg/s": sent[0]["send_rate"],
            }
    out["multiprocessing Pipe"] = {"msg/s": m.pipe_run(n, 100, 0)["rate"]}
    out["asyncio.gather floor (no I/O)"] = {"msg/s": asyncio.run(_gather_floor(n))}
    return out


async def _gather_floor(n: int) -> float:
    """Calls/s of `asyncio.gather` over 1,000 coroutines that do nothing: the most any
    `concurrent` sender can reach, whatever its `notify` costs."""

    async def nothing() -> None:
        return None

    started = time.perf_counter()
    for _ in range(0, n, 1000):
        await asyncio.gather(*(nothing() for _ in range(1000)))
    return n / (time.perf_counter() - started)


def fanout(size: Size, codec: str) -> Result:
    """1 -> 4 and 1 -> 16 receivers: latency (5 ms apart) and per-receiver msg/s."""
    out: Result = {}
    for receivers in (4, 16):
        with scratch_dir() as d:
            n = size.latency_messages // 2
            got, _ = fan(
                [(m.ivip_receiver, (d, n, codec))] * receivers,
                [(m.ivip_sender, (d, n, 100, 0.005, "awaited", codec))],
            )
            lat = latency_summary([x for g in got for x in g["latencies_ns"]])
        with scratch_dir() as d:
            n = size.fanout_messages
            got, _ = fan(
                [(m.ivip_receiver, (d, n, codec))] * receivers,
                [(m.ivip_sender, (d, n, 100, 0, "awaited", codec))],
            )
            rates = sorted(g["rate"] for g in got)
        out[f"ivip-ipc-async 1->{receivers}"] = {
            **lat,
            "min msg/s per receiver": rates[0],
            "median msg/s per receiver": rates[len(rates) // 2],
        }
    return out


def many_to_one(size: Size, codec: str) -> Result:
    """4 senders -> 1 receiver: msg/s received."""
    n = size.fanout_messages
    with scratch_dir() as d:
        got, _ = fan(
            [(m.ivip_receiver, (d, 4 * n, codec))],
            [(m.ivip_sender, (d, n, 100, 0, "awaited", codec))] * 4,
        )
    return {"ivip-ipc-async 4->1": {"msg/s": got[0]["rate"]}}


SIZES = (100, 1024, 10 * 1024, 100 * 1024, 1024 * 1024)


def message_sizes(size: Size, codec: str) -> Result:
    """Message size sweep: MB/s received."""
    out: Result = {}
    budget = 40e6 if size.throughput_messages >= 100_000 else 10e6
    for nbytes in SIZES:
        n = max(20, min(20_000, int(budget / nbytes)))
        label = f"{nbytes // 1024} KiB" if nbytes >= 1024 else f"{nbytes} B"
        row: dict[str, float] = {}
        with scratch_dir() as d:
            got, _ = fan(
                [(m.ivip_receiver, (d, n, codec))],
                [(m.ivip_sender, (d, n, nbytes, 0, "awaited", codec))],
            )
            row["ivip-ipc-async MB/s"] = got[0]["mb_per_s"]
        if redis_available():
            got, _ = fan(*m.redis_roles(n, nbytes, 0))
            row["redis pub/sub MB/s"] = got[0]["mb_per_s"]
        row["multiprocessing Pipe MB/s"] = m.pipe_run(n, nbytes, 0)["mb_per_s"]
        out[label] = row
    return out


SCENARIOS = {
    "throughput": throughput,
    "fanout": fanout,
    "many_to_one": many_to_one,
    "sizes": message_sizes,
}


def sections(results: Aggregated, repeats: int) -> Sections:
    return {
        TITLES[key]: [
            rerun("throughput"),
            "",
            f"Workload: {WORKLOADS[key]}",
            "",
            table(results[key], repeats),
            "",
        ]
        for key in SCENARIOS
        if results.get(key)
    }


if __name__ == "__main__":
    sys.exit(alone("python -m benchmarks.throughput", SCENARIOS, sections))
