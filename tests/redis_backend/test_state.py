"""The namespace's state in Redis (backends/redis/state.py): `FLUSHALL`
(while connected, or while away) and evictions are noticed and reloaded,
evictions of other keys are no gap, the bookkeeping keys expire once no
process is left, and cache reads while the mirror is rebuilt go to Redis (and
answer alike during an outage).

`FLUSHALL` and evictions run on a private `redis-server` (tests/redis_server.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.errors import (
    BackendUnavailableError,
)
from ivip_ipc_async.ipc import GAP_EVENT

from ..redis_server import Relay, Server, entry_keys
from ..test_backends import REDIS_URL, needs_redis
from .support import (
    PROTOCOLS,
    _mirror_keys,
    loop_time,
    needs_redis_server,
)

pytestmark = needs_redis


@needs_redis_server
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_flushall_is_noticed_and_every_process_reloads(
    server: Server, namespace: str, protocol: int, until: Any
) -> None:
    """FLUSHALL under two connected processes: within a few seconds each reports a
    gap of unknown size, reloads (its mirror is then what Redis holds: nothing),
    is unhealthy for `unhealthy_after_gap`, then healthy again; writes go on."""
    options = {"protocol": protocol, "state_check_interval": 0.2}
    async with (
        AsyncIPC(server.url, namespace=namespace, **options) as a,
        AsyncIPC(server.url, namespace=namespace, **options) as b,
    ):
        gaps: dict[str, list[Any]] = {"a": [], "b": []}
        for name, ipc in (("a", a), ("b", b)):
            ipc.unhealthy_after_gap = 1.0
            ipc.on(GAP_EVENT, gaps[name].append)
        for i in range(10):
            await AsyncCache(a).set(i, i, 0)
        await until(lambda: len(_mirror_keys(b)) == 10)
        admin = server.admin()
        admin.flushall()
        loop = asyncio.get_running_loop()
        flushed = loop.time()
        await until(lambda: gaps["a"] and gaps["b"], timeout=5)
        assert loop.time() - flushed < 3
        assert gaps == {
            "a": [{"peer": "redis", "lost": None}],
            "b": [{"peer": "redis", "lost": None}],
        }
        await until(lambda: a.medium.mirror_current and b.medium.mirror_current)
        assert _mirror_keys(a) == _mirror_keys(b) == set() == entry_keys(admin, namespace)
        health = a.health()
        assert health["healthy"] is False
        assert any("an unknown number of records" in p for p in health["problems"])
        await until(lambda: a.health()["healthy"] and b.health()["healthy"], timeout=5)
        assert a.health()["errors"]["gaps"] == 1  # still counted
        await AsyncCache(a).set("after", 1, 0)
        await until(lambda: _mirror_keys(b) == {"after"})
        checks = b.stats()["state_checks"]
        await until(lambda: b.stats()["state_checks"] >= checks + 3)  # reported once
        # ... and a reconnection later finds nothing more to report.
        listener = f"ivip:{namespace}:{b.stats()['peer']}:r"
        for client in admin.client_list():
            if client.get("name") == listener:
                admin.execute_command("CLIENT", "KILL", "ID", client["id"])
        await until(lambda: b.stats()["reconnects"] == 1 and b.stats()["connected"])
        await AsyncCache(a).set("later", 1, 0)
        await until(lambda: _mirror_keys(b) == {"after", "later"})
        assert len(gaps["a"]) == len(gaps["b"]) == 1
        admin.close()


@needs_redis_server
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_flushall_while_away_is_reported_once(
    server: Server, namespace: str, protocol: int, until: Any
) -> None:
    """FLUSHALL while a reader is disconnected, the stream made anew meanwhile or
    not: back, it reports one gap (not one for the marker and one for the
    stream), reloads, and gets what is written after."""
    relay = Relay("127.0.0.1", server.port)
    port = await relay.start()
    try:
        async with (
            AsyncIPC(server.url, namespace=namespace, protocol=protocol) as writer,
            AsyncIPC(f"redis://127.0.0.1:{port}/0", namespace=namespace, protocol=protocol) as b,
        ):
            gaps: list[Any] = []
            got: list[int] = []
            b.on(GAP_EVENT, gaps.append)
            b.on("n", got.append)
            await AsyncCache(writer).set("k", 1, 0)
            await writer.notify("n", 1)
            await until(lambda: got == [1] and _mirror_keys(b) == {"k"})
            relay.cut()
            await until(lambda: not b.stats()["connected"])
            server.admin().flushall()
            relay.restore()
            await until(lambda: gaps != [] and b.stats()["connected"] and b.medium.mirror_current)
            assert _mirror_keys(b) == set()
            await writer.notify("n", 2)
            await until(lambda: got == [1, 2])
            await asyncio.sleep(0.3)
            assert gaps == [{"peer": "redis", "lost": None}]
    finally:
        await relay.close()


@needs_redis_server
@pytest.mark.parametrize(
    "server",
    [
        (
            "--maxmemory-policy",
            "allkeys-lru",
        )
    ],
    indirect=True,
    ids=["config"],
)
async def test_evictions_are_noticed_and_warned_about(
    server: Server, namespace: str, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """With `allkeys-lru`, another application's writes make Redis evict: every
    process reports a gap and reloads, so its mirror holds what Redis still
    holds; the evicting policy was warned about at start."""
    with caplog.at_level(logging.WARNING, logger="ivip_ipc_async"):
        async with AsyncIPC(server.url, namespace=namespace, state_check_interval=0.2) as ipc:
            assert "maxmemory-policy allkeys-lru" in caplog.text
            gaps: list[Any] = []
            ipc.on(GAP_EVENT, gaps.append)
            for i in range(50):
                await AsyncCache(ipc).set(i, "v" * 10_000, 0)
            admin = server.admin()
            used = int(admin.info("memory")["used_memory"])
            admin.config_set("maxmemory", used + (256 << 10))
            pipe = admin.pipeline(transaction=False)
            for i in range(400):  # another application fills the server
                pipe.set(f"other:{i}", "o" * 10_000)
            pipe.execute()
            assert int(admin.info("stats")["evicted_keys"]) > 0
            await until(lambda: gaps != [] and ipc.medium.mirror_current, timeout=5)
            assert gaps[0]["lost"] is None
            # (Redis may evict more while over the limit, even on reads: each is
            # noticed in turn, and the mirror ends up as Redis.)
            await until(lambda: _mirror_keys(ipc) == entry_keys(admin, namespace), timeout=5)
            assert len(_mirror_keys(ipc)) < 50
            admin.close()


@needs_redis_server
@pytest.mark.parametrize(
    "server", [("--maxmemory-policy", "volatile-ttl")], indirect=True, ids=["config"]
)
async def test_evictions_of_other_keys_are_no_gap(
    server: Server, namespace: str, until: Any
) -> None:
    """Redis evicts another application's keys (the shortest TTLs go first under
    `volatile-ttl`), none of this namespace's: the check finds every entry of
    the mirror still there, and reports nothing."""
    async with AsyncIPC(server.url, namespace=namespace, state_check_interval=0.1) as ipc:
        gaps: list[Any] = []
        ipc.on(GAP_EVENT, gaps.append)
        for i in range(20):
            await AsyncCache(ipc).set(i, "v" * 1000, 0)
        admin = server.admin()
        admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + (256 << 10))
        pipe = admin.pipeline(transaction=False)
        for i in range(400):
            pipe.set(f"other:{i}", "o" * 10_000, ex=30)
        pipe.execute()
        evicted = int(admin.info("stats")["evicted_keys"])
        assert evicted > 0
        checks = ipc.stats()["state_checks"]
        await until(lambda: ipc.stats()["state_checks"] >= checks + 3)
        assert gaps == []
        assert ipc.stats()["gaps"] == 0
        assert entry_keys(admin, namespace) == _mirror_keys(ipc) == set(range(20))
        admin.close()


async def test_bookkeeping_keys_expire_once_no_process_is_left(
    shared_namespace: str, until: Any
) -> None:
    """The stream and the namespace's marker expire `state_ttl` after the last
    process left; only a cache entry written without TTL stays."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(REDIS_URL)
    prefix = f"ivip:{{{shared_namespace}}}:"
    async with AsyncIPC(
        REDIS_URL, namespace=shared_namespace, state_ttl=1.0, tombstone_ttl=0.5
    ) as ipc:
        await ipc.notify("n", 1)
        await AsyncCache(ipc).set("forever", 1, 0)
        await AsyncCache(ipc).set("brief", 1, 0.5)
        await AsyncCache(ipc).delete("gone")  # a tombstone
        assert await admin.pttl(prefix + "log") > 0
        await asyncio.sleep(1.2)  # longer than state_ttl: a live process keeps them
        assert await admin.exists(prefix + "log", prefix + "id") == 2

    async def left() -> list[bytes]:
        return sorted(await admin.keys(prefix + "*"))

    deadline = loop_time() + 5
    from ivip_ipc_async.records import encode_key

    while (keys := await left()) != [f"{prefix}c:default\x00".encode() + encode_key("forever")]:
        assert loop_time() < deadline, keys
        await asyncio.sleep(0.05)
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


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_cache_reads_answer_alike_during_an_outage(
    shared_namespace: str, relay: tuple[Relay, str], protocol: int, until: Any
) -> None:
    """Redis unreachable: `get`, `has`, `keys()` and `len()` all raise
    `BackendUnavailableError`, the awaited ones after `read_timeout`; none
    answers "empty". Back, they answer from the mirror again."""
    cut, via_relay = relay
    async with AsyncIPC(
        via_relay, namespace=shared_namespace, protocol=protocol, read_timeout=0.5
    ) as ipc:
        cache = AsyncCache(ipc)
        await cache.set("k", 1, 0)
        cut.cut()
        await until(lambda: not ipc.stats()["connected"])
        loop = asyncio.get_running_loop()
        for read in (cache.get("k"), cache.has("k"), cache.keys()):
            started = loop.time()
            with pytest.raises(BackendUnavailableError):
                await read
            assert 0.4 < loop.time() - started < 2
        with pytest.raises(BackendUnavailableError):
            len(cache)
        cut.restore()
        await until(lambda: ipc.stats()["connected"] and ipc.medium.mirror_current, timeout=10)
        assert (await cache.get("k"), await cache.has("k"), await cache.keys()) == (1, True, ["k"])
        assert len(cache) == 1
