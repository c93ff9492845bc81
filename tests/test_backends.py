"""The contract on every backend: one fixture, parametrized over directory and Redis.

Each test gets `make`, a factory of `AsyncIPC` instances that share one medium
(a fresh directory, or a fresh Redis namespace), destroyed afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.errors import IPCClosedError, IPCError

from .processes import reap
from .redis_server import REDIS_SERVER, Server

REDIS_URL = os.environ.get("IVIP_TEST_REDIS", "redis://127.0.0.1:6379/0")
PEER = str(Path(__file__).with_name("peer.py"))


def redis_answers() -> bool:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping()
        return True
    except Exception:
        return False


REDIS = redis_answers()
needs_redis = pytest.mark.skipif(not REDIS, reason=f"no Redis server answers at {REDIS_URL}")
Make = Callable[..., AsyncIPC]


@pytest.fixture(params=["directory", pytest.param("redis", marks=needs_redis)])
async def medium(request: pytest.FixtureRequest, ipc_dir: Path) -> AsyncIterator[str]:
    """Where the instances meet: a directory path, or a Redis URL + namespace."""
    if request.param == "directory":
        yield str(ipc_dir)
        return
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    yield f"{REDIS_URL}#{namespace}"
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    keys = await client.keys(f"ivip:{{{namespace}}}:*")
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def make(medium: str) -> AsyncIterator[Make]:
    created: list[AsyncIPC] = []

    def factory(**options: Any) -> AsyncIPC:
        if "#" in medium:
            url, namespace = medium.split("#")
            ipc = AsyncIPC(url, namespace=namespace, **options)
        else:
            ipc = AsyncIPC(medium, **options)
        created.append(ipc)
        return ipc

    yield factory
    for ipc in created:
        await ipc.destroy()


async def started(make: Make, n: int = 2) -> list[AsyncIPC]:
    return [await make().start() for _ in range(n)]


async def test_notify_reaches_others_in_order(make: Make, until: Any) -> None:
    a, b = await started(make)
    got: list[int] = []
    mine: list[int] = []
    b.on("n", got.append)
    a.on("n", mine.append)
    await asyncio.gather(*(a.notify("n", i) for i in range(300)))
    for i in range(300, 400):
        await a.notify("n", i)
    await until(lambda: len(got) == 400)
    assert got == list(range(400))
    assert mine == []
    await a.notify("n", "self", include_self=True)
    assert mine == ["self"]
    await a.notify_many("n", range(400, 500))
    await until(lambda: len(got) == 501)
    assert got == [*range(400), "self", *range(400, 500)]


async def test_once_off_wait_for_subscribe(make: Make, until: Any) -> None:
    a, b = await started(make)
    once: list[Any] = []
    b.once("e", once.append)
    handler = b.on("e", lambda m: None)
    assert b.off("e", handler.handler) == 1
    stream = b.subscribe("e")
    waiter = asyncio.create_task(b.wait_for("e", timeout=10))
    await asyncio.sleep(0.01)
    await a.notify("e", 1)
    await a.notify("e", 2)
    assert await waiter == 1
    got = [await asyncio.wait_for(stream.get(), 10), await asyncio.wait_for(stream.get(), 10)]
    assert got == [1, 2]
    stream.close()
    await until(lambda: once == [1])
    with pytest.raises(TimeoutError):
        await b.wait_for("never", timeout=0.05)


async def test_bad_input_is_refused_before_writing(make: Make) -> None:
    (a,) = await started(make, 1)
    with pytest.raises(TypeError):
        await a.notify("e", object())
    with pytest.raises(TypeError):
        await AsyncCache(a).set(1.5, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="over the limit"):
        await a.notify("e", "x" * (17 << 20))


async def test_cache_across_peers(make: Make, until: Any) -> None:
    a, b = await started(make)
    here, there = AsyncCache(a), AsyncCache(b)
    await here.set("user:7", {"name": "Ana"}, 60)
    await here.set(1, "int")
    await here.set("1", "str")
    await here.set("brief", True, 0.3)
    await until(lambda: len(there) >= 3)
    assert await there.get("user:7") == {"name": "Ana"}
    assert await there.get(1) == "int"
    assert await there.get("1") == "str"
    copy = await there.get("user:7")
    copy["name"] = "changed"
    assert await there.get("user:7") == {"name": "Ana"}
    assert await here.delete("user:7") is True
    await until(lambda: not there.ipc.mirror.lookup("default", "user:7").live(0))  # type: ignore[union-attr]
    assert await there.get("user:7") is None
    deadline = asyncio.get_running_loop().time() + 5
    while await there.has("brief"):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)


async def test_concurrent_writers_converge(make: Make, until: Any) -> None:
    a, b = await started(make)
    ca, cb = AsyncCache(a), AsyncCache(b)
    for i in range(40):
        await asyncio.gather(ca.set("k", f"a{i}"), cb.set("k", f"b{i}"))

    def same() -> bool:
        x, y = a.mirror.lookup("default", "k"), b.mirror.lookup("default", "k")
        return (
            x is not None
            and y is not None
            and (x.record.hlc, x.record.node)
            == (
                y.record.hlc,
                y.record.node,
            )
        )

    await until(same)
    assert await ca.get("k") == await cb.get("k")


async def test_late_joiner_sees_the_present(make: Make) -> None:
    (writer,) = await started(make, 1)
    cache = AsyncCache(writer)
    for i in range(100):
        await cache.set(i, {"i": i}, 0)
    await cache.delete(7)
    await writer.destroy()
    joiner = await make().start()
    late = AsyncCache(joiner)
    assert await late.get(99) == {"i": 99}
    assert await late.get(7) is None
    assert len(late) == 99


async def test_memoize_is_shared(make: Make, until: Any) -> None:
    a, b = await started(make)
    calls: list[str] = []

    def compute(who: str) -> str:
        calls.append(who)
        return "v"

    fa = AsyncCache(a).memoize("m", lambda: compute("a"), 30)
    fb = AsyncCache(b).memoize("m", lambda: compute("b"), 30)
    assert await fa() == "v"
    await until(lambda: len(AsyncCache(b)) == 1)
    assert await fb() == "v"
    assert calls == ["a"]


async def test_sigkill_of_a_sender_loses_nothing_acknowledged(medium: str, until: Any) -> None:
    """A real sender process, killed mid-burst; a real receiver process."""
    if "#" in medium:
        url, namespace = medium.split("#")
        args = [url, "--namespace", namespace]
    else:
        args = [medium]

    async def spawn() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            PEER,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 24,
        )
        assert proc.stdout is not None
        assert b"ready" in await asyncio.wait_for(proc.stdout.readline(), 15)
        return proc

    async def ask(proc: asyncio.subprocess.Process, **command: Any) -> Any:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(json.dumps(command).encode() + b"\n")
        await proc.stdin.drain()
        return json.loads(await asyncio.wait_for(proc.stdout.readline(), 15))

    receiver, sender = await spawn(), await spawn()
    try:
        await ask(receiver, op="listen", event="b")
        assert sender.stdin is not None
        assert sender.stdout is not None
        sender.stdin.write(
            json.dumps(
                {"op": "notify", "event": "b", "messages": list(range(50_000)), "report_each": 1}
            ).encode()
            + b"\n"
        )
        await sender.stdin.drain()
        acked: list[int] = []
        while len(acked) < 500:
            acked.append(json.loads(await sender.stdout.readline())["acked_one"])
        sender.send_signal(signal.SIGKILL)
        await sender.wait()
        while line := await sender.stdout.readline():
            if b"acked_one" in line:
                acked.append(json.loads(line)["acked_one"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            state = await ask(receiver, op="state")
            got = set(state["received"].get("b", []))
            if set(acked) <= got:
                break
            assert loop.time() < deadline, f"missing {len(set(acked) - got)} acknowledged"
            await asyncio.sleep(0.05)
        assert state["received"]["b"] == sorted(state["received"]["b"])
    finally:
        for proc in (receiver, sender):
            await reap(proc)


# A child that fills its medium with cache writes until one is refused, and
# says what it caught. On the directory its file size is limited (RLIMIT_FSIZE:
# a full disk without filling one); on Redis the test set `maxmemory`.
FILL = """
import asyncio, errno, json, resource, signal, sys
from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.errors import BackendError, BackendFullError, IPCError

