"""The Redis backend under the faults of issue 11, against real servers.

Faults that change a server's configuration, stop it or flush it run on a
`redis-server` this module starts on a free port (the shared test server is
never reconfigured nor flushed): `maxmemory` reached mid-burst, the server
frozen (SIGSTOP) while a write is on the wire, `FLUSHALL`, eviction under
`allkeys-lru`, restarts with and without AOF, ACL users without a permission.
Outages of one instance go through a TCP relay the test cuts.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.errors import (
    BackendError,
    BackendFullError,
    BackendPermissionError,
    BackendUnavailableError,
    IPCError,
)
from ivip_ipc_async.ipc import GAP_EVENT

from .redis_server import REDIS_SERVER, Server, entry_keys, free_port
from .test_backends import REDIS_URL, needs_redis
from .test_redis import Relay

pytestmark = needs_redis

needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None, reason="no redis-server binary to start a private server"
)
PROTOCOLS = [pytest.param(2, id="resp2"), pytest.param(3, id="resp3")]


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """A private server; parametrized indirectly with extra redis-server options."""
    if REDIS_SERVER is None:
        pytest.skip("no redis-server binary to start a private server")
    instance = Server(*getattr(request, "param", ()))
    instance.start()
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def shared_namespace() -> AsyncIterator[str]:
    """A namespace on the shared test server, its keys deleted afterwards."""
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    keys = await client.keys(f"ivip:{{{ns}}}:*")
    if keys:
        await client.delete(*keys)
    await client.aclose()


def _mirror_keys(ipc: AsyncIPC) -> set[Any]:
    return set(ipc.mirror.live_keys("default"))


# -- 1. the writer's own mirror converges too --------------------------------------------


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


# -- 2. Redis losing our keys is noticed -------------------------------------------------


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
        await until(lambda: a._mirror_ready and b._mirror_ready)
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
            await until(lambda: gaps != [] and b.stats()["connected"] and b._mirror_ready)
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
            await until(lambda: gaps != [] and ipc._mirror_ready, timeout=5)
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


# -- 3. clear errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis:/127.0.0.1:6390", "must be followed by //"),
        ("rediss:cache:6379", "must be followed by //"),
        ("redis://", "no host"),
        ("redis://:secret@/0", "no host"),
        ("redis://127.0.0.1:6379/abc", "database must be a number, not 'abc'"),
        ("redis://127.0.0.1/0?db=x", "database must be a number, not 'x'"),
        ("redis://127.0.0.1:99999/0", "port must be a number from 1 to 65535"),
        ("redis://127.0.0.1:port/0", "port must be a number"),
        ("unix://", "no socket path"),
    ],
)
async def test_bad_redis_urls_are_refused(
    url: str, problem: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Anything that looks like a Redis URL but is not a valid one: `ValueError`
    naming the problem, when given, or when found in `$IVIP_IPC_DIR` at start;
    never a directory made from it, never localhost:6379 or db 0 instead."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="bad Redis URL") as raised:
        AsyncIPC(url)
    assert problem in str(raised.value)
    assert "secret" not in str(raised.value)
    monkeypatch.setenv("IVIP_IPC_DIR", url)
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        await AsyncIPC().start()
    assert list(tmp_path.iterdir()) == []  # no ./redis:/... directory


async def test_start_errors_are_documented_and_prompt() -> None:
    """A refused port, an unknown host and a port that never answers are retried
    for `retry_timeout`, then raise `BackendUnavailableError`; a refusal no retry
    cures (`DB index is out of range`) raises `BackendError` at once. Each chains
    redis-py's error, and is an `IPCError`."""
    import redis

    loop = asyncio.get_running_loop()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, reads, never answers
        writer.close()

    silent = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    silent_port = silent.sockets[0].getsockname()[1]
    cases = [
        (f"redis://127.0.0.1:{free_port()}/0", BackendUnavailableError),
        ("redis://no-such-host.invalid:6379/0", BackendUnavailableError),
        (f"redis://127.0.0.1:{silent_port}/0", BackendUnavailableError),
        (REDIS_URL.rsplit("/", 1)[0] + "/99999", BackendError),
    ]
    try:
        for url, kind in cases:
            started = loop.time()
            with pytest.raises(kind) as raised:
                await AsyncIPC(url, retry_timeout=0.5).start()
            took = loop.time() - started
            assert isinstance(raised.value, IPCError)
            assert isinstance(raised.value.__cause__, redis.RedisError | TimeoutError | OSError)
            assert took < 2.5, (url, took)
            if kind is BackendError:
                assert not isinstance(raised.value, BackendUnavailableError)
                assert "DB index is out of range" in str(raised.value)
                assert took < 0.5  # not retried
    finally:
        silent.close()
        await silent.wait_closed()


