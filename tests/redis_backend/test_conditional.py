"""Conditional writes on Redis (backends/redis/conditional.py, the CONDITIONAL
script) under faults: an outcome Redis never answered, scripts Redis forgot,
and what another client stored in the entry."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.conditions import Conditional, Mode
from ivip_ipc_async.errors import BackendUnavailableError
from ivip_ipc_async.records import Kind, Record, encode_key

from ..redis_server import Relay, Server
from ..test_backends import REDIS_URL, needs_redis

pytestmark = needs_redis


async def test_an_incr_run_after_its_timeout_counts_once_everywhere(
    server: Server, namespace: str, until: Any
) -> None:
    """The server is frozen while an `incr` is on the wire: the caller gets
    `BackendUnavailableError` (it may or may not have been applied) and the
    increment is not resent; Redis runs it once on resuming, and every mirror,
    the caller's included, ends up with that count."""
    async with (
        AsyncIPC(server.url, namespace=namespace, retry_timeout=1) as writer,
        AsyncIPC(server.url, namespace=namespace) as reader,
    ):
        counter = AsyncCache(writer)
        assert await counter.incr("n", 5) == 5
        server.freeze()
        try:
            with pytest.raises(BackendUnavailableError):
                await counter.incr("n")
        finally:
            server.thaw()
        await until(lambda: writer.mirror.lookup("default", "n").record.data == b"6", timeout=10)
        await until(lambda: reader.mirror.lookup("default", "n").record.data == b"6", timeout=10)
        assert await counter.incr("n") == 7  # counted once, not twice
        await until(lambda: reader.mirror.lookup("default", "n").record.data == b"7", timeout=10)


async def test_a_lost_reply_is_not_resent(relay: tuple[Relay, str], namespace: str) -> None:
    """Requests reach Redis but no answer comes back: the increment is applied
    once and the caller is told the outcome is unknown (a resend would count it
    twice)."""
    proxy, url = relay
    async with AsyncIPC(url, namespace=namespace, retry_timeout=1) as ipc:
        counter = AsyncCache(ipc)
        await counter.incr("n")
        proxy.drop_replies = True
        with pytest.raises(BackendUnavailableError):
            await counter.incr("n")
        proxy.restore()
        async with AsyncIPC(REDIS_URL, namespace=namespace) as other:
            assert await AsyncCache(other).incr("n") == 3


async def test_conditional_writes_go_on_after_redis_forgets_the_scripts(namespace: str) -> None:
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(REDIS_URL)
    async with AsyncIPC(REDIS_URL, namespace=namespace) as ipc:
        cache = AsyncCache(ipc)
        await admin.script_flush()
        assert await cache.add("k", 1)
        await admin.script_flush()
        assert await cache.incr("n") == 1
        await admin.script_flush()
        _, version = await cache.get_with_version("k")
        assert await cache.set("k", 2, if_version=version)
    await admin.aclose()


async def test_a_refusal_shows_the_winner_at_once_and_clocks_stay_ahead(
    namespace: str, until: Any
) -> None:
    """A loser's mirror gets the winner's record with the refusal; a write
    decided on a newer entry than the caller's clock knew still wins everywhere."""
    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as a,
        AsyncIPC(REDIS_URL, namespace=namespace) as b,
    ):
        ca, cb = AsyncCache(a), AsyncCache(b)
        assert await ca.add("job", "a")
        # b may not have received a's record yet; its refusal brings it.
        assert not await cb.add("job", "b")
        assert await cb.get("job") == "a"
        # A write decided on an entry whose clock is above the caller's: the
        # script raises the record's clock past it (carrying through bytes and
        # digits), so it wins in every mirror.
        held = (1 << 56) - 1  # 0x00ffffffffffffff: +1 carries through 7 bytes
        key = encode_key("n")
        await (await a.medium.started_backend()).append(
            (Record(Kind.CACHE_SET, "default", key, b"1", held, a_node(a)),)
        )
        backend = await b.medium.started_backend()
        mine = Record(Kind.CACHE_SET, "default", key, b"", 5, backend.node)
        outcome = await backend.write_if(Conditional(Mode.INCR, mine, lambda: 5, delta=1))
        assert outcome.applied
        assert outcome.record is not None
        assert (outcome.record.hlc, outcome.record.data) == (held + 1, b"2")
        import redis.asyncio as aioredis

        admin = aioredis.Redis.from_url(REDIS_URL)
        version = await admin.hget(f"ivip:{{{namespace}}}:c:default\x00".encode() + key, "v")
        await admin.aclose()
        assert version == f"{held + 1:020d}{backend.node:020d}".encode()
        await until(lambda: a.mirror.lookup("default", "n").record.data == b"2")
        await until(lambda: b.mirror.lookup("default", "n").record.data == b"2")
        assert await ca.incr("n") == 3
        await until(lambda: b.mirror.lookup("default", "n").record.data == b"3")


def a_node(ipc: AsyncIPC) -> int:
    assert ipc.medium.backend is not None
    return ipc.medium.backend.node


@pytest.mark.parametrize("codec", ["json"])
async def test_an_entry_that_is_not_an_integer_is_refused_and_kept(
    namespace: str, codec: str
) -> None:
    async with AsyncIPC(REDIS_URL, namespace=namespace, codec=codec) as ipc:
        cache = AsyncCache(ipc)
        for value in ("12", 1.5, [1], 2**60):
            await cache.set("v", value)
            with pytest.raises(TypeError):
                await cache.incr("v")
            assert await cache.get("v") == value
        await asyncio.sleep(0)


async def test_an_incr_waits_through_an_outage_before_anything_is_sent(
    relay: tuple[Relay, str], namespace: str
) -> None:
    """Redis unreachable (connections refused) when an `incr` is made: nothing
    was sent, so it is tried again until `retry_timeout`, and counts once."""
    proxy, url = relay
    async with AsyncIPC(url, namespace=namespace, retry_timeout=5) as ipc:
        counter = AsyncCache(ipc)
        assert await counter.incr("n") == 1
        proxy.cut()
        # The connections' ends seen by this process (not a sleep: a condition).
        deadline = asyncio.get_running_loop().time() + 10
        while ipc.stats()["connected"]:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.005)
        call = asyncio.ensure_future(counter.incr("n"))
        await asyncio.sleep(0.3)  # (the outage; the call is retrying meanwhile)
        assert not call.done()
        proxy.restore()
        assert await asyncio.wait_for(call, 10) == 2
        assert ipc.stats()["write_retries"] >= 1
