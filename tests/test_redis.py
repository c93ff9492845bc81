"""Redis-specific behaviour: URL selection, protocols, connections cut mid-stream, gaps.

The faults are real: `CLIENT KILL` of this test's own connections (found by
their names, `ivip:<namespace>:<peer>:<role>`, so other users of the server are
left alone), and a TCP relay between an instance and Redis that the test cuts
(every connection dropped, new ones refused) and restores.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.ipc import GAP_EVENT

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


def _stream(namespace: str) -> str:
    return f"ivip:{{{namespace}}}:log"


async def _kill_clients(namespace: str) -> list[str]:
    """CLIENT KILL every connection of the instances of `namespace`; their names."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(REDIS_URL)
    killed: list[str] = []
    for client in await admin.client_list():
        name = client.get("name", "")
        mine = name.startswith(f"ivip:{namespace}:")
        if mine and await admin.execute_command("CLIENT", "KILL", "ID", client["id"]):
            killed.append(name)
    await admin.aclose()
    return killed


async def _skip_before_redis_7() -> None:
    if await _server_major() < 7:
        pytest.skip("counting lost entries needs XINFO entries-added (Redis 7+)")


async def _server_major() -> int:
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(REDIS_URL)
    version = (await admin.info("server"))["redis_version"]
    await admin.aclose()
    return int(str(version).split(".")[0])


async def _kill_listener(ipc: AsyncIPC) -> None:
    """CLIENT KILL the subscription connection of one instance."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(REDIS_URL)
    listener = f"ivip:{ipc.stats()['namespace']}:{ipc.stats()['peer']}:r"
    killed = [
        await admin.execute_command("CLIENT", "KILL", "ID", client["id"])
        for client in await admin.client_list()
        if client.get("name") == listener
    ]
    await admin.aclose()
    assert killed == [1]


def _another_process_writes(
    namespace: str, messages: int, cache_set: bool = False, pad: int = 0
) -> None:
    """A separate process notifies `x` 0..messages-1 (with `pad` bytes each, when
    given, as `[i, "xx..."]`) after setting the cache key `missed` when
    `cache_set`, then exits. Blocks: called from a stuck handler."""
    script = (
        "import asyncio, sys\n"
        "from ivip_ipc_async import AsyncCache, AsyncIPC\n"
        "async def main():\n"
        "    async with AsyncIPC(sys.argv[1], namespace=sys.argv[2]) as ipc:\n"
        "        if sys.argv[4] == '1':\n"
        "            await AsyncCache(ipc).set('missed', 'while stuck', 0)\n"
        "        pad = int(sys.argv[5])\n"
        "        for i in range(int(sys.argv[3])):\n"
        "            await ipc.notify('x', [i, 'x' * pad] if pad else i)\n"
        "asyncio.run(main())\n"
    )
    args = [REDIS_URL, namespace, str(messages), str(int(cache_set)), str(pad)]
    subprocess.run(
        [sys.executable, "-c", script, *args],
        check=True,
        timeout=30,
        cwd=Path(__file__).parent.parent,
    )


class Relay:
    """A TCP relay to Redis that a test can cut, restore, or make drop replies."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.up = True
        self.drop_replies = False  # requests reach Redis, answers never come back
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()  # refused
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer, up_writer}
        self.writers |= pair

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    if replies and self.drop_replies:
                        continue
                    dst.write(data)
                    await dst.drain()
            except (OSError, RuntimeError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))
        self.writers -= pair

    def cut(self) -> None:
        """Drop every connection, and refuse new ones until `restore()`."""
        self.up = False
        for writer in list(self.writers):
            writer.transport.abort()

    def restore(self) -> None:
        self.up = True
        self.drop_replies = False

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def relay() -> AsyncIterator[tuple[Relay, str]]:
    """A relay to the test server, and the Redis URL that goes through it."""
    parts = urlsplit(REDIS_URL)
    if parts.scheme != "redis" or parts.hostname is None:
        pytest.skip(f"the relay needs a redis://host:port URL, not {REDIS_URL}")
    relay = Relay(parts.hostname, parts.port or 6379)
    port = await relay.start()
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    yield relay, urlunsplit(parts._replace(netloc=netloc))
    await relay.close()