@needs_redis_server
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_start_waits_for_a_server_that_comes_up_in_time(
    namespace: str, protocol: int, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """`start()` while Redis is down retries, and succeeds once it is up within
    `retry_timeout`."""
    server = Server()
    try:
        with caplog.at_level(logging.INFO, logger="ivip_ipc_async"):
            ipc = AsyncIPC(server.url, namespace=namespace, protocol=protocol, retry_timeout=10)
            starting = asyncio.create_task(ipc.start())
            await until(lambda: "Redis not available yet" in caplog.text)
            assert not starting.done()
            server.start()
            await asyncio.wait_for(starting, 10)
        try:
            assert ipc.health()["healthy"] is True
            await ipc.notify("n", 1)
        finally:
            await ipc.destroy()
    finally:
        server.close()


@needs_redis_server
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("acl", "refused"),
    [
        ("-publish", "publish"),
        ("-subscribe", "subscribe"),
        ("-xadd", "xadd"),
        ("-scan", "scan"),
        ("-info", None),  # not needed: evictions then go unnoticed, nothing else
    ],
)
async def test_missing_permissions_fail_start_before_anything_is_stored(
    server: Server, namespace: str, protocol: int, acl: str, refused: str | None
) -> None:
    """An ACL user without a command the backend needs: `start()` raises
    `BackendPermissionError` naming it, and nothing was stored (the database
    stays empty); a wrong password is refused at once too."""
    admin = server.admin()
    admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", acl)
    url = f"redis://app:pw@127.0.0.1:{server.port}/0"
    if refused is None:
        async with AsyncIPC(url, namespace=namespace, protocol=protocol) as ipc:
            await ipc.notify("fine", 1)
    else:
        with pytest.raises(BackendPermissionError, match=f"(?i){refused}") as raised:
            await AsyncIPC(url, namespace=namespace, protocol=protocol).start()
        assert isinstance(raised.value, PermissionError)
        assert "pw@" not in str(raised.value)
        assert admin.dbsize() == 0  # nothing stored
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BackendPermissionError):
        await AsyncIPC(f"redis://app:wrong@127.0.0.1:{server.port}/0", protocol=protocol).start()
    assert loop.time() - started < 1  # not retried
    admin.close()


# -- 4. health tells the present ----------------------------------------------------------


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


# -- 5. one answer during an outage, bounded resources ------------------------------------


@pytest.fixture
async def relay() -> AsyncIterator[tuple[Relay, str]]:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(REDIS_URL)
    if parts.scheme != "redis" or parts.hostname is None:
        pytest.skip(f"the relay needs a redis://host:port URL, not {REDIS_URL}")
    relay = Relay(parts.hostname, parts.port or 6379)
    port = await relay.start()
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    yield relay, urlunsplit(parts._replace(netloc=netloc))
    await relay.close()


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
        await until(lambda: ipc.stats()["connected"] and ipc._mirror_ready, timeout=10)
        assert (await cache.get("k"), await cache.has("k"), await cache.keys()) == (1, True, ["k"])
        assert len(cache) == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_connections_per_instance_stay_bounded(
    shared_namespace: str, relay: tuple[Relay, str], protocol: int, until: Any
) -> None:
    """200 concurrent `get` (and 50 `set`) during a 1 s outage: the instance never
    holds more than 4 connections (writes, listener, its requests, and one for
    reads while the mirror is rebuilt), and the reads' one is closed after."""
    import redis.asyncio as aioredis

    cut, via_relay = relay
    admin = aioredis.Redis.from_url(REDIS_URL)
    async with AsyncIPC(
        via_relay, namespace=shared_namespace, protocol=protocol, state_check_interval=0.2
    ) as ipc:
        mine = f"ivip:{shared_namespace}:{ipc.stats()['peer']}:"

        async def connections() -> int:
            return sum(1 for c in await admin.client_list() if c.get("name", "").startswith(mine))

        cache = AsyncCache(ipc)
        await cache.set("k", 1, 0)
        cut.cut()
        await until(lambda: not ipc.stats()["connected"])
        reads = [asyncio.create_task(cache.get("k")) for _ in range(200)]
        writes = [asyncio.create_task(cache.set(f"w{i}", i, 0)) for i in range(50)]
        await asyncio.sleep(1)
        cut.restore()
        most = 0
        while not all(task.done() for task in reads + writes):
            most = max(most, await connections())
            await asyncio.sleep(0.01)
        assert await asyncio.gather(*reads) == [1] * 200
        await asyncio.gather(*writes)
        most = max(most, await connections())
        assert most <= 4
        await until(lambda: ipc.stats()["connected"] and ipc._mirror_ready, timeout=10)
        deadline = loop_time() + 5
        while await connections() > 3:
            assert loop_time() < deadline, "the reads' connection stayed open"
            await asyncio.sleep(0.05)
    await admin.aclose()


def loop_time() -> float:
    return asyncio.get_running_loop().time()


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


def test_errors_have_one_documented_base() -> None:
    assert issubclass(BackendFullError, BackendError)
    assert issubclass(BackendPermissionError, BackendError)
    assert issubclass(BackendUnavailableError, BackendError)
    assert issubclass(BackendError, IPCError)
    from ivip_ipc_async import IPCClosedError, UnsafeDirectoryError

    assert issubclass(IPCClosedError, IPCError)
    assert issubclass(UnsafeDirectoryError, IPCError)