async def main():
    target, namespace = sys.argv[1], sys.argv[2] or None
    async with AsyncIPC(target, namespace=namespace) as ipc:
        if namespace is None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of dying
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
        cache, acked = AsyncCache(ipc), 0
        try:
            for acked in range(100_000):
                await cache.set(f"k{acked}", "x" * 20_000, 0)
        except Exception as exc:
            print(json.dumps({
                "acked": acked,
                "full": isinstance(exc, BackendFullError),
                "classes": [isinstance(exc, c) for c in (IPCError, BackendError, OSError)],
                "errno": errno.errorcode.get(exc.errno, exc.errno)
                if isinstance(exc, OSError) else None,
                "error": repr(exc),
            }), flush=True)

asyncio.run(main())
"""


@pytest.fixture(params=["directory", pytest.param("redis", marks=needs_redis)])
def full_medium(request: pytest.FixtureRequest, ipc_dir: Path) -> Iterator[list[str]]:
    """A medium that will run out of room: a directory (the child limits its own
    file size), or a private Redis with `maxmemory` 1 MiB over what it uses."""
    if request.param == "directory":
        yield [str(ipc_dir), ""]
        return
    if REDIS_SERVER is None:
        pytest.skip("no redis-server binary to start a private server")
    server = Server("--maxmemory-policy", "noeviction")
    server.start()
    try:
        admin = server.admin()
        admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + (1 << 20))
        admin.close()
        yield [server.url, "full"]
    finally:
        server.close()


async def test_a_full_medium_raises_backend_full_error(full_medium: list[str]) -> None:
    """The same condition, the same error: a write refused for lack of room is a
    `BackendFullError` on both backends, an `IPCError` that is also the
    `OSError` it was before (errno ENOSPC, or the kernel's own, EFBIG here)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FILL, *full_medium, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        caught = json.loads(line)
        assert caught["acked"] > 3, caught  # some room, then none
        assert caught["full"], caught
        assert caught["classes"] == [True, True, True], caught
        directory = full_medium[1] == ""
        assert caught["errno"] == ("EFBIG" if directory else "ENOSPC"), caught
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        await reap(proc)


async def test_a_write_to_a_closed_backend_raises_ipc_closed_error(make: Make) -> None:
    """After `close()`, a backend's `append` raises `IPCClosedError` on both
    backends: an `IPCError`, still the `ConnectionAbortedError` it was."""
    ipc = await make().start()
    backend = ipc.medium.backend
    assert backend is not None
    await ipc.destroy()
    with pytest.raises(IPCClosedError) as raised:
        await backend.append(())
    assert isinstance(raised.value, IPCError)
    assert isinstance(raised.value, ConnectionAbortedError)