async def test_url_selects_the_redis_backend(namespace: str) -> None:
    async with AsyncIPC(REDIS_URL, namespace=namespace) as ipc:
        stats = ipc.stats()
        assert stats["backend"] == "redis"
        assert stats["connected"] is True
        assert ipc.health()["healthy"] is True


@pytest.mark.parametrize("parser", ["default", "pure-python"])
@pytest.mark.parametrize("protocol", [2, 3])
async def test_resp2_and_resp3(namespace: str, protocol: int, parser: str, until: Any) -> None:
    """Both protocols, with hiredis (when installed) and redis-py's own parsers;
    the listener's PINGs (every 20 ms of silence here) included."""
    options: dict[str, Any] = {"protocol": protocol}
    if parser == "pure-python":
        try:
            from redis._parsers import _AsyncRESP2Parser, _AsyncRESP3Parser
        except ImportError as exc:  # a private name: may move in a future redis-py
            pytest.skip(f"redis-py's pure-Python parsers are not where expected: {exc}")
        options["parser_class"] = _AsyncRESP3Parser if protocol == 3 else _AsyncRESP2Parser
    async with (
        AsyncIPC(REDIS_URL, namespace=namespace, **options) as a,
        AsyncIPC(REDIS_URL, namespace=namespace, ping_interval=0.02, **options) as b,
    ):
        got: list[Any] = []
        b.on("e", got.append)
        for i in range(5):
            await a.notify("e", {"p": protocol, "i": i, "pad": "x" * (i * 50_000)})
            await asyncio.sleep(0.05)  # silence: b PINGs, and reads the answer
        await AsyncCache(a).set("k", protocol)
        await until(lambda: len(got) == 5)
        assert [m["i"] for m in got] == list(range(5))
        await until(lambda: len(AsyncCache(b)) == 1)
        assert await AsyncCache(b).get("k") == protocol
        assert b.stats()["reconnects"] == 0


@pytest.mark.parametrize("protocol", [2, 3])
async def test_redis_py_health_checks_never_eat_a_push(
    namespace: str, protocol: int, until: Any
) -> None:
    """redis-py's own health check (PING, read the answer) on the subscribed
    connection would throw a push away (RESP3) or fail on it (RESP2): the
    listener turns it off on its connection, and PINGs itself."""
    options = {"protocol": protocol, "health_check_interval": 0.001}
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

        backend: Any = reader._backend.listener
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
        await until(lambda: receiver.stats()["connected"] and receiver._mirror_ready)
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
        assert b._mirror_ready


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


async def test_a_gap_after_trimming_is_reported_and_the_cache_reloaded(
    namespace: str, relay: tuple[Relay, str], until: Any
) -> None:
    """The reader loses Redis; meanwhile records it never reads are written and the
    stream is trimmed past its position. Back, it reports the gap and reloads."""
    import redis.asyncio as aioredis

    cut, via_relay = relay
    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as writer,
        AsyncIPC(via_relay, namespace=namespace) as reader,
    ):
        gaps: list[Any] = []
        reader.on(GAP_EVENT, gaps.append)
        await AsyncCache(writer).set("kept", "yes", 0)
        await until(lambda: len(AsyncCache(reader)) == 1)

        cut.cut()
        await until(lambda: not reader.stats()["connected"])
        assert reader._mirror_ready is False  # dropped: cache reads go to Redis meanwhile
        health = reader.health()
        assert health["healthy"] is False
        assert any("not connected to Redis" in p for p in health["problems"])
        await AsyncCache(writer).set("missed", "while away", 0)
        for i in range(20):
            await writer.notify("x", i)
        admin = aioredis.Redis.from_url(REDIS_URL)
        await admin.xtrim(_stream(namespace), maxlen=0)
        await admin.aclose()
        cut.restore()

        await until(lambda: reader.stats()["gaps"] >= 1, timeout=20)
        await until(lambda: reader.stats()["connected"] and reader._mirror_ready, timeout=20)
        await until(lambda: gaps != [])
        lost = 21 if await _server_major() >= 7 else None  # counted from XINFO on Redis 7+
        assert gaps == [{"peer": "redis", "lost": lost}]
        assert reader.stats()["records_lost"] == (lost or 0)
        assert reader.stats()["reconnects"] >= 1
        assert await AsyncCache(reader).get("kept") == "yes"
        assert await AsyncCache(reader).get("missed") == "while away"  # only a reload has it
        health = reader.health()
        assert health["healthy"] is False
        assert health["errors"]["gaps"] == 1
        assert any("lost by Redis" in p for p in health["problems"])

        after: list[int] = []
        reader.on("after", after.append)
        await writer.notify("after", 1)
        await until(lambda: after == [1])  # and it listens again


