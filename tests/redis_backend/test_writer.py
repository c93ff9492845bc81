"""Writing (backends/redis/writer.py, scripts.py): scripts Redis forgot,
retries through an outage (never delivered twice), what close sends, cancelled
writes, refusals for memory, a write run after its timeout, the stream's bound
in bytes. Every mirror ends as Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.errors import (
    BackendFullError,
    BackendUnavailableError,
)

from ..redis_server import Relay, Server, entry_keys
from ..test_backends import REDIS_URL, needs_redis
from .support import (
    PROTOCOLS,
    _mirror_keys,
    _stream,
    needs_redis_server,
)

pytestmark = needs_redis


async def test_writes_go_on_after_redis_forgets_the_scripts(namespace: str, until: Any) -> None:
    """SCRIPT FLUSH (or a restart) between two writes: the write that meets
    NOSCRIPT loads the scripts again and is retried, alone or in a pipeline."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(REDIS_URL)
    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as a,
        AsyncIPC(REDIS_URL, namespace=namespace) as b,
    ):
        got: list[int] = []
        b.on("n", got.append)
        await admin.script_flush()
        await a.notify("n", 1)  # one write on its own
        await admin.script_flush()
        cache = AsyncCache(a)
        await asyncio.gather(cache.set("k", 1, 0), cache.set("j", 2, 0))  # one pipeline
        await until(lambda: got == [1])
        await until(lambda: len(AsyncCache(b)) == 2)
        assert [await AsyncCache(b).get(key) for key in ("k", "j")] == [1, 2]
        assert a.stats()["write_retries"] >= 2
    await admin.aclose()


async def test_writes_are_retried_through_an_outage_and_never_delivered_twice(
    namespace: str, relay: tuple[Relay, str], until: Any
) -> None:
    import redis.asyncio as aioredis

    cut, via_relay = relay
    async with (
        AsyncIPC(via_relay, namespace=namespace, retry_timeout=2.0) as sender,
        AsyncIPC(REDIS_URL, namespace=namespace) as receiver,
    ):
        got: list[int] = []
        receiver.on("n", got.append)
        await sender.notify("n", 1)

        # The record reaches Redis, its acknowledgement is lost with the connection:
        # the write is retried, so Redis stores it twice; it is delivered once.
        cut.drop_replies = True
        pending = asyncio.create_task(sender.notify("n", 2))
        await until(lambda: got == [1, 2])
        assert not pending.done()
        cut.cut()
        cut.restore()
        await pending
        assert sender.stats()["write_retries"] >= 1
        admin = aioredis.Redis.from_url(REDIS_URL)
        assert await admin.xlen(_stream(namespace)) == 3  # 1, 2, and 2 again
        await admin.aclose()

        # Redis unreachable for longer than retry_timeout: ConnectionError, in time.
        cut.cut()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectionError):
            await sender.notify("n", 3)
        assert loop.time() - started < 10
        cut.restore()
        await sender.notify("n", 4)
        await until(lambda: got == [1, 2, 4])
        assert receiver.stats()["duplicates_dropped"] == 1
        await until(lambda: sender.stats()["connected"])


async def test_destroy_sends_every_write_already_accepted(namespace: str, until: Any) -> None:
    """`destroy()` while one notify is on the wire (sent from its own task) and more
    wait behind it for the writer task: every one of them is sent, none refused."""
    async with AsyncIPC(REDIS_URL, namespace=namespace) as receiver:
        got: list[int] = []
        receiver.on("n", got.append)
        sender = await AsyncIPC(REDIS_URL, namespace=namespace).start()
        backend: Any = sender.medium.backend.writer
        send = backend._send
        calls = 0

        async def slow_after_the_first(ops: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:  # the writer task's batch: still on its way as close() runs
                await asyncio.sleep(0.2)
            return await send(ops)

        backend._send = slow_after_the_first
        tasks = [asyncio.create_task(sender.notify("n", i)) for i in range(50)]
        await asyncio.sleep(0)  # the first is on the wire, 49 are queued behind it
        await sender.destroy()
        assert calls == 2
        assert await asyncio.gather(*tasks, return_exceptions=True) == [None] * 50
        await until(lambda: got == list(range(50)))


async def test_cancelled_sets_leave_every_mirror_equal(namespace: str, until: Any) -> None:
    from ivip_ipc_async.records import encode_key

    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as a,
        AsyncIPC(REDIS_URL, namespace=namespace) as b,
    ):
        mine, theirs = AsyncCache(a), AsyncCache(b)
        backend: Any = a.medium.backend

        async def settle() -> Any:
            marker = uuid.uuid4().hex
            await mine.set("marker", marker)
            data = a.codec.dumps(marker)
            await until(
                lambda: (e := b.mirror.lookup("default", "marker")) and e.record.data == data
            )
            stored = await backend.fetch("default", encode_key("k"))
            value = await mine.get("k")
            assert await theirs.get("k") == value  # every mirror holds the same ...
            assert a.codec.loads(stored.data) == value  # ... as Redis
            return value

        # Cancelled while they wait for the writer: never sent.
        tasks = [asyncio.create_task(mine.set("k", i, 0)) for i in range(200)]
        await asyncio.sleep(0)
        for task in tasks[100:]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        acknowledged = [i for i, r in enumerate(results) if r is None]
        assert [i for i, r in enumerate(results) if isinstance(r, asyncio.CancelledError)]
        assert await settle() == acknowledged[-1]

        # Cancelled while their pipeline is on the wire: stored, so applied here too.
        on_wire = asyncio.Event()
        send = backend.writer._send

        async def send_and_signal(ops: Any) -> Any:
            on_wire.set()  # the waiting test resumes before the reply is handled
            return await send(ops)

        backend.writer._send = send_and_signal
        tasks = [asyncio.create_task(mine.set("k", i, 0)) for i in range(200, 400)]
        await asyncio.wait_for(on_wire.wait(), 10)
        backend.writer._send = send
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert await settle() == 399


