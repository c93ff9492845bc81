"""The benchmark scenarios: each returns {contender: {metric: value}} for one run."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .budget import budget
from .cache_ops import SCENARIOS as CACHE_OPS
from .coordination import SCENARIOS as COORDINATION
from .harness import (
    Worker,
    fan,
    latency_summary,
    pipe_run,
    redis_available,
    scratch_dir,
    workers,
)
from .loop_stall import loop_stall

Result = dict[str, dict[str, float]]


@dataclass
class Size:
    """How big a run is: full, or --quick."""

    latency_messages: int = 500
    throughput_messages: int = 100_000
    fanout_messages: int = 20_000
    cache_ops: int = 200_000
    visible_writes: int = 200
    idle_seconds: float = 10.0
    late_joiner_keys: int = 100_000
    batched_messages: int = 500_000  # notify_many: long enough that start-up is noise
    lean: bool = False  # only the rows issue #15's targets read (per-Python runs)


QUICK = Size(200, 20_000, 5_000, 50_000, 100, 3.0, 20_000, 100_000)


def _lat(result: dict[str, Any]) -> dict[str, float]:
    return latency_summary(result["latencies_ns"])


def latency(size: Size, codec: str) -> Result:
    """1 -> 1, small messages 5 ms apart: notify-to-handler latency."""
    n = size.latency_messages
    out: Result = {}
    with scratch_dir() as d:
        got, _ = fan(
            [("ivip-receiver", (d, n, codec))],
            [("ivip-sender", (d, n, 100, 0.005, "awaited", codec))],
        )
        out["ivip-ipc-async"] = _lat(got[0])
    if redis_available() and not size.lean:
        got, _ = fan([("redis-receiver", (n,))], [("redis-sender", (n, 100, 0.005, "awaited"))])
        out["redis pub/sub"] = _lat(got[0])
    out["multiprocessing Pipe"] = latency_summary(pipe_run(n, 100, 0.005)["latencies_ns"])
    out["multiprocessing Pipe (asyncio receiver)"] = latency_summary(
        pipe_run(n, 100, 0.005, on_loop=True)["latencies_ns"]
    )
    if size.lean:
        return out
    for role, label, extra in (
        ("inotify-receiver", "raw inotify (floor)", ()),
        ("watchfiles-receiver", "watchfiles.awatch step=50", (50,)),
        ("watchfiles-receiver", "watchfiles.awatch step=1", (1,)),
    ):
        with scratch_dir() as d:
            path = os.path.join(d, "data")
            open(path, "wb").close()
            got, _ = fan([(role, (path, n, *extra))], [("file-appender", (path, n, 0.005))])
            out[label] = _lat(got[0])
    return out


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
                [("ivip-receiver", (d, count, used))],
                [("ivip-sender", (d, count, 100, 0, mode, used))],
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
            got, sent = fan([("redis-receiver", (n,))], [("redis-sender", (n, 100, 0, mode))])
            out[f"redis pub/sub ({mode})"] = {
                "msg/s": got[0]["rate"],
                "send msg/s": sent[0]["send_rate"],
            }
    out["multiprocessing Pipe"] = {"msg/s": pipe_run(n, 100, 0)["rate"]}
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
                [("ivip-receiver", (d, n, codec))] * receivers,
                [("ivip-sender", (d, n, 100, 0.005, "awaited", codec))],
            )
            lat = latency_summary([x for g in got for x in g["latencies_ns"]])
        with scratch_dir() as d:
            n = size.fanout_messages
            got, _ = fan(
                [("ivip-receiver", (d, n, codec))] * receivers,
                [("ivip-sender", (d, n, 100, 0, "awaited", codec))],
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
            [("ivip-receiver", (d, 4 * n, codec))],
            [("ivip-sender", (d, n, 100, 0, "awaited", codec))] * 4,
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
                [("ivip-receiver", (d, n, codec))],
                [("ivip-sender", (d, n, nbytes, 0, "awaited", codec))],
            )
            row["ivip-ipc-async MB/s"] = got[0]["mb_per_s"]
        if redis_available():
            got, _ = fan([("redis-receiver", (n,))], [("redis-sender", (n, nbytes, 0, "awaited"))])
            row["redis pub/sub MB/s"] = got[0]["mb_per_s"]
        row["multiprocessing Pipe MB/s"] = pipe_run(n, nbytes, 0)["mb_per_s"]
        out[label] = row
    return out


def cache(size: Size, codec: str) -> Result:
    """Cache: get/set ops/s in one process, and set-to-visible latency across two."""
    out: Result = {}
    with scratch_dir() as d, workers() as started:
        w = Worker("ivip-cache", d, size.cache_ops, codec)
        started.append(w)
        out["ivip-ipc-async"] = w.line()
    with scratch_dir() as d, workers() as started:
        w = Worker("diskcache-cache", d, size.cache_ops // 4)
        started.append(w)
        out["diskcache"] = w.line()
    if redis_available():
        with workers() as started:
            w = Worker("redis-cache", size.cache_ops // 20)
            started.append(w)
            out["redis GET/SET"] = w.line()
    kinds = ["ivip", "diskcache"] + (["redis"] if redis_available() else [])
    names = {"ivip": "ivip-ipc-async", "diskcache": "diskcache", "redis": "redis GET/SET"}
    for kind in kinds:
        with scratch_dir() as d:
            n = size.visible_writes
            got, _ = fan(
                [("visible-reader", (kind, d, n))], [("visible-writer", (kind, d, n, 0.005))]
            )
            lat = _lat(got[0])
            out[names[kind]].update({f"visible {k} ms": v for k, v in lat.items()})
    return out


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
            w = Worker("idle", kind, d, size.idle_seconds)
            started.append(w)
            out[names[kind]] = w.line(timeout=size.idle_seconds + 60)
    return out


def startup(size: Size, codec: str) -> Result:
    """Start-up: until the first notify; a late joiner loading N keys."""
    out: Result = {}
    with scratch_dir() as d, workers() as started:
        w = Worker("startup", d)
        started.append(w)
        out["first notify (empty dir)"] = {"seconds": w.line()["seconds"]}
    with scratch_dir() as d, workers() as started:
        filler = Worker("fill-cache", d, size.late_joiner_keys)
        started.append(filler)
        assert filler.line(timeout=600) == "ready"
        joiner = Worker("startup", d)
        started.append(joiner)
        r = joiner.line()
        out[f"late joiner, {size.late_joiner_keys:,} keys"] = {
            "seconds": r["seconds"],
            "keys loaded": r["keys"],
        }
    return out


def redis_backend(size: Size, codec: str) -> Result:
    """This library's Redis backend beside plain redis-py on the same server."""
    if not redis_available():
        return {}
    out: Result = {}
    n = size.latency_messages
    url = f"redis://127.0.0.1:6379/0#bench-{uuid.uuid4().hex[:8]}"
    got, _ = fan(
        [("ivip-receiver", (url, n, codec))],
        [("ivip-sender", (url, n, 100, 0.005, "awaited", codec))],
    )
    out["ivip-ipc-async on Redis"] = _lat(got[0])
    got, _ = fan([("redis-receiver", (n,))], [("redis-sender", (n, 100, 0.005, "awaited"))])
    out["redis pub/sub (redis-py)"] = _lat(got[0])
    m = size.throughput_messages // 5
    got, _ = fan(
        [("ivip-receiver", (url, m, codec))],
        [("ivip-sender", (url, m, 100, 0, "awaited", codec))],
    )
    out["ivip-ipc-async on Redis"]["msg/s (awaited)"] = got[0]["rate"]
    got, _ = fan([("redis-receiver", (m,))], [("redis-sender", (m, 100, 0, "awaited"))])
    out["redis pub/sub (redis-py)"]["msg/s (awaited)"] = got[0]["rate"]
    # The floor of this design: the backend's own APPEND script through plain redis-py.
    got, _ = fan([("redis-receiver", (m, "id"))], [("redis-script-sender", (m, 100, 0))])
    out["redis EVALSHA APPEND (redis-py)"] = {"msg/s (awaited)": got[0]["rate"]}
    if size.lean:
        _drop_redis_namespace(url.partition("#")[2])
        return out
    with workers() as started:
        w = Worker("ivip-cache", url, size.cache_ops, codec)
        started.append(w)
        out["ivip-ipc-async on Redis"]["cache get/s"] = w.line()["get"]
    with workers() as started:
        w = Worker("redis-cache", size.cache_ops // 20)
        started.append(w)
        out["redis pub/sub (redis-py)"]["cache get/s"] = w.line()["get"]
    _drop_redis_namespace(url.partition("#")[2])
    return out


def _drop_redis_namespace(namespace: str) -> None:
    import redis

    client = redis.Redis()
    keys = client.keys(f"ivip:{{{namespace}}}:*")
    if keys:
        client.delete(*keys)
    client.close()


SCENARIOS: dict[str, Callable[[Size, str], Result]] = {
    "latency": latency,
    "throughput": throughput,
    "fanout": fanout,
    "many_to_one": many_to_one,
    "sizes": message_sizes,
    "cache": cache,
    "idle": idle,
    "startup": startup,
    "redis_backend": redis_backend,
    "loop_stall": loop_stall,
    "budget": budget,
}
SCENARIOS.update(COORDINATION)  # locks and stampede: benchmarks/coordination.py
SCENARIOS.update(CACHE_OPS)  # add, incr, versioned writes, bulk: benchmarks/cache_ops.py
