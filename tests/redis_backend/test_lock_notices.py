"""Lock release notices over Redis survive a lost pub/sub connection: a waiter
is woken by the holder's release (not by its poll timer), and the notices'
connection is not reopened over and over."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from typing import Any

import pytest

from ivip_ipc_async import AsyncIPC

from ..processes import reap
from ..redis_server import Server
from .support import needs_redis_server

HOLDER = """
import asyncio, sys
from ivip_ipc_async import AsyncIPC

async def main():
    async with AsyncIPC(sys.argv[1], namespace=sys.argv[2]) as ipc:
        for _ in range(2):
            async with ipc.lock("x", lease=30):
                print("held", flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            print("released", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main())
"""


async def _lock_connections(admin: Any, namespace: str) -> dict[str, int]:
    """The ids of the lock connections (roles `l` and `n`) of `namespace` (or of
    `namespace:peer`), and how many channels each is subscribed to."""
    return {
        client["id"]: int(client.get("sub", 0))
        for client in await admin.client_list()
        if client.get("name", "").startswith(f"ivip:{namespace}:")
        and client.get("name", "").endswith((":l", ":n"))
    }


async def _until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


@needs_redis_server
async def test_release_notices_after_the_pubsub_connection_is_killed() -> None:
    import redis.asyncio as aioredis

    server = Server()
    server.start()
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    admin = aioredis.Redis.from_url(server.url)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, server.url, namespace,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdin is not None
    assert holder.stdout is not None
    ipc = AsyncIPC(server.url, namespace=namespace)
    try:
        await ipc.start()
        locks = ipc.medium.backend.locks()  # type: ignore[union-attr]
        for round_ in range(2):
            assert await holder.stdout.readline() == b"held\n"
            # A poll interval far above the handoff: only the notice wakes us in time.
            lock = ipc.lock("x", poll_interval=20, timeout=60)
            waiting = asyncio.create_task(lock.acquire())

            async def subscribed() -> bool:
                return any((await _lock_connections(admin, namespace)).values())

            await _until(subscribed, 10, "the waiter subscribes")
            if round_ == 0:
                killed = locks._pubsub
                assert await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1

                async def resubscribed() -> bool:
                    # (redis-py may reconnect the old one for a moment: not enough)
                    pubsub = locks._pubsub
                    return (
                        pubsub is not killed  # noqa: B023
                        and pubsub is not None
                        and getattr(pubsub.connection, "is_connected", False)
                        and bool(locks._subscribed)
                        and await subscribed()
                    )

                await _until(resubscribed, 10, "the waiter subscribes again")
            key = f"ivip:{{{namespace}}}:lk:u.x"
            notices = locks.notices.get(key, 0)
            holder.stdin.write(b"go\n")
            released = time.monotonic()
            await asyncio.wait_for(waiting, 30)
            handoff = time.monotonic() - released
            assert locks.notices.get(key, 0) > notices, f"no release notice (round {round_})"
            assert handoff < 5, f"woken by the poll timer, not the notice ({handoff:.1f} s)"
            await lock.release()
            assert await holder.stdout.readline() == b"released\n"
            holder.stdin.write(b"go\n")
        # Idle with the notices' connection up: no connection opened anew.
        mine = f"{namespace}:{ipc.stats()['peer']}"
        before = await _lock_connections(admin, mine)
        await asyncio.sleep(1.5)  # (the old bug reopened one every half second)
        assert await _lock_connections(admin, mine) == before
    finally:
        await ipc.destroy()
        await reap(holder)
        await admin.aclose()
        server.close()


HOLD_FOREVER = """
import asyncio, sys
from ivip_ipc_async import AsyncIPC

async def main():
    async with AsyncIPC(sys.argv[1], namespace=sys.argv[2]) as ipc:
        async with ipc.lock("x", lease=1.5):
            print("held", flush=True)
            await asyncio.sleep(3600)

asyncio.run(main())
"""


@needs_redis_server
@pytest.mark.once_per_ci  # a frozen server of its own: the server's behaviour, 6 s
async def test_a_lock_acquired_as_a_frozen_server_resumes_is_held() -> None:
    """The holder dies while the server is frozen (4 s, lease 1.5 s); the waiter's
    try runs when the server resumes: the lock it gets is held, and renewed."""
    import redis.asyncio as aioredis

    server = Server()
    server.start()
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    admin = aioredis.Redis.from_url(server.url)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_FOREVER, server.url, namespace, stdout=asyncio.subprocess.PIPE
    )
    assert holder.stdout is not None
    ipc = AsyncIPC(server.url, namespace=namespace)
    try:
        await ipc.start()
        assert await holder.stdout.readline() == b"held\n"
        lock = ipc.lock("x", lease=1.5, timeout=30)
        waiting = asyncio.create_task(lock.acquire())

        async def subscribed() -> bool:
            return any((await _lock_connections(admin, namespace)).values())

        await _until(subscribed, 10, "the waiter subscribes")
        server.freeze()
        holder.kill()
        await asyncio.sleep(4)  # the freeze itself: the waiter tries meanwhile
        server.thaw()
        await asyncio.wait_for(waiting, 30)
        assert lock.held, "acquire() returned a lock already lost"
        await asyncio.sleep(2)  # longer than the lease: renewed meanwhile
        assert lock.held
        assert await lock.verify()
        await lock.release()
    finally:
        server.thaw()
        await ipc.destroy()
        await reap(holder)
        await admin.aclose()
        server.close()


async def _until_health(ipc: AsyncIPC, healthy: bool, timeout: float, what: str) -> dict[str, Any]:
    """Poll `health()` every 5 ms until it is (un)healthy; the report."""
    deadline = time.monotonic() + timeout
    while (report := ipc.health())["healthy"] != healthy:
        assert time.monotonic() < deadline, f"not within {timeout} s: {what} ({report})"
        await asyncio.sleep(0.005)
    return report


@needs_redis_server
async def test_health_says_when_lock_notices_are_down() -> None:
    """A waiter's release notices are lost twice: its pub/sub connection killed
    (resubscribed at once), then the lock channels refused by an ACL change
    (Redis disconnects it; subscribing fails until the ACL allows them again).
    Each time `health()` is unhealthy naming the lock notices while they are
    down, and healthy again once subscribed; the release then wakes the waiter."""
    import redis.asyncio as aioredis

    server = Server()
    server.start()
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    admin = aioredis.Redis.from_url(server.url)
    await admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all")
    url = f"redis://app:pw@127.0.0.1:{server.port}/0"
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, url, namespace,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdin is not None
    assert holder.stdout is not None
    ipc = AsyncIPC(url, namespace=namespace)
    try:
        await ipc.start()
        assert await holder.stdout.readline() == b"held\n"
        lock = ipc.lock("x", poll_interval=20, timeout=60)
        waiting = asyncio.create_task(lock.acquire())
        mine = f"{namespace}:{ipc.stats()['peer']}"

        async def subscribed() -> bool:
            return any((await _lock_connections(admin, mine)).values())

        await _until(subscribed, 10, "the waiter subscribes")
        assert ipc.health()["healthy"]
        assert ipc.stats()["lock_notices_connected"] is True
        # 1. The notices' connection killed (only it: the listener stays connected).
        (notices,) = [i for i, subs in (await _lock_connections(admin, mine)).items() if subs]
        assert await admin.execute_command("CLIENT", "KILL", "ID", notices) == 1
        report = await _until_health(ipc, False, 5, "unhealthy while the notices are down")
        assert any("lock" in p and "notice" in p for p in report["problems"]), report
        assert ipc.stats()["connected"]
        await _until_health(ipc, True, 10, "healthy again once resubscribed")
        assert ipc.stats()["lock_notices_connected"] is True
        # 2. The lock channels refused (Redis disconnects the subscribed connection).
        live = f"&ivip:{{{namespace}}}:live"
        await admin.execute_command("ACL", "SETUSER", "app", "resetchannels", live)
        report = await _until_health(ipc, False, 5, "unhealthy once the channels are refused")
        assert any("lock" in p and "notice" in p for p in report["problems"]), report
        await asyncio.sleep(1.5)  # subscribing again fails meanwhile: still down
        assert not ipc.health()["healthy"]
        assert ipc.stats()["lock_notices_connected"] is False
        await admin.execute_command("ACL", "SETUSER", "app", "&*")
        await _until_health(ipc, True, 15, "healthy again once the channels are allowed")
        await _until(subscribed, 5, "subscribed again")
        key = f"ivip:{{{namespace}}}:lk:u.x"
        notices_before = ipc.medium.backend.locks().notices.get(key, 0)  # type: ignore[union-attr]
        holder.stdin.write(b"go\n")
        released = time.monotonic()
        await asyncio.wait_for(waiting, 30)
        assert time.monotonic() - released < 5, "woken by the poll timer, not the notice"
        assert ipc.medium.backend.locks().notices.get(key, 0) > notices_before  # type: ignore[union-attr]
        await lock.release()
    finally:
        await ipc.destroy()
        await reap(holder)
        await admin.aclose()
        server.close()
