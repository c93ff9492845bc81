"""The AsyncCache contract (two peers in one process; separate processes: test_processes)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC


async def test_set_get_has_delete(cache: AsyncCache) -> None:
    await cache.set("chave", "valor", 60)
    assert await cache.get("chave") == "valor"
    assert await cache.has("chave")
    assert await cache.get("missing") is None
    assert await cache.get("missing", "fallback") == "fallback"
    assert await cache.delete("chave") is True
    assert await cache.delete("chave") is False
    assert not await cache.has("chave")
    assert await cache.get("chave") is None


async def test_propagates_to_peer(ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any) -> None:
    here, there = AsyncCache(ipc), AsyncCache(peer_ipc)
    await here.set("user:7", {"name": "Ana"}, 60)
    await until(lambda: len(there) == 1)
    assert await there.get("user:7") == {"name": "Ana"}
    await here.delete("user:7")
    await until(lambda: len(there) == 0)
    assert await there.get("user:7") is None


async def test_int_and_str_keys_are_distinct(ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any) -> None:
    here, there = AsyncCache(ipc), AsyncCache(peer_ipc)
    await here.set(1, "int")
    await here.set("1", "str")
    await until(lambda: len(there) == 2)
    assert await there.get(1) == "int"
    assert await there.get("1") == "str"
    assert sorted(await there.keys(), key=repr) == ["1", 1] or set(await there.keys()) == {1, "1"}


async def test_bad_keys_and_values_are_refused_before_writing(cache: AsyncCache) -> None:
    written = cache.ipc.stats()["records_written"]
    for bad_key in (1.5, None, b"x", True, ("t",)):
        with pytest.raises(TypeError, match="str or int"):
            await cache.set(bad_key, 1)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await cache.get(bad_key)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await cache.set("k", {1, 2})
    with pytest.raises(TypeError, match="ttl"):
        await cache.set("k", 1, "60")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too long"):
        await cache.set("k" * 70_000, 1)
    assert cache.ipc.stats()["records_written"] == written


async def test_oversized_value_is_refused(ipc_dir: Path) -> None:
    async with AsyncIPC(ipc_dir, max_record_size=2048) as ipc:
        cache = AsyncCache(ipc)
        with pytest.raises(ValueError, match="over the limit"):
            await cache.set("k", "x" * 4096)
        assert await cache.get("k") is None


async def test_values_read_back_are_copies(cache: AsyncCache) -> None:
    value = {"list": [1, 2]}
    await cache.set("k", value)
    value["list"].append(3)  # the caller's object is not the cache's
    first = await cache.get("k")
    first["list"].append(99)
    assert await cache.get("k") == {"list": [1, 2]}


async def test_ttl_default_none_zero_and_negative(ipc: AsyncIPC) -> None:
    cache = AsyncCache(ipc, default_ttl=0.2)
    await cache.set("default", 1)  # default_ttl
    await cache.set("never0", 1, 0)
    await cache.set("never-", 1, -5)
    await cache.set("short", 1, 0.2)
    entry = ipc.mirror.lookup("default", "default")
    assert entry is not None
    assert entry.record.expires == pytest.approx(time.time() + 0.2, abs=0.1)
    assert ipc.mirror.lookup("default", "never0").record.expires == 0.0  # type: ignore[union-attr]
    assert ipc.mirror.lookup("default", "never-").record.expires == 0.0  # type: ignore[union-attr]
    deadline = time.monotonic() + 5
    while await cache.has("short") or await cache.has("default"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert await cache.get("short") is None
    assert await cache.get("never0") == 1
    assert len(cache) == 2
    assert await cache.clean_up() == 2
    assert await cache.clean_up() == 0


async def test_named_caches_do_not_share_keys(ipc: AsyncIPC) -> None:
    users, sessions = AsyncCache(ipc, name="users"), AsyncCache(ipc, name="sessions")
    await users.set("k", "u")
    assert await sessions.get("k") is None
    await sessions.set("k", "s")
    assert await users.get("k") == "u"
    assert await users.clear() == 1
    assert await sessions.get("k") == "s"


async def test_last_writer_wins_across_peers(ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any) -> None:
    a, b = AsyncCache(ipc), AsyncCache(peer_ipc)
    for i in range(50):
        await asyncio.gather(a.set("k", f"a{i}"), b.set("k", f"b{i}"))
    await until(lambda: ipc.mirror.lookup("default", "k") is not None)

    def same() -> bool:
        x, y = ipc.mirror.lookup("default", "k"), peer_ipc.mirror.lookup("default", "k")
        if x is None or y is None:
            return False
        return (x.record.hlc, x.record.node, x.record.data) == (
            y.record.hlc,
            y.record.node,
            y.record.data,
        )

    await until(same)
    assert await a.get("k") == await b.get("k")


async def test_memoize_seed_form_and_decorators(cache: AsyncCache) -> None:
    calls: list[Any] = []

    def fetch_user(uid: int) -> dict[str, Any]:
        calls.append(uid)
        return {"id": uid}

    fetch = cache.memoize("user", fetch_user, 30)
    assert await fetch(7) == {"id": 7}
    assert await fetch(7) == {"id": 7}
    assert calls == [7]
    assert await cache.has("user:[[7],{}]")

    @cache.memoize(ttl=30)
    async def square(x: int) -> int:
        calls.append(("sq", x))
        return x * x

    @cache.memoize
    async def cube(x: int) -> int:
        return x**3

    assert await square(4) == 16
    assert await square(4) == 16
    assert await cube(2) == 8
    assert calls.count(("sq", 4)) == 1


async def test_memoize_concurrent_calls_share_one_computation(cache: AsyncCache) -> None:
    calls = 0
    gate = asyncio.Event()

    @cache.memoize("slow", ttl=30)
    async def slow(x: int) -> list[int]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return [x]

    tasks = [asyncio.create_task(slow(1)) for _ in range(10)]
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert results == [[1]] * 10
    results[0].append(2)  # each caller has its own copy
    assert results[1] == [1]


async def test_memoize_does_not_cache_errors(cache: AsyncCache) -> None:
    attempts = 0

    @cache.memoize(ttl=30)
    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("first call fails")
        return "ok"

    with pytest.raises(RuntimeError):
        await flaky()
    assert await flaky() == "ok"
    with pytest.raises(TypeError, match="JSON"):
        await cache.memoize("x", lambda v: v, 1)(object())


async def test_memoize_shared_across_peers(ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any) -> None:
    calls: list[str] = []

    def compute(who: str) -> str:
        calls.append(who)
        return "v"

    a = AsyncCache(ipc).memoize("m", lambda: compute("a"), 30)
    b = AsyncCache(peer_ipc).memoize("m", lambda: compute("b"), 30)
    assert await a() == "v"
    await until(lambda: len(AsyncCache(peer_ipc)) == 1)
    assert await b() == "v"
    assert calls == ["a"]


def test_bad_cache_arguments(ipc_dir: Path) -> None:
    ipc = AsyncIPC(ipc_dir)
    with pytest.raises(TypeError):
        AsyncCache(ipc, name="")
    with pytest.raises(TypeError):
        AsyncCache(ipc, default_ttl="60")  # type: ignore[arg-type]
    assert len(AsyncCache(ipc)) == 0  # before start: empty, no error
