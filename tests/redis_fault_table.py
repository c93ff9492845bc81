"""Measure the Redis fault table of docs/scaling.md (issue 11), on whatever
`ivip_ipc_async` is importable: run it on two checkouts to compare.

    python -m tests.redis_fault_table            # needs redis-server on PATH

On an older checkout, copy this file and tests/redis_server.py into its tests/.

Each fault runs on a private `redis-server` on a free port (never the shared
one), and prints one line: the fault, what the writer saw, what readers saw,
what was lost, and how long recovery took.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.backends.redis import RedisBackend
from ivip_ipc_async.ipc import GAP_EVENT

from .redis_server import Relay, Server, entry_keys

logging.disable(logging.CRITICAL)
OPTIONS = set(inspect.signature(RedisBackend.__init__).parameters)


def opts(**kwargs: Any) -> dict[str, Any]:
    """Only the options this version of the backend has."""
    return {k: v for k, v in kwargs.items() if k in OPTIONS or k == "protocol"}


async def wait(predicate: Callable[[], Any], timeout: float) -> float | None:
    """Seconds until `predicate()` held, or None if it never did within `timeout`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout:
            return None
        await asyncio.sleep(0.01)
    return loop.time() - start


def secs(value: float | None, never: str = "never (10 s)") -> str:
    return never if value is None else f"{value:.2f} s"


def keys(ipc: AsyncIPC) -> set[Any]:
    return set(ipc.mirror.live_keys("default"))


async def oom() -> str:
    server = Server("--maxmemory-policy", "noeviction")
    server.start()
    try:
        admin = server.admin()
        async with (
            AsyncIPC(server.url, namespace="t") as w,
            AsyncIPC(server.url, namespace="t") as r,
        ):
            admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + (1 << 20))
            results = await asyncio.gather(
                *(AsyncCache(w).set(f"k{i}", "x" * 20_000, 0) for i in range(200)),
                return_exceptions=True,
            )
            stored = entry_keys(admin, "t")
            await wait(lambda: keys(r) == stored, 3)
            raised = sum(r is not None for r in results)
            kind = {type(r).__name__ for r in results if r is not None}
            return (
                f"maxmemory mid-burst | 200 concurrent set: {raised} raised {sorted(kind)}, "
                f"{200 - raised} returned | reader holds {len(keys(r))} | Redis holds "
                f"{len(stored)}, writer's mirror {len(keys(w))} of them | -"
            )
    finally:
        server.close()


async def frozen() -> str:
    server = Server()
    server.start()
    try:
        async with (
            AsyncIPC(server.url, namespace="t", retry_timeout=1) as w,
            AsyncIPC(server.url, namespace="t") as r,
        ):
            await AsyncCache(w).set("warm", 1, 0)
            server.freeze()
            loop = asyncio.get_running_loop()
            start = loop.time()
            try:
                await AsyncCache(w).set("x", 1, 0)
                saw = "returned"
            except Exception as exc:
                saw = f"{type(exc).__name__} after {loop.time() - start:.1f} s"
            await asyncio.sleep(max(0.0, 3 - (loop.time() - start)))
            server.thaw()
            reader = await wait(lambda: "x" in keys(r), 10)
            writer = await wait(lambda: "x" in keys(w), 10)
            return (
                f"server frozen 3 s during set('x') (retry_timeout 1 s) | {saw} | reader has x "
                f"after {secs(reader)} | writer's mirror: x after {secs(writer)} | -"
            )
    finally:
        server.close()


async def flushall() -> str:
    server = Server()
    server.start()
    try:
        o = opts(state_check_interval=2.0)
        async with AsyncIPC(server.url, namespace="t", **o) as a:
            gaps: list[Any] = []
            a.on(GAP_EVENT, gaps.append)
            for i in range(10):
                await AsyncCache(a).set(i, i, 0)
            server.admin().flushall()
            seen = await wait(lambda: gaps and a.medium.mirror_current, 10)
            return (
                f"FLUSHALL | - | gap {gaps[:1] or 'none'} after {secs(seen)}; mirror "
                f"{len(keys(a))} entries (Redis 0); healthy={a.health()['healthy']} | "
                f"10 entries (Redis's) | {secs(seen)}"
            )
    finally:
        server.close()


async def evicted() -> str:
    server = Server("--maxmemory-policy", "allkeys-lru")
    server.start()
    try:
        async with AsyncIPC(server.url, namespace="t", **opts(state_check_interval=2.0)) as a:
            gaps: list[Any] = []
            a.on(GAP_EVENT, gaps.append)
            for i in range(50):
                await AsyncCache(a).set(i, "v" * 10_000, 0)
            admin = server.admin()
            admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + (256 << 10))
            for i in range(400):
                admin.set(f"other:{i}", "o" * 10_000)
            seen = await wait(lambda: gaps and a.medium.mirror_current, 10)
            left = entry_keys(admin, "t")
            return (
                f"allkeys-lru eviction by another app | - | gap after {secs(seen)}; mirror "
                f"{len(keys(a))} entries, Redis {len(left)} | {50 - len(left)} entries "
                f"(evicted) | {secs(seen)}"
            )
    finally:
        server.close()


