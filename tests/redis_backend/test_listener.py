"""The listener (backends/redis/listener.py, delivery.py): pushes and the
catch-up never deliver twice, stray messages on the channel, connections cut
mid-stream or reopened behind its back, silent connections found by a PING,
redis-py's health checks kept off the subscription, a prompt close.

The faults are real: `CLIENT KILL` of this test's own connections (found by
their names, `ivip:<namespace>:<peer>:<role>`, so other users of the server are
left alone), and a TCP relay between an instance and Redis that the test cuts
(every connection dropped, new ones refused) and restores.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC

from ..redis_server import Relay
from ..test_backends import REDIS_URL, needs_redis
from .support import (
    _kill_clients,
    _kill_listener,
)

pytestmark = needs_redis


@pytest.mark.parametrize("protocol", [2, 3])
async def test_redis_py_health_checks_never_eat_a_push(
    namespace: str, protocol: int, until: Any
) -> None:
    """redis-py's own health check (PING, read the answer) on the subscribed
    connection would throw a push away (RESP3) or fail on it (RESP2): the
    listener turns it off on its connection, and PINGs itself."""
    # Checks due at every command of the 30 ms silences below. Not smaller: redis-py
    # 8 checks health between the commands it pipelines while connecting (CLIENT
    # SETINFO), and a check due there reads their answer as the PING's (seen with
    # 1 ms on a loaded machine: "unknown subcommand 'SETINFO'" on Redis 7.0).
    options = {"protocol": protocol, "health_check_interval": 0.02}
    async with (
        AsyncIPC(REDIS_URL, namespace=namespace, **options) as writer,
        AsyncIPC(REDIS_URL, namespace=namespace, ping_interval=0.02, **options) as reader,
    ):
        got: list[int] = []
        reader.on("n", got.append)
        for i in range(150):
            await writer.notify("n", i)
            if i % 5 == 0:
                await asyncio.sleep(0.03)  # silences in which the listener PINGs
        await until(lambda: len(got) == 150)
        assert got == list(range(150))
        assert reader.stats()["reconnects"] == reader.stats()["gaps"] == 0


async def test_a_stray_publish_on_the_channel_is_skipped(namespace: str, until: Any) -> None:
    """Someone else PUBLISHes on the library's channel: counted as garbage, and it
    moves nothing (a reconnection afterwards catches up from the right place)."""
    import redis.asyncio as aioredis

    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as writer,
        AsyncIPC(REDIS_URL, namespace=namespace) as reader,
    ):
        got: list[int] = []
        reader.on("n", got.append)
        admin = aioredis.Redis.from_url(REDIS_URL)
        channel = f"ivip:{{{namespace}}}:live"
        for junk in (b"hello world", b"1-1 not a frame", b"no-id-at-all"):
            assert await admin.publish(channel, junk) == 2  # both instances hear it
        await writer.notify("n", 1)
        await until(lambda: got == [1])
        assert reader.stats()["garbage_bytes"] > 0
        await admin.aclose()
        await _kill_listener(reader)
        await until(lambda: reader.stats()["reconnects"] == 1)
        await writer.notify("n", 2)
        await until(lambda: got == [1, 2])
        assert reader.stats()["gaps"] == reader.stats()["task_failures"] == 0


async def test_what_the_catch_up_reads_is_not_delivered_again_by_a_push(
    namespace: str, until: Any
) -> None:
    """Records stored between the listener's SUBSCRIBE and its catch-up read come
    both ways: read from the stream and pushed. Each is delivered once, in order,
    without even reaching the sequence-number check (`duplicates_dropped`)."""

    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as writer,
        AsyncIPC(REDIS_URL, namespace=namespace) as reader,
    ):
        got: list[int] = []
        reader.on("n", got.append)
        for i in range(10):
            await writer.notify("n", i)
        await until(lambda: got == list(range(10)))

        backend: Any = reader.medium.backend.listener
        catch_up = backend._checked_read
        armed = True

        async def written_while_catching_up(frame_reader: Any) -> bool:
            nonlocal armed
            if armed:  # subscribed already: these are pushed, and in the stream
                armed = False
                for i in range(10, 20):
                    await writer.notify("n", i)
            return bool(await catch_up(frame_reader))

        backend._checked_read = written_while_catching_up
        await _kill_listener(reader)
        await until(lambda: got == list(range(20)) and reader.stats()["connected"])
        await writer.notify("n", 20)
        await until(lambda: got[-1:] == [20])
        assert got == list(range(21))
        assert not armed  # the catch-up did run while the records were written
        assert reader.stats()["duplicates_dropped"] == 0


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
                await sender.notify("n", i)  # a cut connection is retried, not raised
                acked.append(i)
                if i % 100 == 0:
                    await cache.set("progress", i, 0)
                    await asyncio.sleep(0)

        task = asyncio.create_task(send())
        await until(lambda: len(acked) > 500)
        killed = await _kill_clients(namespace)  # every connection, the listeners' included
        assert len(acked) < 3000, "the connections were cut after the traffic, not during"
        assert f"ivip:{namespace}:{receiver.stats()['peer']}:r" in killed
        assert f"ivip:{namespace}:{sender.stats()['peer']}:r" in killed
        await task
        assert acked == list(range(3000))
        await until(lambda: len(got) >= 3000, timeout=20)
        assert got == list(range(3000))  # nothing lost, nothing twice, in order
        await until(lambda: receiver.stats()["connected"] and receiver.medium.mirror_current)
        assert receiver.stats()["reconnects"] >= 1
        assert await AsyncCache(receiver).get("progress") == 2900
        assert receiver.health()["healthy"] is True


async def test_a_reconnection_behind_the_listeners_back_is_noticed(
    namespace: str, until: Any
) -> None:
    """Its connections killed between two reads (redis-py may reopen one without an
    error, or fail the next read): the listener notices, and resynchronises."""
    import redis

    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as a,
        AsyncIPC(REDIS_URL, namespace=namespace) as b,
    ):
        peer = f"ivip:{namespace}:{b.stats()['peer']}"
        listener = {f"{peer}:r", f"{peer}:c"}  # its subscription, and its requests
        got: list[int] = []

        def kill_my_listener(message: int) -> None:
            got.append(message)
            if message == 1:  # runs inside the listener, between two of its reads
                admin = redis.Redis.from_url(REDIS_URL)
                ids = [c["id"] for c in admin.client_list() if c.get("name") in listener]
                assert len(ids) == 2
                for client_id in ids:
                    assert admin.execute_command("CLIENT", "KILL", "ID", client_id) == 1
                admin.close()

        b.on("n", kill_my_listener)
        await a.notify("n", 1)
        await until(lambda: b.stats()["reconnects"] >= 1)
        await a.notify("n", 2)
        await until(lambda: got == [1, 2])
        assert b.stats()["connected"] is True
        assert b.medium.mirror_current


async def test_a_silent_connection_is_found_by_a_ping(
    namespace: str, relay: tuple[Relay, str], until: Any
) -> None:
    """Redis stops answering the listener without closing anything (a half-open
    connection): after `ping_interval` of silence it PINGs, no answer comes, and
    it reconnects, then catches up on what was sent meanwhile."""
    cut, via_relay = relay
    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as writer,
        AsyncIPC(via_relay, namespace=namespace, ping_interval=0.2, retry_timeout=1) as reader,
    ):
        got: list[int] = []
        reader.on("n", got.append)
        await writer.notify("n", 1)
        await until(lambda: got == [1])
        cut.drop_replies = True  # requests still reach Redis; nothing comes back
        await writer.notify("n", 2)
        await until(lambda: not reader.stats()["connected"], timeout=5)
        assert got == [1]
        assert reader.stats()["connection_errors"] >= 1
        cut.cut()  # the stalled connections go; new ones work again
        cut.restore()
        await until(lambda: got == [1, 2], timeout=10)
        await until(lambda: reader.stats()["connected"])


async def test_destroy_is_prompt_even_as_a_read_completes(namespace: str) -> None:
    """The listener is cancelled until it ends, even when redis-py swallows one
    cancellation (a read with a socket timeout completing at that moment)."""
    loop = asyncio.get_running_loop()
    for i in range(60):
        ipc = await AsyncIPC(REDIS_URL, namespace=namespace).start()
        await ipc.notify("n", i)  # its own listener's read returns (its own push) ...
        await asyncio.sleep(i % 10 * 0.0001)  # ... and is at one of several steps after that
        started = loop.time()
        await ipc.destroy()
        assert loop.time() - started < 2
