"""Redis-specific behaviour: URL selection, protocols, connections cut mid-stream, gaps."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC

from .test_backends import REDIS_URL, needs_redis

pytestmark = needs_redis


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    keys = await client.keys(f"ivip:{{{ns}}}:*")
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def _kill_clients(name_hint: str | None = None) -> int:
    """CLIENT KILL every normal connection except the one doing the killing."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(REDIS_URL)
    killed = 0
    me = await admin.client_id()
    for client in await admin.client_list():
        if int(client["id"]) != me and client.get("flags") != "S":
            killed += await admin.execute_command("CLIENT", "KILL", "ID", client["id"])
    await admin.aclose()
    return killed


async def test_url_selects_the_redis_backend(namespace: str) -> None:
    async with AsyncIPC(REDIS_URL, namespace=namespace) as ipc:
        stats = ipc.stats()
        assert stats["backend"] == "redis"
        assert stats["connected"] is True
        assert ipc.health()["healthy"] is True


@pytest.mark.parametrize("protocol", [2, 3])
async def test_resp2_and_resp3(namespace: str, protocol: int, until: Any) -> None:
    async with (
        AsyncIPC(REDIS_URL, namespace=namespace, protocol=protocol) as a,
        AsyncIPC(REDIS_URL, namespace=namespace, protocol=protocol) as b,
    ):
        got: list[Any] = []
        b.on("e", got.append)
        await a.notify("e", {"p": protocol})
        await AsyncCache(a).set("k", protocol)
        await until(lambda: got == [{"p": protocol}])
        await until(lambda: len(AsyncCache(b)) == 1)
        assert await AsyncCache(b).get("k") == protocol


async def test_connection_cut_mid_stream_loses_nothing_and_reconnects(
    namespace: str, until: Any
) -> None:
    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as sender,
        AsyncIPC(REDIS_URL, namespace=namespace) as receiver,
    ):
        got: list[int] = []
        receiver.on("n", got.append)
        cache = AsyncCache(sender)
        acked: list[int] = []

        async def send() -> None:
            for i in range(3000):
                try:
                    await sender.notify("n", i)
                except ConnectionError:
                    continue  # not acknowledged: the caller knows
                acked.append(i)
                if i % 100 == 0:
                    await cache.set("progress", i, 0)
                    await asyncio.sleep(0)

        task = asyncio.create_task(send())
        await until(lambda: len(acked) > 500)
        assert await _kill_clients() >= 2  # every connection, the listeners' included
        await task
        await until(lambda: set(acked) <= set(got), timeout=20)
        assert got == sorted(got)
        await until(lambda: receiver.stats()["connected"])
        assert receiver.stats()["reconnects"] >= 1
        reader = AsyncCache(receiver)
        await until(lambda: receiver._mirror_ready)
        assert await reader.get("progress") == 2900
        assert receiver.health()["healthy"] is True


async def test_reads_go_to_redis_while_the_mirror_is_rebuilt(namespace: str) -> None:
    async with AsyncIPC(REDIS_URL, namespace=namespace) as ipc:
        cache = AsyncCache(ipc)
        await cache.set("k", {"v": 1}, 0)
        ipc._sink.mirror_ready(False)  # what a lost connection does
        assert ipc.mirror.lookup("default", "k") is None  # the mirror was dropped
        assert await cache.get("k") == {"v": 1}  # ... and the read went to Redis
        assert await cache.has("k") is True
        assert await cache.get("missing", 0) == 0
        ipc._sink.mirror_ready(True)


async def test_a_gap_after_trimming_is_reported_and_the_cache_reloaded(
    namespace: str, until: Any
) -> None:
    import redis.asyncio as aioredis

    from ivip_ipc_async.ipc import GAP_EVENT

    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as writer,
        AsyncIPC(REDIS_URL, namespace=namespace) as reader,
    ):
        gaps: list[Any] = []
        reader.on(GAP_EVENT, gaps.append)
        await AsyncCache(writer).set("kept", "yes", 0)
        await until(lambda: len(AsyncCache(reader)) == 1)
        # The reader falls behind: pretend it last read long ago, then the
        # stream is trimmed past that point and its connection drops.
        backend: Any = reader._backend
        backend._last_id = b"1-0"
        admin = aioredis.Redis.from_url(REDIS_URL)
        for i in range(20):
            await writer.notify("x", i)
        await admin.xtrim(f"ivip:{{{namespace}}}:log", maxlen=0)
        await admin.aclose()
        await _kill_clients()
        await until(lambda: reader.stats()["gaps"] >= 1, timeout=20)
        await until(lambda: gaps != [])
        await until(lambda: reader._mirror_ready)
        assert await AsyncCache(reader).get("kept") == "yes"
