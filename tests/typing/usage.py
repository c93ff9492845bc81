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
    assert_type(leadership.is_leader, bool)

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
