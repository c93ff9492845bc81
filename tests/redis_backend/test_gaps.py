"""Gaps (backends/redis/position.py): entries trimmed, deleted, or lost with
the stream or in a restart before a reader read them are reported (counted
when Redis can tell), the cache reloaded; what a subscribed reader is pushed is
never lost; a restart that kept everything is no gap; health after a gap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import GAP_EVENT, AsyncCache, AsyncIPC, LossCause

from ..redis_server import Relay, Server
from ..test_backends import REDIS_URL, needs_redis
from .support import (
    PROTOCOLS,
    _another_process_writes,
    _kill_listener,
    _server_major,
    _skip_before_redis_7,
    _stream,
    needs_redis_server,
)

pytestmark = needs_redis


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
        assert reader.medium.mirror_current is False  # dropped: cache reads go to Redis meanwhile
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
        await until(
            lambda: reader.stats()["connected"] and reader.medium.mirror_current, timeout=20
        )
        await until(lambda: gaps != [])
        lost = 21 if await _server_major() >= 7 else None  # counted from XINFO on Redis 7+
        assert gaps == [{"peer": "redis", "lost": lost}]
        assert reader.stats()["records_lost"] == (lost or 0)
        # The cause, as the directory counts its own (`LossCause`).
        assert reader.stats().get(LossCause.TRIMMED.counter, 0) == (lost or 0)
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


@pytest.mark.parametrize(
    "server",
    [("--client-output-buffer-limit", "pubsub 256kb 128kb 1")],
    indirect=True,
    ids=["small-pubsub-buffer"],
)
async def test_a_reader_too_slow_for_redis_is_cut_off_and_reports_the_gap(
    server: Server, namespace: str, until: Any
) -> None:
    """The reader is stuck while more is pushed to it than Redis's output buffer
    limit for subscribers allows: Redis disconnects it. Back, it catches up from
    the stream, finds what was trimmed meanwhile, reports the gap and reloads.
    (A private server: the shared one's limits are never changed.)"""
    admin = server.admin()
    async with (
        AsyncIPC(server.url, namespace=namespace) as writer,
        AsyncIPC(server.url, namespace=namespace) as reader,
    ):
        gaps: list[Any] = []
        reader.on(GAP_EVENT, gaps.append)

        def stuck(_message: Any) -> None:
            # 32 MB: more than the socket buffers and the limit hold together.
            _another_process_writes(namespace, 64, cache_set=True, pad=512 << 10, url=server.url)
            admin.xtrim(_stream(namespace), maxlen=0)

        reader.on("stall", stuck)
        await writer.notify("stall")
        await until(lambda: reader.stats()["gaps"] >= 1, timeout=30)
        await until(lambda: gaps != [] and reader.medium.mirror_current)
        assert reader.stats()["reconnects"] >= 1  # Redis cut it off
        version = admin.info("server")["redis_version"]
        if int(str(version).split(".")[0]) >= 7:
            assert 0 < gaps[0]["lost"] <= 65  # counted: what it never read
        assert await AsyncCache(reader).get("missed") == "while stuck"  # reloaded
        after: list[int] = []
        reader.on("after", after.append)
        await writer.notify("after", 1)
        await until(lambda: after == [1])
    admin.close()


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
        assert reader.stats()[LossCause.TRIMMED.counter] == 1  # deleted, counted as trimmed
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


@needs_redis_server
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "server",
    [
        (
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        )
    ],
    indirect=True,
    ids=["config"],
)
async def test_a_restart_that_keeps_everything_is_no_gap(
    server: Server, namespace: str, protocol: int, until: Any
) -> None:
    """A restart with AOF `fsync always` loses nothing: no gap reported, and
    `health()` is healthy again as soon as the instances are reconnected."""
    async with (
        AsyncIPC(server.url, namespace=namespace, protocol=protocol) as a,
        AsyncIPC(server.url, namespace=namespace, protocol=protocol) as b,
    ):
        gaps: list[Any] = []
        got: list[int] = []
        b.on(GAP_EVENT, gaps.append)
        b.on("n", got.append)
        await AsyncCache(a).set("k", 1, 0)
        for i in range(20):
            await a.notify("n", i)
        await until(lambda: len(got) == 20)
        server.stop()
        await until(lambda: not b.health()["healthy"])
        assert any("not connected" in p for p in b.health()["problems"])
        server.start()
        await a.notify("n", 20)
        await until(lambda: got[-1:] == [20], timeout=10)
        await until(lambda: a.health()["healthy"] and b.health()["healthy"], timeout=10)
        assert gaps == []
        assert b.stats()["gaps"] == 0
        assert await AsyncCache(b).get("k") == 1


@needs_redis_server
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_restart_that_loses_everything_is_a_gap_of_unknown_size_then_heals(
    server: Server, namespace: str, protocol: int, until: Any
) -> None:
    """A restart without persistence: a gap with `lost` None (unknown), unhealthy
    for `unhealthy_after_gap` seconds, then healthy again."""
    async with AsyncIPC(server.url, namespace=namespace, protocol=protocol) as b:
        b.unhealthy_after_gap = 1.0
        gaps: list[Any] = []
        b.on(GAP_EVENT, gaps.append)
        await AsyncCache(b).set("k", 1, 0)
        server.stop()
        server.start()
        await until(lambda: gaps != [], timeout=10)
        assert gaps == [{"peer": "redis", "lost": None}]
        await until(lambda: b.stats()["connected"], timeout=10)
        health = b.health()
        assert health["healthy"] is False
        assert any("unknown number" in p for p in health["problems"])
        await until(lambda: b.health()["healthy"], timeout=5)
        assert b.health()["problems"] == []
        assert await AsyncCache(b).get("k") is None  # as Redis: lost


async def test_health_after_a_gap_is_bounded_on_the_directory_backend_too(
    ipc_dir: Path, until: Any
) -> None:
    """The same rule on the shared directory (the gap told as its backend tells
    it, through the sink): unhealthy with the count, then healthy again."""
    async with AsyncIPC(ipc_dir) as ipc:
        ipc.unhealthy_after_gap = 0.3
        gaps: list[Any] = []
        ipc.on(GAP_EVENT, gaps.append)
        ipc._sink.gap("peer-1", 3)
        health = ipc.health()
        assert health["healthy"] is False
        assert any("3 records may have been lost" in p for p in health["problems"])
        await until(lambda: ipc.health()["healthy"], timeout=3)
        await until(lambda: gaps == [{"peer": "peer-1", "lost": 3}])