@needs_redis_server
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "server",
    [
        (
            "--maxmemory-policy",
            "noeviction",
        )
    ],
    indirect=True,
    ids=["config"],
)
async def test_writes_refused_for_memory_leave_every_mirror_as_redis(
    server: Server, namespace: str, protocol: int, until: Any
) -> None:
    """`maxmemory` is reached in the middle of 200 concurrent sets (one pipeline):
    those Redis stored succeed and are applied here too, the others raise
    `BackendFullError` (redis-py's error chained); every mirror, the writer's
    included, and a late joiner hold exactly what Redis holds."""
    from redis.exceptions import OutOfMemoryError

    admin = server.admin()
    async with (
        AsyncIPC(server.url, namespace=namespace, protocol=protocol) as writer,
        AsyncIPC(server.url, namespace=namespace, protocol=protocol) as reader,
    ):
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", used + (1 << 20))  # room for about 20 of 200
        cache = AsyncCache(writer)
        results = await asyncio.gather(
            *(cache.set(f"k{i}", "x" * 20_000, 0) for i in range(200)), return_exceptions=True
        )
        failed = {f"k{i}" for i, r in enumerate(results) if r is not None}
        assert all(isinstance(r, BackendFullError) for r in results if r is not None)
        assert all(isinstance(r.__cause__, OutOfMemoryError) for r in results if r is not None)
        stored = entry_keys(admin, namespace)
        assert 0 < len(stored) < 200, "the burst must be cut by maxmemory midway"
        assert stored == {f"k{i}" for i in range(200)} - failed  # success means stored
        assert _mirror_keys(writer) == stored  # the writer's own mirror too
        await until(lambda: _mirror_keys(reader) == stored)
        admin.config_set("maxmemory", 0)
        async with AsyncIPC(server.url, namespace=namespace, protocol=protocol) as joiner:
            assert _mirror_keys(joiner) == stored
    admin.close()


@needs_redis_server
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_write_run_after_its_timeout_reaches_the_writers_mirror(
    server: Server, namespace: str, protocol: int, until: Any
) -> None:
    """The server is frozen while a `set` is on the wire: the caller gets
    `BackendUnavailableError` after `retry_timeout`, then Redis runs the write
    on resuming. Every mirror, the writer's included, ends up holding it."""
    async with (
        AsyncIPC(server.url, namespace=namespace, protocol=protocol, retry_timeout=1) as writer,
        AsyncIPC(server.url, namespace=namespace, protocol=protocol) as reader,
    ):
        await AsyncCache(writer).set("warm", 1, 0)  # the write connection is open
        server.freeze()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(BackendUnavailableError) as raised:
                await AsyncCache(writer).set("x", "late", 0)
            assert loop.time() - started < 3
            assert isinstance(raised.value, ConnectionError)  # as before, for except clauses
        finally:
            server.thaw()
        admin = server.admin()
        await until(lambda: "x" in entry_keys(admin, namespace))
        admin.close()
        await until(lambda: "x" in _mirror_keys(reader), timeout=10)
        await until(lambda: "x" in _mirror_keys(writer), timeout=10)
        assert await AsyncCache(writer).get("x") == "late"


async def test_the_stream_is_bounded_in_bytes(shared_namespace: str) -> None:
    """Five messages of 400 KiB with `stream_max_bytes` of 1 MiB: the stream keeps
    what fits (about 1 MiB), not all five; small records after them do not let
    it grow past that either."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(REDIS_URL)
    stream = f"ivip:{{{shared_namespace}}}:log"

    async def stream_bytes() -> int:
        return sum(len(fields[b"r"]) for _, fields in await admin.xrange(stream))

    async with AsyncIPC(REDIS_URL, namespace=shared_namespace, stream_max_bytes=1 << 20) as ipc:
        for _ in range(5):
            await ipc.notify("big", "x" * (400 << 10))
        assert await stream_bytes() <= (1 << 20) + (1 << 19)
        assert await admin.xlen(stream) < 5
        for i in range(3000):
            await ipc.notify("small", "y" * 500 + str(i))
        assert await stream_bytes() <= (1 << 20) + (1 << 19)
    await admin.aclose()