async def test_a_stuck_reader_loses_nothing_when_the_stream_is_trimmed(
    namespace: str, until: Any
) -> None:
    """No disconnect: the reader's process is stuck in a handler while another
    process writes and the stream is trimmed (and deleted) behind it. Redis pushed
    every record to its subscription: it gets them all, and reports no gap."""
    import redis

    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as writer,
        AsyncIPC(REDIS_URL, namespace=namespace) as reader,
    ):
        gaps: list[Any] = []
        got: list[int] = []
        reader.on(GAP_EVENT, gaps.append)
        reader.on("x", got.append)

        def stuck(_message: Any) -> None:
            _another_process_writes(namespace, 20, cache_set=True)
            admin = redis.Redis.from_url(REDIS_URL)
            admin.xtrim(_stream(namespace), maxlen=0)
            admin.delete(_stream(namespace))
            admin.close()

        reader.on("stall", stuck)
        await writer.notify("stall")
        await until(lambda: got == list(range(20)))
        assert await AsyncCache(reader).get("missed") == "while stuck"
        after: list[int] = []
        reader.on("after", after.append)
        await writer.notify("after", 1)
        await until(lambda: after == [1])
        assert gaps == []
        assert reader.stats()["gaps"] == reader.stats()["reconnects"] == 0

        # A reconnection later catches up from the stream made anew, which this
        # reader followed live: nothing missed, so still no gap.
        await _kill_listener(reader)
        await until(lambda: reader.stats()["reconnects"] == 1 and reader.stats()["connected"])
        await writer.notify("after", 2)
        await until(lambda: after == [1, 2])
        assert gaps == []


async def test_a_reader_too_slow_for_redis_is_cut_off_and_reports_the_gap(
    namespace: str, until: Any
) -> None:
    """The reader is stuck while more is pushed to it than Redis's output buffer
    limit for subscribers allows: Redis disconnects it. Back, it catches up from
    the stream, finds what was trimmed meanwhile, reports the gap and reloads."""
    import redis
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(REDIS_URL)
    try:
        limits = (await admin.config_get("client-output-buffer-limit"))[
            "client-output-buffer-limit"
        ]
        await admin.config_set("client-output-buffer-limit", "pubsub 256kb 128kb 1")
    except redis.ResponseError as exc:
        await admin.aclose()
        pytest.skip(f"this Redis refuses CONFIG SET: {exc}")
    try:
        async with (
            AsyncIPC(REDIS_URL, namespace=namespace) as writer,
            AsyncIPC(REDIS_URL, namespace=namespace) as reader,
        ):
            gaps: list[Any] = []
            reader.on(GAP_EVENT, gaps.append)

            def stuck(_message: Any) -> None:
                # 32 MB: more than the socket buffers and the limit hold together.
                _another_process_writes(namespace, 64, cache_set=True, pad=512 << 10)
                sync_admin = redis.Redis.from_url(REDIS_URL)
                sync_admin.xtrim(_stream(namespace), maxlen=0)
                sync_admin.close()

            reader.on("stall", stuck)
            await writer.notify("stall")
            await until(lambda: reader.stats()["gaps"] >= 1, timeout=30)
            await until(lambda: gaps != [] and reader._mirror_ready)
            assert reader.stats()["reconnects"] >= 1  # Redis cut it off
            if await _server_major() >= 7:
                assert 0 < gaps[0]["lost"] <= 65  # counted: what it never read
            assert await AsyncCache(reader).get("missed") == "while stuck"  # reloaded
            after: list[int] = []
            reader.on("after", after.append)
            await writer.notify("after", 1)
            await until(lambda: after == [1])
    finally:
        await admin.config_set("client-output-buffer-limit", limits)
        await admin.aclose()


