"""Cache operation benchmarks: add, incr, versioned writes, bulk operations.

    python -m benchmarks.cache_ops [--repeat 3] [--quick] [--publish]

runs only this scenario and prints it; with `--publish` (or `--out PATH`) it
rewrites only the "Cache operations" section of docs/benchmarks.md (the full
suite, `python -m benchmarks`, runs it too).

* `cache_ops`: each operation awaited one after the other in one process
  (ops/s; keys/s for the bulk operations), on the directory and on Redis,
  beside diskcache's and redis-py's own; and `incr` of one key by 4 processes
  at once (increments/s of all four, and whether the count came out exact),
  beside redis-py's `INCR` and diskcache's `incr`.

Worker roles run as `python -m benchmarks.workers ROLE ...` (see `run_role`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from .harness import ROOT, Worker, median_of, redis_available, scratch_dir, workers

REDIS = "redis://127.0.0.1:6379/0"
BULK = 100  # keys per bulk call
PROCESSES = 4

WORKLOADS = {
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

_N = time.perf_counter


async def _rate(count: int, call: Callable[[int], Awaitable[Any]], per: int = 1) -> float:
    await call(-1)  # warm: connections made, scripts loaded, files open
    t = _N()
    for i in range(count):
        await call(i)
    return count * per / (_N() - t)


async def _ivip_ops(target: str, count: int) -> dict[str, float]:
    from ivip_ipc_async import AsyncCache, AsyncIPC

    if target.startswith("redis://"):
        url, _, namespace = target.partition("#")
        ipc = AsyncIPC(url, namespace=namespace)
    else:
        ipc = AsyncIPC(target)
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
    print(json.dumps(result), flush=True)


async def _contended_async(kind: str, target: str, count: int) -> tuple[float, int]:
    if kind == "ivip":
        from ivip_ipc_async import AsyncCache, AsyncIPC

        if target.startswith("redis://"):
            url, _, namespace = target.partition("#")
            ipc = AsyncIPC(url, namespace=namespace)
        else:
            ipc = AsyncIPC(target)
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

    print(json.dumps("ready"), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
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
            print(json.dumps("ready"), flush=True)
            sys.stdin.readline()
            t = _N()
            last = 0
            for _ in range(count):
                last = cache.incr("n")
            spent = _N() - t
    else:
        spent, last = asyncio.run(_contended_async(kind, target, count))
    print(json.dumps({"seconds": spent, "last": last}), flush=True)


def run_role(role: str, args: list[str]) -> bool:
    """The roles of this module, for `benchmarks.workers`; False if `role` is not one."""
    if role == "cache-ops":
        ops_role(args[0], args[1], int(args[2]))
    elif role == "incr-contended":
        contended_role(args[0], args[1], int(args[2]))
    else:
        return False
    return True


# -- the scenario -----------------------------------------------------------------------------


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
        from ivip_ipc_async import AsyncCache, AsyncIPC

        if target.startswith("redis://"):
            url, _, namespace = target.partition("#")
            ipc = AsyncIPC(url, namespace=namespace)
        else:
            ipc = AsyncIPC(target)
        async with ipc:
            return int(await AsyncCache(ipc).get("n", 0))

    return asyncio.run(read())


def cache_ops(size: Any = None, codec: str = "json") -> dict[str, dict[str, float]]:
    """One process's ops/s per operation, and incr contended by 4 processes."""
    quick = getattr(size, "throughput_messages", 100_000) < 100_000
    count, each = (500, 500) if quick else (2000, 2000)
    contenders: list[tuple[str, str, str]] = [("ivip-ipc-async (directory)", "ivip", "dir")]
    if redis_available():
        contenders += [
            ("ivip-ipc-async (Redis)", "ivip", "redis"),
            ("redis-py (Redis commands)", "redis-py", "redis"),
        ]
    contenders.append(("diskcache", "diskcache", "dir"))
    out: dict[str, dict[str, float]] = {}
    for label, kind, medium in contenders:
        row: dict[str, float] = {}
        for part in ("ops", "contended"):
            with scratch_dir() as d:
                namespace = f"bench-{uuid.uuid4().hex[:8]}"
                if medium == "dir":
                    target = d
                elif kind == "ivip":
                    target = f"{REDIS}#{namespace}"
                else:
                    target = namespace
                with workers() as started:
                    if part == "ops":
                        started.append(Worker("cache-ops", kind, target, count))
                        row.update(started[0].line(timeout=600))
                        continue
                    for _ in range(PROCESSES):
                        started.append(Worker("incr-contended", kind, target, each))
                    for w in started:
                        assert w.line(timeout=60) == "ready"
                    for w in started:
                        w.go()
                    got = [w.line(timeout=600) for w in started]
                busy = max(r["seconds"] for r in got)
                row["incr x4 /s"] = PROCESSES * each / busy
                row["exact"] = float(_final_count(kind, target) == PROCESSES * each)
                if medium == "redis":
                    _drop_redis(namespace)
        out[label] = row
    return out


