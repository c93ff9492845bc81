"""Reaching Redis (backends/redis/connections.py, and the start in backend.py):
URL selection and checks, options, RESP2 and RESP3, errors at start (documented,
prompt, permissions checked before anything is stored), connections bounded.

Faults that change a server's configuration or stop it run on a private
`redis-server` (tests/redis_server.py); outages of one instance go through a
TCP relay the test cuts.
"""

from __future__ import annotations

import asyncio
import logging
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

from ..redis_server import Relay, Server, free_port
from ..test_backends import REDIS_URL, needs_redis
from .support import (
    PROTOCOLS,
    loop_time,
    needs_redis_server,
)

pytestmark = needs_redis


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


def test_bad_backend_options_are_refused() -> None:
    from ivip_ipc_async.backends.redis import RedisBackend

    with pytest.raises(ValueError, match="stream_maxlen must be at least 1"):
        RedisBackend(REDIS_URL, stream_maxlen=0)
    with pytest.raises(ValueError, match="ping_interval must be above 0"):
        RedisBackend(REDIS_URL, ping_interval=0)
    with pytest.raises(ValueError, match="decode_responses must be off"):
        RedisBackend(REDIS_URL, decode_responses=True)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis:/127.0.0.1:6390", "must be followed by //"),
        ("rediss:cache:6379", "must be followed by //"),
        ("redis+sentinel:/127.0.0.1:26379/mymaster", "must be followed by //"),
        ("rediss+sentinel:/127.0.0.1:26379/mymaster", "must be followed by //"),
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
        ("-time", None),  # not needed: the fencing counter then never expires
        # What only the locks use (their scripts; EVAL after a restart lost them):
        ("-incr", "incr"),
        ("-del", "del"),
        ("-eval", "eval"),
        ("-exists", "exists"),  # (the check after evictions)
        # The namespace's index of cache entries (the writes', a load's):
        ("-sadd", "sadd"),
        ("-srem", "srem"),
        ("-sscan", "sscan"),
        ("-sismember", "sismember"),
        ("resetchannels &ivip:*:live", r"PUBLISH on the locks' channels \(ivip:\{ns\}:lk:\*"),
    ],
)
async def test_missing_permissions_fail_start_before_anything_is_stored(
    server: Server, namespace: str, protocol: int, acl: str, refused: str | None
) -> None:
    """An ACL user without a command the backend needs: `start()` raises
    `BackendPermissionError` naming it, and nothing was stored (the database
    stays empty); a wrong password is refused at once too."""
    admin = server.admin()
    admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", *acl.split())
    url = f"redis://app:pw@127.0.0.1:{server.port}/0"
    if refused is None:
        async with AsyncIPC(url, namespace=namespace, protocol=protocol) as ipc:
            await ipc.notify("fine", 1)
            async with ipc.lock("x") as lock:
                first = lock.fence
            async with ipc.lock("x") as lock:
                assert lock.fence > first
        # The fencing counter expires with the namespace's other keys, unless
        # TIME is refused (then its tokens are a plain counter, kept for good).
        ttl = admin.pttl(f"ivip:{{{namespace}}}:lk-fence")
        assert ttl == -1 if "-time" in acl else ttl > 0
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
        await until(lambda: ipc.stats()["connected"] and ipc.medium.mirror_current, timeout=10)
        deadline = loop_time() + 5
        while await connections() > 3:
            assert loop_time() < deadline, "the reads' connection stayed open"
            await asyncio.sleep(0.05)
    await admin.aclose()


def test_errors_have_one_documented_base() -> None:
    assert issubclass(BackendFullError, BackendError)
    assert issubclass(BackendPermissionError, BackendError)
    assert issubclass(BackendUnavailableError, BackendError)
    assert issubclass(BackendError, IPCError)
    from ivip_ipc_async import IPCClosedError, UnsafeDirectoryError

    assert issubclass(IPCClosedError, IPCError)
    assert issubclass(UnsafeDirectoryError, IPCError)


async def test_each_attempt_has_a_time_limit_and_cancellation_passes_through(until: Any) -> None:
    """`retrying` cancels an attempt at its deadline (one watchdog timer for every
    attempt, not a timer each) and retries or gives up; a cancellation from
    outside is the caller's, and is not taken for the time limit."""
    from ivip_ipc_async.backends.redis.backend import RedisBackend

    connections = RedisBackend(REDIS_URL, retry_timeout=0.2).connections
    connections.control = object()  # as if started: retries go on
    attempts = 0

    async def hang() -> None:
        nonlocal attempts
        attempts += 1
        await asyncio.Event().wait()

    started = loop_time()
    with pytest.raises(BackendUnavailableError, match=r"did not answer for 0\.2s"):
        await connections.retrying("write", hang)
    assert attempts == 1
    assert 0.15 < loop_time() - started < 5
    assert connections._watchdog._guards == set()
    task = asyncio.create_task(connections.retrying("write", hang, timeout=30))
    await until(lambda: attempts == 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert connections._watchdog._guards == set()
    assert await connections.retrying("write", asyncio.sleep, 0, "done") == "done"
    connections._watchdog.stop()


def test_the_first_start_imports_redis_py_off_the_loop() -> None:
    """Importing redis-py takes ~150 ms (more on a busy machine): the first
    `start()` on a Redis URL imports the backend in a thread, so the event loop
    is never held that long (invariant 7). Run in a fresh interpreter, where
    nothing has imported redis-py yet."""
    import subprocess
    import sys

    code = f"""
import asyncio, sys, threading

seen = []

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "redis":
            seen.append(threading.current_thread() is threading.main_thread())
        return None

sys.meta_path.insert(0, Spy())
from ivip_ipc_async import AsyncIPC
from ivip_ipc_async.errors import BackendUnavailableError

async def main():
    ipc = AsyncIPC("redis://127.0.0.1:{free_port()}/0", retry_timeout=1)
    try:
        await ipc.start()
    except BackendUnavailableError:
        pass
    finally:
        await ipc.destroy()

asyncio.run(main())
assert "redis" in sys.modules
print(seen)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[False]"]  # imported once, not on the loop's thread
