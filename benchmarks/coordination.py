"""Coordination benchmarks: lock latency and a cache stampede, beside the peers.

    python -m benchmarks.coordination [--repeat 3] [--quick] [--publish]

runs only these two scenarios and prints them; with `--publish` (or `--out PATH`)
it rewrites only the "Coordination" section of docs/benchmarks.md (the full
suite, `python -m benchmarks`, runs them too).

* `locks`: acquire + release of one lock, uncontended (one process) and
  contended (4 processes on the same lock): this library's `ipc.lock` on the
  directory and on Redis, redis-py's `redis.asyncio.lock.Lock` and diskcache's
  `Lock`, each with its default settings.
* `stampede`: 100 concurrent cold callers of one memoized function (25 in each
  of 4 processes), which takes 100 ms: how many times it ran, and each
  caller's time to its result. This library's `memoize` on the directory and
  on Redis (single flight across processes, the default; and the per-process
  opt-out), and cashews' `@cache(lock=True)` on the same Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import uuid
from typing import Any

from .harness import (
    REDIS,
    Aggregated,
    N,
    Result,
    Size,
    contender_target,
    drop_redis,
    emit,
    latency_summary,
    open_ipc,
    redis_available,
    scratch_dir,
    together,
    wait_go,
)
from .report import Sections, alone, rerun, table

COMPUTE_SECONDS = 0.1

WORKLOADS = {
    "locks": (
        "`async with` acquire + release of one lock, nothing done inside, awaited one "
        "after the other: `uncontended` by one process (2,000 times; p50/p99 of one "
        "cycle), `contended` by 4 processes at once on the same lock (200 times each; "
        "p50/p99/max of one cycle, waiting included; cycles/s of all four together; "
        "`handoffs %`: how often the next holder was another process). "
        'ivip-ipc-async: `ipc.lock("bench")` on a directory in /dev/shm and on Redis. '
        'redis-py: `redis.asyncio.Redis.lock("bench", timeout=10)` (waiters poll every '
        '`sleep=0.1` s, its default). diskcache: `diskcache.Lock(Cache(dir), "bench")` '
        "(sync; waiters poll every 1 ms)."
    ),
    "stampede": (
        "100 callers of one cold memoized function at once, 25 concurrent in each of 4 "
        "processes; the function sleeps 100 ms and returns a small dict. `computations`: "
        "how many times it ran in all; p50/p99/max: each caller's time from the start to "
        "its result. ivip-ipc-async: `@cache.memoize(ttl=60)` (single flight across "
        "processes, the default) and `across_processes=False` (single flight per process); "
        'cashews: `@cache(ttl=60, lock=True)` on the same Redis (`cache.setup("redis://...")`).'
    ),
}

# -- worker roles (child processes) ---------------------------------------------------------


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, (line + "\n").encode())
    os.close(fd)


async def _lock_ivip(target: str, cycles: int) -> tuple[list[int], list[int]]:
    async with open_ipc(target) as ipc:
        async with ipc.lock("warm-up"):  # connections made before the clock starts
            pass
        emit("ready")
        await asyncio.to_thread(wait_go)
        out, acquired = [], []
        for _ in range(cycles):
            t = N()
            async with ipc.lock("bench"):
                acquired.append(N())
            out.append(N() - t)
        return out, acquired


async def _lock_redis_py(namespace: str, cycles: int) -> tuple[list[int], list[int]]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS)
    await client.ping()
    emit("ready")
    await asyncio.to_thread(wait_go)
    out, acquired = [], []
    for _ in range(cycles):
        t = N()
        async with client.lock(f"bench-{namespace}", timeout=10):
            acquired.append(N())
        out.append(N() - t)
    await client.aclose()
    return out, acquired


def _lock_diskcache(directory: str, cycles: int) -> tuple[list[int], list[int]]:
    import diskcache

    with diskcache.Cache(directory) as cache:
        lock = diskcache.Lock(cache, "bench")
        emit("ready")
        wait_go()
        out, acquired = [], []
        for _ in range(cycles):
            t = N()
            with lock:
                acquired.append(N())
            out.append(N() - t)
        return out, acquired


def lock_role(kind: str, target: str, cycles: int) -> None:
    """Print `ready`, wait for `go`, run `cycles` acquire + release, print the times."""
    if kind == "ivip":
        latencies, acquired = asyncio.run(_lock_ivip(target, cycles))
    elif kind == "redis-py":
        latencies, acquired = asyncio.run(_lock_redis_py(target, cycles))
    else:
        latencies, acquired = _lock_diskcache(target, cycles)
    emit({"latencies_ns": latencies, "acquired_ns": acquired})


async def _stampede(kind: str, target: str, key: str, callers: int, log: str) -> list[int]:
    async def work(k: str) -> dict[str, Any]:
        _append(log, f"{os.getpid()} {k}")
        await asyncio.sleep(COMPUTE_SECONDS)
        return {"key": k, "by": os.getpid()}

    if kind == "cashews":
        from cashews import cache as cashews_cache

        cashews_cache.setup(REDIS)
        fn = cashews_cache(ttl=60, lock=True, key="stampede:{k}")(work)
        await cashews_cache.get("warm-up")  # connected before the clock starts
        ipc = None
    else:
        from ivip_ipc_async import AsyncCache

        ipc = await open_ipc(target).start()
        async with ipc.lock("warm-up"):
            pass
        fn = AsyncCache(ipc, name="stampede").memoize(
            "work", work, 60, across_processes=kind == "ivip"
        )
    emit("ready")
    await asyncio.to_thread(wait_go)
    start = N()

    async def call() -> int:
        await fn(key)
        return N() - start

    out = list(await asyncio.gather(*(call() for _ in range(callers))))
    if ipc is not None:
        await ipc.destroy()
    else:
        from cashews import cache as cashews_cache

        await cashews_cache.close()
    return out


def stampede_role(kind: str, target: str, key: str, callers: int, log: str) -> None:
    """Print `ready`, wait for `go`, call the memoized function `callers` times at once."""
    emit({"latencies_ns": asyncio.run(_stampede(kind, target, key, callers, log))})


# -- scenarios ----------------------------------------------------------------------------------


def _cycles(results: list[Any]) -> list[int]:
    return [x for r in results for x in r["latencies_ns"]]


def locks(size: Size, codec: str) -> Result:
    """Lock acquire + release: uncontended and contended by 4 processes."""
    one, each, crowd = (500, 50, 4) if size.quick else (2000, 200, 4)
    out: Result = {}
    contenders: list[tuple[str, str, str]] = [("ivip-ipc-async (directory)", "ivip", "dir")]
    if redis_available():
        contenders += [
            ("ivip-ipc-async (Redis)", "ivip", "redis"),
            ("redis-py Lock", "redis-py", "redis"),
        ]
    contenders.append(("diskcache Lock", "diskcache", "dir"))
    for label, kind, medium in contenders:
        row: dict[str, float] = {}
        for mode, count, n in (("uncontended", 1, one), ("contended", crowd, each)):
            with scratch_dir() as d:
                target, namespace = contender_target(kind, medium, d)
                got = together([(lock_role, (kind, target, n))] * count)
                summary = latency_summary(_cycles(got))
                row[f"{mode} p50 ms"] = summary["p50"]
                row[f"{mode} p99 ms"] = summary["p99"]
                if mode == "contended":
                    busy = max(sum(r["latencies_ns"]) for r in got) / 1e9
                    row["contended cycles/s"] = count * n / max(busy, 1e-9)
                    row["contended max ms"] = summary["max"]
                    # How often the lock went to another process (100%: every time).
                    order = sorted((t, i) for i, r in enumerate(got) for t in r["acquired_ns"])
                    handoffs = sum(a[1] != b[1] for a, b in itertools.pairwise(order))
                    row["contended handoffs %"] = 100 * handoffs / max(1, len(order) - 1)
                if medium == "redis":
                    drop_redis(namespace, "stampede:*")
        out[label] = row
    return out


def stampede(size: Size, codec: str) -> Result:
    """100 concurrent cold callers over 4 processes: computations, time to result."""
    out: Result = {}
    contenders = [("ivip-ipc-async memoize (directory)", "ivip", "dir")]
    contenders.append(("ivip-ipc-async memoize (directory), per process", "ivip-local", "dir"))
    if redis_available():
        contenders += [
            ("ivip-ipc-async memoize (Redis)", "ivip", "redis"),
            ("cashews @cache(lock=True) (Redis)", "cashews", "redis"),
        ]
    for label, kind, medium in contenders:
        with scratch_dir() as d:
            namespace = f"bench-{uuid.uuid4().hex[:8]}"
            target = d if medium == "dir" else f"{REDIS}#{namespace}"
            log = os.path.join(d, "computed.log")
            key = uuid.uuid4().hex  # cold: a key nobody computed
            got = together([(stampede_role, (kind, target, key, 25, log))] * 4)
            with open(log) as f:
                computations = len(f.read().splitlines())
            summary = latency_summary(_cycles(got))
            out[label] = {
                "computations": float(computations),
                "p50 ms": summary["p50"],
                "p99 ms": summary["p99"],
                "max ms": summary["max"],
            }
            if medium == "redis":
                drop_redis(namespace, "stampede:*")
    return out


SCENARIOS = {"locks": locks, "stampede": stampede}
TITLES = {"locks": "Locks", "stampede": "Stampede"}

# -- the page ------------------------------------------------------------------------------


def sections(results: Aggregated, repeats: int) -> Sections:
    """The "Coordination" section of the page, from aggregated results."""
    parts = [k for k in SCENARIOS if results.get(k)]
    if not parts:
        return {}
    lines = [
        "Locks and single-flight memoize (docs/coordination.md). " + rerun("coordination"),
        "",
        "How to read the lock table: redis-py's and diskcache's waiters poll (every "
        "100 ms and 1 ms), so the process that has just released takes the lock again "
        "before they look: many cycles per second, few handoffs, and a waiter can wait "
        "its whole poll interval or longer (`max ms`). ivip-ipc-async's waiters are woken "
        "by the release itself (inotify on the directory, a published notice on Redis), "
        "so the lock changes hands far more often, at the cost of a wake-up per handoff.",
        "",
    ]
    for key in parts:
        lines += [
            f"### {TITLES[key]}",
            "",
            f"Workload: {WORKLOADS[key]}",
            "",
            table(results[key], repeats),
            "",
        ]
    return {"Coordination": lines}


if __name__ == "__main__":
    sys.exit(alone("python -m benchmarks.coordination", SCENARIOS, sections))