async def restart(aof: bool) -> str:
    server = Server(*(("--appendonly", "yes", "--appendfsync", "always") if aof else ()))
    server.start()
    try:
        async with (
            AsyncIPC(server.url, namespace="t") as a,
            AsyncIPC(server.url, namespace="t") as b,
        ):
            b.unhealthy_after_gap = 5.0  # (an attribute only the new code reads)
            gaps: list[Any] = []
            b.on(GAP_EVENT, gaps.append)
            await AsyncCache(a).set("k", 1, 0)
            await wait(lambda: "k" in keys(b), 3)
            server.stop()
            await wait(lambda: not b.stats()["connected"], 5)
            server.start()
            back = await wait(lambda: b.stats()["connected"] and b.medium.mirror_current, 15)
            healthy_at_once = b.health()["healthy"]
            healthy = await wait(lambda: b.health()["healthy"], 8)
            what = "AOF fsync always" if aof else "no persistence"
            return (
                f"restart, {what} | - | gaps {gaps}; reconnected after {secs(back)}; healthy "
                f"then: {healthy_at_once}, healthy again after {secs(healthy, 'never (8 s)')} | "
                f"{'nothing' if aof else 'everything (Redis lost it)'} | {secs(back)}"
            )
    finally:
        server.close()


async def outage() -> str:
    server = Server()
    server.start()
    relay = Relay("127.0.0.1", server.port)
    port = await relay.start()
    try:
        url = f"redis://127.0.0.1:{port}/0"
        async with AsyncIPC(url, namespace="t", **opts(read_timeout=5.0)) as a:
            cache = AsyncCache(a)
            await cache.set("k", 1, 0)
            relay.cut()
            await wait(lambda: not a.stats()["connected"], 5)
            answers = []
            loop = asyncio.get_running_loop()
            calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("get", lambda: cache.get("k")),
                ("has", lambda: cache.has("k")),
                ("keys", cache.keys),
            ]
            for name, call in calls:
                start = loop.time()
                try:
                    answer = repr(await call())
                except Exception as exc:
                    answer = type(exc).__name__
                answers.append(f"{name} {answer} in {loop.time() - start:.2f} s")
            try:
                answers.append(f"len {len(cache)}")
            except Exception as exc:
                answers.append(f"len {type(exc).__name__}")
            relay.restore()
            # 200 concurrent gets during a 1 s outage: connections of this instance.
            await wait(lambda: a.stats()["connected"] and a.medium.mirror_current, 15)
            relay.cut()
            await wait(lambda: not a.stats()["connected"], 5)
            gets = [asyncio.create_task(cache.get("k")) for _ in range(200)]
            await asyncio.sleep(1)
            relay.restore()
            admin = server.admin()
            mine = f"ivip:t:{a.stats()['peer']}:"

            def count() -> int:
                return sum(1 for c in admin.client_list() if c.get("name", "").startswith(mine))

            most = 0
            while not all(g.done() for g in gets):
                most = max(most, count())
                await asyncio.sleep(0.01)
            await asyncio.gather(*gets, return_exceptions=True)
            most = max(most, count())
            await asyncio.sleep(3)
            return (
                f"outage (connection cut) | - | {'; '.join(answers)} | - | - \n"
                f"200 concurrent get in a 1 s outage | - | at most {most} connections, "
                f"{count()} 3 s later | - | -"
            )
    finally:
        await relay.close()
        server.close()


async def leftovers() -> str:
    server = Server()
    server.start()
    try:
        async with AsyncIPC(server.url, namespace="t", **opts(state_ttl=2.0)) as a:
            for _ in range(200):
                await a.notify("n", "x" * 1000)
            for _ in range(5):
                await a.notify("big", "y" * (15 << 20))
            admin = server.admin()
            usage = admin.memory_usage("ivip:{t}:log", samples=0) or 0
        await asyncio.sleep(3)
        left = sorted(k.decode() for k in admin.keys("ivip:{t}:*"))
        return (
            f"5 x 15 MiB messages; then every process gone | - | stream {usage / 2**20:.0f} MiB "
            f"in Redis | - | keys left 3 s after the last process: {left}"
        )
    finally:
        server.close()


async def main() -> None:
    import ivip_ipc_async

    print(f"# {ivip_ipc_async.__file__} at {time.strftime('%H:%M:%S')}")
    print("fault | writer sees | readers see | lost | recovery")
    for scenario in (
        oom(),
        frozen(),
        flushall(),
        evicted(),
        restart(True),
        restart(False),
        outage(),
        leftovers(),
    ):
        try:
            print(await scenario, flush=True)
        except Exception as exc:
            print(f"(failed: {type(exc).__name__}: {exc})", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