def _drop_redis(namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS)
    for pattern in (f"ivip:{{{namespace}}}:*", f"bench-{namespace}*"):
        keys = client.keys(pattern)
        if keys:
            client.delete(*keys)
    client.close()


SCENARIOS = {"cache_ops": cache_ops}

# -- the page ------------------------------------------------------------------------------


def section(results: dict[str, Any], repeats: int) -> list[str]:
    """The "Cache operations" section of the benchmark page, from aggregated results."""
    from .report import table

    if not results.get("cache_ops"):
        return []
    return [
        "## Cache operations",
        "",
        "`add`, `incr`, the versioned write and the bulk operations (docs/api.md, "
        '"Atomic operations"), run alone by '
        f"`python -m benchmarks.cache_ops --repeat {repeats}` (or with the full suite).",
        "",
        f"Workload: {WORKLOADS['cache_ops']}",
        "",
        "How to read it: a conditional write (`add`, `incr`, the versioned write) on the "
        "directory is a lock round on `locks/c.NN` and a barrier (a listing of `log/` and "
        "a read of every writer) besides the write, so it runs at a fraction of a plain "
        "`set`; contended by 4 processes it goes at the lock's handoff rate (a wake-up by "
        "inotify per handoff: see the Locks table), where diskcache's `incr` is one SQLite "
        "transaction. On Redis a conditional write is one script round trip, as a `set` "
        "is; `incr x4` is bounded by each process's round trips, as with `INCR`. "
        "`get_many` reads the mirror: no round trip on either backend. Every run counted "
        "exactly (`exact` 1). The spread (min-max under each median) is wide: the machine "
        "was shared with other work during these runs.",
        "",
        table(results["cache_ops"], repeats),
        "",
    ]


def replace_section(page: str, new: list[str]) -> str:
    """`page` with its "## Cache operations" section replaced by `new` (appended if absent)."""
    import re

    text = "\n".join(new)
    match = re.search(r"^## Cache operations\n.*?(?=^## |\Z)", page, flags=re.S | re.M)
    if match:
        return page[: match.start()] + text + "\n" + page[match.end() :]
    return page.rstrip("\n") + "\n\n" + text + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache_ops")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="rewrite the Cache operations section of this page")
    parser.add_argument("--publish", action="store_true", help="rewrite it in docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.publish:
        args.out = os.path.join(ROOT, "docs", "benchmarks.md")
    from .scenarios import QUICK, Size

    size = QUICK if args.quick else Size()
    raw: dict[str, list[dict[str, dict[str, float]]]] = {}
    for name, scenario in SCENARIOS.items():
        for run in range(args.repeat):
            print(f"{name} {run + 1}/{args.repeat}", flush=True)
            raw.setdefault(name, []).append(scenario(size))
    aggregated = {
        name: {c: median_of([r[c] for r in runs if c in r]) for c in runs[0]}
        for name, runs in raw.items()
    }
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(ROOT, "benchmarks", "results", f"cache-ops-{stamp}.json"), "w") as f:
        json.dump({"command": "python -m benchmarks.cache_ops", "raw": raw}, f)
    if args.out is not None:
        with open(args.out) as f:
            page = f.read()
        with open(args.out, "w") as f:
            f.write(replace_section(page, section(aggregated, args.repeat)))
    for name, rows in aggregated.items():
        print(f"\n{name}")
        for contender, metrics in rows.items():
            shown = ", ".join(f"{k} {v[0]:.4g}" for k, v in metrics.items())
            print(f"  {contender}: {shown}")
    if args.out is None:
        print("\npage not written (--publish rewrites docs/benchmarks.md's section)")
    else:
        print(f"\nwrote the Cache operations section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