async def test_an_entry_deleted_before_it_was_read_is_reported(
    namespace: str, relay: tuple[Relay, str], until: Any
) -> None:
    """While the reader is away, another client XDELs one entry it has not read, in
    the middle of the stream: back, it reads past the hole and counts it (Redis 7+)."""
    import redis.asyncio as aioredis

    await _skip_before_redis_7()
    cut, via_relay = relay
    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as writer,
        AsyncIPC(via_relay, namespace=namespace) as reader,
    ):
        gaps: list[Any] = []
        got: list[int] = []
        reader.on(GAP_EVENT, gaps.append)
        reader.on("x", got.append)
        cut.cut()
        await until(lambda: not reader.stats()["connected"])
        for i in range(5):
            await writer.notify("x", i)
        admin = aioredis.Redis.from_url(REDIS_URL)
        entries = await admin.xrange(_stream(namespace))
        assert await admin.xdel(_stream(namespace), entries[-3][0]) == 1  # x = 2
        await admin.aclose()
        cut.restore()
        await until(lambda: gaps != [], timeout=20)
        await until(lambda: got == [0, 1, 3, 4])
        assert gaps == [{"peer": "redis", "lost": 1}]
        assert reader.stats()["records_lost"] == 1
        after: list[int] = []
        reader.on("after", after.append)
        await writer.notify("after", 1)
        await until(lambda: after == [1])
        assert reader.stats()["gaps"] == 1  # reported once


async def test_a_stream_deleted_and_made_anew_is_reported(
    namespace: str, relay: tuple[Relay, str], until: Any
) -> None:
    """While the reader is away the stream is deleted (FLUSHDB, DEL, eviction) and a
    new one begun: what the reader had not read is gone, and the counts going
    backwards say so."""
    import redis.asyncio as aioredis

    await _skip_before_redis_7()
    cut, via_relay = relay
    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as writer,
        AsyncIPC(via_relay, namespace=namespace) as reader,
    ):
        gaps: list[Any] = []
        got: list[int] = []
        reader.on(GAP_EVENT, gaps.append)
        reader.on("x", got.append)
        for i in range(3):
            await writer.notify("x", i)
        await until(lambda: got == [0, 1, 2])
        cut.cut()
        await until(lambda: not reader.stats()["connected"])
        await writer.notify("x", 3)
        admin = aioredis.Redis.from_url(REDIS_URL)
        await admin.delete(_stream(namespace))
        await admin.aclose()
        await writer.notify("x", 4)  # the first entry of a new stream
        cut.restore()
        await until(lambda: gaps != [], timeout=20)
        assert gaps == [{"peer": "redis", "lost": None}]  # how many is unknown
        await until(lambda: got[-1:] == [4])
        assert got == [0, 1, 2, 4]
        await writer.notify("x", 5)
        await until(lambda: got[-1:] == [5])
        assert reader.stats()["gaps"] == 1  # reported once


async def test_destroy_sends_every_write_already_accepted(namespace: str, until: Any) -> None:
    """`destroy()` while one notify is on the wire (sent from its own task) and more
    wait behind it for the writer task: every one of them is sent, none refused."""
    async with AsyncIPC(REDIS_URL, namespace=namespace) as receiver:
        got: list[int] = []
        receiver.on("n", got.append)
        sender = await AsyncIPC(REDIS_URL, namespace=namespace).start()
        backend: Any = sender._backend.writer
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


def test_bad_backend_options_are_refused() -> None:
    from ivip_ipc_async.backends.redis import RedisBackend

    with pytest.raises(ValueError, match="stream_maxlen must be at least 1"):
        RedisBackend(REDIS_URL, stream_maxlen=0)
    with pytest.raises(ValueError, match="ping_interval must be above 0"):
        RedisBackend(REDIS_URL, ping_interval=0)
    with pytest.raises(ValueError, match="decode_responses must be off"):
        RedisBackend(REDIS_URL, decode_responses=True)


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


async def test_cancelled_sets_leave_every_mirror_equal(namespace: str, until: Any) -> None:
    from ivip_ipc_async.records import encode_key

    async with (
        AsyncIPC(REDIS_URL, namespace=namespace) as a,
        AsyncIPC(REDIS_URL, namespace=namespace) as b,
    ):
        mine, theirs = AsyncCache(a), AsyncCache(b)
        backend: Any = a._backend

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
