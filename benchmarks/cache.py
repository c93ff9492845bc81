"""The cache: `get` and `set` in one process and the time until a write is visible in
another, beside diskcache and Redis `GET`/`SET`; and the atomic and bulk operations
(`add`, `incr` alone and by 4 processes at once, the versioned write, `get_many`,
`set_many`, `delete_many`, `delete_prefix`) beside redis-py's and diskcache's own.

    python -m benchmarks.cache [--repeat 3] [--quick] [--publish]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from .harness import (
    REDIS,
    Aggregated,
    N,
    Result,
    Size,
    Worker,
    contender_target,
    drop_redis,
    emit,
    fan,
    latency_summary,
    open_ipc,
    redis_available,
    scratch_dir,
    together,
    wait_go,
    workers,
)
from .report import Sections, alone, rerun, table

BULK = 100  # keys per bulk call
PROCESSES = 4


# -- get, set and visible: the roles -------------------------------------------------------

VALUE = {"id": 7, "name": "Ana", "active": True, "score": 1.5}


async def ivip_get_set(path: str, n: int, codec: str) -> None:
    from ivip_ipc_async import AsyncCache

    async with open_ipc(path, codec) as ipc:
        cache = AsyncCache(ipc)
        await cache.set("k", VALUE, 0)
        started = time.perf_counter()
        for _ in range(n):
            await cache.get("k")
        get_rate = n / (time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(n // 10):
            await cache.set("k", {**VALUE, "id": i}, 0)
        set_rate = (n // 10) / (time.perf_counter() - started)
    emit({"get": get_rate, "set": set_rate})


def diskcache_get_set(path: str, n: int) -> None:
    import diskcache

    cache = diskcache.Cache(path)
    cache.set("k", VALUE)
    started = time.perf_counter()
    for _ in range(n):
        cache.get("k")
    get_rate = n / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(n // 10):
        cache.set("k", {**VALUE, "id": i})
    set_rate = (n // 10) / (time.perf_counter() - started)
    cache.close()
    emit({"get": get_rate, "set": set_rate})


async def redis_get_set(n: int, key: str) -> None:
    """`GET` + `json.loads` and `SET` of `key` (a key of this run's own: the server is
    shared)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis()
    await client.set(key, json.dumps(VALUE))
    started = time.perf_counter()
    for _ in range(n):
        json.loads(await client.get(key))
    get_rate = n / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(n // 10):
        await client.set(key, json.dumps({**VALUE, "id": i}))
    set_rate = (n // 10) / (time.perf_counter() - started)
    await client.delete(key)
    await client.aclose()
    emit({"get": get_rate, "set": set_rate})


async def visible_reader(kind: str, path: str, count: int) -> None:
    """Poll a key until each new value shows; latency = seen - written. Redis: the key
    `bench:<the run's scratch directory name>:v`."""
    latencies: list[int] = []
    last = -1
    if kind == "ivip":
        from ivip_ipc_async import AsyncCache, AsyncIPC

        ipc = AsyncIPC(path)
        await ipc.start()
        cache = AsyncCache(ipc)

        async def get() -> Any:
            return await cache.get("v")
    elif kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis()

        async def get() -> Any:
            raw = await client.get(f"bench:{os.path.basename(path)}:v")
            return json.loads(raw) if raw else None
    else:
        import diskcache

        dc = diskcache.Cache(path)

        async def get() -> Any:
            return dc.get("v")

    emit("ready")
    deadline = time.monotonic() + 120
    while last < count - 1 and time.monotonic() < deadline:
        value = await get()
        if value is not None and value["i"] > last:
            latencies.append(N() - value["t"])
            last = value["i"]
        await asyncio.sleep(0)
    if kind == "ivip":
        await ipc.destroy()
    elif kind == "redis":
        await client.aclose()
    emit({"count": len(latencies), "latencies_ns": latencies})


async def visible_writer(kind: str, path: str, count: int, interval: float) -> None:
    if kind == "ivip":
        from ivip_ipc_async import AsyncCache, AsyncIPC

        ipc = AsyncIPC(path)
        await ipc.start()
        cache = AsyncCache(ipc)

        async def put(value: Any) -> None:
            await cache.set("v", value, 0)
    elif kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis()

        async def put(value: Any) -> None:
            await client.set(f"bench:{os.path.basename(path)}:v", json.dumps(value))
    else:
        import diskcache

        dc = diskcache.Cache(path)

        async def put(value: Any) -> None:
            dc.set("v", value)

    await asyncio.to_thread(wait_go)
    for i in range(count):
        await put({"t": N(), "i": i})
        await asyncio.sleep(interval)
    emit({"written": count})
    await asyncio.to_thread(wait_go)
    if kind == "ivip":
        await ipc.destroy()
    elif kind == "redis":
        await client.delete(f"bench:{os.path.basename(path)}:v")
        await client.aclose()


# -- atomic and bulk operations: the roles -------------------------------------------------

_N = time.perf_counter


async def _rate(count: int, call: Callable[[int], Awaitable[Any]], per: int = 1) -> float:
    await call(-1)  # warm: connections made, scripts loaded, files open
    t = _N()
    for i in range(count):
        await call(i)
    return count * per / (_N() - t)


async def _ivip_ops(target: str, count: int) -> dict[str, float]:
    from ivip_ipc_async import AsyncCache

    ipc = open_ipc(target)
    out: dict[str, float] = {}
    async with ipc:
        cache: AsyncCache[Any] = AsyncCache(ipc, default_ttl=0)
        keys = [f"bulk:{i}" for i in range(BULK)]
        await cache.set("present", 1)
        out["set ops/s"] = await _rate(count, lambda i: cache.set("k", i))
        out["add (wins) ops/s"] = await _rate(count, lambda i: cache.add(f"new:{i}", i))
        out["add (loses) ops/s"] = await _rate(count, lambda i: cache.add("present", i))
        out["incr ops/s"] = await _rate(count, lambda i: cache.incr("n"))

        async def versioned(i: int) -> None:
            value, version = await cache.get_with_version("v", 0)
            assert await cache.set("v", value + 1, if_version=version)

        out["versioned write ops/s"] = await _rate(count, versioned)
        mapping = dict.fromkeys(keys, 1)
        rounds = max(10, count // BULK)
        out["set_many keys/s"] = await _rate(rounds, lambda i: cache.set_many(mapping), BULK)
        out["get_many keys/s"] = await _rate(rounds, lambda i: cache.get_many(keys), BULK)

        async def delete_many(i: int) -> None:
            await cache.set_many(mapping)
            t = _N()
            await cache.delete_many(keys)
            spent[0] += _N() - t

        async def delete_prefix(i: int) -> None:
            await cache.set_many(mapping)
            t = _N()
            await cache.delete_prefix("bulk:")
            spent[0] += _N() - t

        for label, fn in (("delete_many", delete_many), ("delete_prefix", delete_prefix)):
            spent = [0.0]
            for i in range(rounds):
                await fn(i)
            out[f"{label} keys/s"] = rounds * BULK / spent[0]
    return out


async def _redis_py_ops(namespace: str, count: int) -> dict[str, float]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS)
    p = f"bench-{namespace}:"
    keys = [f"{p}bulk:{i}" for i in range(BULK)]
    out: dict[str, float] = {}
    await client.set(f"{p}present", 1)
    out["set ops/s"] = await _rate(count, lambda i: client.set(f"{p}k", i))
    out["add (wins) ops/s"] = await _rate(count, lambda i: client.set(f"{p}new:{i}", i, nx=True))
    out["add (loses) ops/s"] = await _rate(count, lambda i: client.set(f"{p}present", i, nx=True))
    out["incr ops/s"] = await _rate(count, lambda i: client.incr(f"{p}n"))
    rounds = max(10, count // BULK)

    async def set_many(i: int) -> None:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.set(key, 1)
        await pipe.execute()

    out["set_many keys/s"] = await _rate(rounds, set_many, BULK)
    out["get_many keys/s"] = await _rate(rounds, lambda i: client.mget(keys), BULK)
    spent = 0.0
    for _ in range(rounds):
        await set_many(0)
        t = _N()
        await client.delete(*keys)
        spent += _N() - t
    out["delete_many keys/s"] = rounds * BULK / spent
    await client.aclose()
    return out


def _diskcache_ops(directory: str, count: int) -> dict[str, float]:
    import diskcache

    out: dict[str, float] = {}

    def rate(call: Callable[[int], Any]) -> float:
        call(-1)
        t = _N()
        for i in range(count):
            call(i)
        return count / (_N() - t)

    with diskcache.Cache(directory) as cache:
        cache.set("present", 1)
        out["set ops/s"] = rate(lambda i: cache.set("k", i))
        out["add (wins) ops/s"] = rate(lambda i: cache.add(f"new:{i}", i))
        out["add (loses) ops/s"] = rate(lambda i: cache.add("present", i))
        out["incr ops/s"] = rate(lambda i: cache.incr("n"))

        def transact(i: int) -> None:
            with cache.transact():
                cache.set("v", cache.get("v", 0) + 1)

        out["versioned write ops/s"] = rate(transact)
    return out


def ops_role(kind: str, target: str, count: int) -> None:
    """Run the one-process workload, print its rates."""
    if kind == "ivip":
        result = asyncio.run(_ivip_ops(target, count))
    elif kind == "redis-py":
        result = asyncio.run(_redis_py_ops(target, count))
    else:
        result = _diskcache_ops(target, count)
    emit(result)


async def _contended_async(kind: str, target: str, count: int) -> tuple[float, int]:
    if kind == "ivip":
        from ivip_ipc_async import AsyncCache

        ipc = open_ipc(target)
        await ipc.start()
        cache: AsyncCache[Any] = AsyncCache(ipc, default_ttl=0)
        await cache.incr("warm")

        async def incr() -> int:
            return await cache.incr("n")

        async def close() -> None:
            await ipc.destroy()
    else:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS)
        await client.incr(f"bench-{target}:warm")

        async def incr() -> int:
            return int(await client.incr(f"bench-{target}:n"))

        async def close() -> None:
            await client.aclose()

    emit("ready")
    await asyncio.to_thread(wait_go)
    t = _N()
    last = 0
    for _ in range(count):
        last = await incr()
    spent = _N() - t
    await close()
    return spent, last


def contended_role(kind: str, target: str, count: int) -> None:
    """Print `ready`, wait for `go`, increment one key `count` times, print the time."""
    if kind == "diskcache":
        import diskcache

        with diskcache.Cache(target) as cache:
            cache.incr("warm")
            emit("ready")
            wait_go()
            t = _N()
            last = 0
            for _ in range(count):
                last = cache.incr("n")
            spent = _N() - t
    else:
        spent, last = asyncio.run(_contended_async(kind, target, count))
    emit({"seconds": spent, "last": last})


# -- the scenarios -------------------------------------------------------------------------


def _final_count(kind: str, target: str) -> int:
    if kind == "diskcache":
        import diskcache

        with diskcache.Cache(target) as cache:
            return int(cache.get("n", 0))
    if kind == "redis-py":
        import redis

        client = redis.Redis.from_url(REDIS)
        value = int(client.get(f"bench-{target}:n") or 0)
        client.close()
        return value

    async def read() -> int:
        from ivip_ipc_async import AsyncCache

        ipc = open_ipc(target)
        async with ipc:
            return int(await AsyncCache(ipc).get("n", 0))

    return asyncio.run(read())


def cache(size: Size, codec: str) -> Result:
    """Cache: get/set ops/s in one process, and set-to-visible latency across two."""
    out: Result = {}
    with scratch_dir() as d, workers() as started:
        started.append(Worker(ivip_get_set, d, size.cache_ops, codec))
        out["ivip-ipc-async"] = started[-1].line()
    with scratch_dir() as d, workers() as started:
        started.append(Worker(diskcache_get_set, d, size.cache_ops // 4))
        out["diskcache"] = started[-1].line()
    if redis_available():
        with workers() as started:
            started.append(
                Worker(redis_get_set, size.cache_ops // 20, f"bench:{uuid.uuid4().hex}:k")
            )
            out["redis GET/SET"] = started[-1].line()
    kinds = ["ivip", "diskcache"] + (["redis"] if redis_available() else [])
    names = {"ivip": "ivip-ipc-async", "diskcache": "diskcache", "redis": "redis GET/SET"}
    for kind in kinds:
        with scratch_dir() as d:
            n = size.visible_writes
            got, _ = fan([(visible_reader, (kind, d, n))], [(visible_writer, (kind, d, n, 0.005))])
            lat = latency_summary(got[0]["latencies_ns"])
            out[names[kind]].update({f"visible {k} ms": v for k, v in lat.items()})
    return out


def cache_ops(size: Size, codec: str) -> Result:
    """One process's ops/s per operation, and incr contended by 4 processes."""
    count, each = (500, 500) if size.quick else (2000, 2000)
    contenders: list[tuple[str, str, str]] = [("ivip-ipc-async (directory)", "ivip", "dir")]
    if redis_available():
        contenders += [
            ("ivip-ipc-async (Redis)", "ivip", "redis"),
            ("redis-py (Redis commands)", "redis-py", "redis"),
        ]
    contenders.append(("diskcache", "diskcache", "dir"))
    out: Result = {}
    for label, kind, medium in contenders:
        row: dict[str, float] = {}
        for part in ("ops", "contended"):
            with scratch_dir() as d:
                target, namespace = contender_target(kind, medium, d)
                if part == "ops":
                    with workers() as started:
                        started.append(Worker(ops_role, kind, target, count))
                        row.update(started[0].line(timeout=600))
                else:
                    got = together([(contended_role, (kind, target, each))] * PROCESSES, 600)
                    busy = max(r["seconds"] for r in got)
                    row["incr x4 /s"] = PROCESSES * each / busy
                    row["exact"] = float(_final_count(kind, target) == PROCESSES * each)
                if medium == "redis":
                    drop_redis(namespace)
        out[label] = row
    return out


SCENARIOS = {"cache": cache, "cache_ops": cache_ops}

# -- the page ------------------------------------------------------------------------------

TITLES = {"cache": "Cache", "cache_ops": "Cache operations"}
WORKLOADS = {
    "cache": (
        "`get` and `set` of one key holding a small dict, in one process, awaited one at a "
        "time (ivip-ipc-async: `await cache.get`, a fresh copy each time; diskcache: "
        "`Cache.get`, sync; Redis: `GET` + `json.loads` through redis-py asyncio). "
        "`visible`: a writer process sets the key every 5 ms (200 times) with its send "
        "time; a reader process polls `get` and records when each new value shows."
    ),
    "cache_ops": (
        "one process, each call awaited one after the other (`ops/s`; `keys/s` for the "
        f"bulk calls, {BULK} keys a call): `set` (the plain write, for scale); `add` of "
        "new keys (each wins) and of a key that exists (each loses); `incr` of one key; "
        "a versioned write (`get_with_version`, then `set(..., if_version=...)`, "
        f"succeeding); `get_many`, `set_many` and `delete_many` of {BULK} keys, and "
        f"`delete_prefix` matching {BULK} keys. ivip-ipc-async on a directory in /dev/shm "
        "and on Redis; redis-py (asyncio, awaited): `SET`, `SET NX`, `INCR`, `MGET`, a "
        "pipeline of `SET`s, `DEL` of many keys; diskcache (sync): `set`, `add`, `incr`, "
        "`transact` of a get and a set. `incr x4 /s`: 4 processes increment one key at "
        "once (2,000 times each, awaited one after the other), increments per second of "
        "all four together; `exact`: 1 when the final count was 4 x 2,000."
    ),
}
HOW_TO_READ_OPS = (
    "How to read it: a conditional write (`add`, `incr`, the versioned write) on the "
    "directory is a lock round on `locks/c.NN` and a barrier (a listing of `log/` and "
    "a read of every writer) besides the write, so it runs at a fraction of a plain "
    "`set`; contended by 4 processes it goes at the lock's handoff rate (a wake-up by "
    "inotify per handoff: see the Locks table), where diskcache's `incr` is one SQLite "
    "transaction. On Redis a conditional write is one script round trip, as a `set` "
    "is; `incr x4` is bounded by each process's round trips, as with `INCR`. "
    "`get_many` reads the mirror: no round trip on either backend. Every run counted "
    "exactly (`exact` 1). The spread (min-max under each median) is wide: the machine "
    "was shared with other work during these runs."
)


def sections(results: Aggregated, repeats: int) -> Sections:
    out: Sections = {}
    if results.get("cache"):
        out[TITLES["cache"]] = [
            rerun("cache"),
            "",
            f"Workload: {WORKLOADS['cache']}",
            "",
            table(results["cache"], repeats),
            "",
        ]
    if results.get("cache_ops"):
        out[TITLES["cache_ops"]] = [
            "`add`, `incr`, the versioned write and the bulk operations (docs/api.md, "
            '"Atomic operations"). ' + rerun("cache"),
            "",
            f"Workload: {WORKLOADS['cache_ops']}",
            "",
            HOW_TO_READ_OPS,
            "",
            table(results["cache_ops"], repeats),
            "",
        ]
    return out


if __name__ == "__main__":
    sys.exit(alone("python -m benchmarks.cache", SCENARIOS, sections))
