"""The Redis backend beside plain redis-py on the same server: latency, awaited msg/s
(and the floor of the design, the backend's own APPEND script through plain redis-py),
and a mirrored cache `get` against `GET` round trips.

    python -m benchmarks.redis_backend [--repeat 3] [--quick] [--publish]
"""

from __future__ import annotations

import sys
import uuid

from . import messaging as m
from .cache import ivip_get_set, redis_get_set
from .harness import (
    REDIS,
    Aggregated,
    Result,
    Size,
    Worker,
    drop_redis,
    fan,
    latency_summary,
    redis_available,
    workers,
)
from .report import Sections, alone, rerun, table

TITLE = "The Redis backend beside plain redis-py"
WORKLOAD = (
    'This library\'s Redis backend (`AsyncIPC("redis://127.0.0.1:6379/0", '
    "namespace=...)`) beside plain redis-py asyncio on the same server, one sender "
    "and one receiver process: latency as in the one-way latency section (500 messages "
    "5 ms apart; plain redis-py: `PUBLISH` to a subscriber); `msg/s (awaited)`: 20,000 "
    "messages, each awaited; `redis EVALSHA APPEND (redis-py)`: the floor of this design, "
    "plain redis-py running the backend's own APPEND script (`XADD` + `PUBLISH` + `PTTL` "
    "in Lua), the same 20,000 awaited, with a redis-py subscriber receiving; `cache "
    "get/s`: `await cache.get` of a small dict (served by the mirror) against `GET` + "
    "`json.loads` round trips."
)


def redis_backend(size: Size, codec: str) -> Result:
    """This library's Redis backend beside plain redis-py on the same server."""
    if not redis_available():
        return {}
    out: Result = {}
    n = size.latency_messages
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    url = f"{REDIS}#{namespace}"
    try:
        got, _ = fan(
            [(m.ivip_receiver, (url, n, codec))],
            [(m.ivip_sender, (url, n, 100, 0.005, "awaited", codec))],
        )
        out["ivip-ipc-async on Redis"] = latency_summary(got[0]["latencies_ns"])
        got, _ = fan(*m.redis_roles(n, 100, 0.005))
        out["redis pub/sub (redis-py)"] = latency_summary(got[0]["latencies_ns"])
        k = size.throughput_messages // 5
        got, _ = fan(
            [(m.ivip_receiver, (url, k, codec))],
            [(m.ivip_sender, (url, k, 100, 0, "awaited", codec))],
        )
        out["ivip-ipc-async on Redis"]["msg/s (awaited)"] = got[0]["rate"]
        got, _ = fan(*m.redis_roles(k, 100, 0))
        out["redis pub/sub (redis-py)"]["msg/s (awaited)"] = got[0]["rate"]
        # The floor of this design: the backend's own APPEND script through plain redis-py.
        got, _ = fan(*m.redis_roles(k, 100, 0, script=True))
        out["redis EVALSHA APPEND (redis-py)"] = {"msg/s (awaited)": got[0]["rate"]}
        if size.lean:
            return out
        with workers() as started:
            started.append(Worker(ivip_get_set, url, size.cache_ops, codec))
            out["ivip-ipc-async on Redis"]["cache get/s"] = started[-1].line()["get"]
        with workers() as started:
            started.append(Worker(redis_get_set, size.cache_ops // 20, f"bench:{namespace}:k"))
            out["redis pub/sub (redis-py)"]["cache get/s"] = started[-1].line()["get"]
        return out
    finally:
        drop_redis(namespace)


SCENARIOS = {"redis_backend": redis_backend}


def sections(results: Aggregated, repeats: int) -> Sections:
    if not results.get("redis_backend"):
        return {}
    return {
        TITLE: [
            rerun("redis_backend"),
            "",
            f"Workload: {WORKLOAD}",
            "",
            table(results["redis_backend"], repeats),
            "",
        ]
    }


if __name__ == "__main__":
    sys.exit(alone("python -m benchmarks.redis_backend", SCENARIOS, sections))
