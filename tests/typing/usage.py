"""A user's code, type-checked by `mypy --strict` in CI (never run).

It pins what the public API promises to a type checker: return types follow the
arguments (a `get` default, a memoized function's result), handlers may be sync
or async, and caches are generic in their values.
"""

from __future__ import annotations

from typing import Any, TypedDict, assert_type

from ivip_ipc_async import (
    GAP_EVENT,
    IPC,
    AsyncCache,
    AsyncIPC,
    BackendFullError,
    BackendUnavailableError,
    Cache,
    IPCError,
    Leadership,
    MessageStream,
    Subscription,
    run_once,
)


class User(TypedDict):
    id: int
    name: str


async def sync_and_async_handlers() -> None:
    def on_sync(message: Any) -> None: ...

    async def on_async(message: Any) -> None: ...

    sub = IPC.on("user:updated", on_sync)
    assert_type(sub, Subscription)
    IPC.once("ready", on_async)
    assert_type(IPC.off("user:updated", on_sync), int)
    sub.stop()
    await IPC.notify("user:updated", {"id": 7})
    await IPC.notify("x", 1, include_self=True)
    await IPC.notify_many("x", [1, 2], include_self=True)
    message = await IPC.wait_for("ready", timeout=5)
    assert_type(message, Any)
    stream = IPC.subscribe("ticks")
    assert_type(stream, MessageStream)
    async for tick in stream:
        assert_type(tick, Any)
        break


async def typed_cache(ipc: AsyncIPC) -> None:
    users: AsyncCache[User] = AsyncCache(ipc, name="users", default_ttl=300)
    await users.set(7, {"id": 7, "name": "Ana"}, 60)
    assert_type(await users.get(7), User | None)
    assert_type(await users.get(7, 0), User | int)
    assert_type(await users.has(7), bool)
    assert_type(await users.delete(7), bool)
    assert_type(await users.clean_up(), int)
    assert_type(len(users), int)
    assert_type(await Cache.get("chave"), Any | None)


async def memoized(ipc: AsyncIPC) -> None:
    cache: AsyncCache[Any] = AsyncCache(ipc)

    async def fetch_user(uid: int) -> User:
        return {"id": uid, "name": "Ana"}

    def compute(x: int) -> float:
        return x / 2

    fetch = cache.memoize("user", fetch_user, 30)
    assert_type(await fetch(7), User)
    half = cache.memoize("half", compute, 30)
    assert_type(await half(3), float)

    @cache.memoize(ttl=30)
    async def square(x: int) -> int:
        return x * x

    await square(3)


async def from_the_top(ipc: AsyncIPC) -> None:
    """Every public name comes from `ivip_ipc_async` itself."""
    ipc.on(GAP_EVENT, lambda gap: None)
    leadership = Leadership(ipc, "scheduler")
    assert_type(leadership.held, bool)

    async def migrate() -> None: ...

    assert_type(await run_once(ipc, "migrations", migrate, generation="v1"), bool)
    try:
        await ipc.notify("e", 1)
    except BackendFullError as full:
        assert_type(full.errno, int | None)  # ENOSPC, or the kernel's errno
    except BackendUnavailableError:
        pass
    except IPCError:
        pass


async def memoized_keeps_types(ipc: AsyncIPC) -> None:
    cache: AsyncCache[Any] = AsyncCache(ipc)

    @cache.memoize(ttl=30)
    async def load_user(uid: int, *, fresh: bool = False) -> User:
        return {"id": uid, "name": "Ana"}

    @cache.memoize
    async def count(word: str) -> int:
        return len(word)

    @cache.memoize("half", ttl=30)
    def half(x: int) -> float:
        return x / 2

    assert_type(await load_user(7), User)
    assert_type(await load_user(7, fresh=True), User)
    assert_type(await count("abc"), int)
    assert_type(await half(3), float)
    assert_type(load_user.key(7), str)
    assert_type(await load_user.invalidate(7), bool)

    async def fetch_user(uid: int, *, fresh: bool = False) -> User:
        return {"id": uid, "name": "Rui"}

    fetch = cache.memoize("user", fetch_user, 30)
    assert_type(fetch.key(7, fresh=True), str)
    assert_type(await fetch.invalidate(7), bool)
    await load_user("7")  # type: ignore[arg-type]  # the signature is kept
    load_user.key(7, stale=True)  # type: ignore[call-arg]


async def atomic_operations(ipc: AsyncIPC) -> None:
    counters: AsyncCache[int] = AsyncCache(ipc, name="counters")
    assert_type(await counters.add("k", 1), bool)
    assert_type(await counters.incr("k"), int)
    assert_type(await counters.decr("k", 2, ttl=60), int)
    value, version = await counters.get_with_version("k")
    assert_type(value, int | None)
    assert_type(version, str | None)
    assert_type(await counters.get_with_version("k", 0), tuple[int, str | None])
    assert_type(await counters.set("k", 2, if_version=version), bool)
    assert_type(await counters.get_many(["k", 1]), dict[str | int, int])
    await counters.set_many({"a": 1, 2: 3}, ttl=10)
    assert_type(await counters.delete_many(["a"]), int)
    assert_type(await counters.delete_prefix("a"), int)
    assert_type(counters.stats(), dict[str, int])
