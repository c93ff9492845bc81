"""The connections an instance opens for its locks are bounded by design, however
many lock, Leadership and memoize users it has at once (docs/scaling.md,
"Connections")."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from ivip_ipc_async import AsyncCache, AsyncIPC, Leadership

from ..processes import reap
from ..test_backends import REDIS_URL, needs_redis
from .support import needs_redis_server

pytestmark = needs_redis

LOCK_COMMANDS = 2  # role `l`: the lock commands' connections
NOTICES = 1  # role `n`: subscribed to the release notices
BASE = 4  # `w`, `r`, `c`, `g`


async def test_lock_connections_stay_bounded_with_many_concurrent_users(
    shared_namespace: str,
) -> None:
    """60 tasks of one process use 6 locks, a Leadership and single-flight memoize
    at once, against another process doing the same: the instance never holds
    more than 2 connections for lock commands and 1 for notices (7 in all)."""
    import redis.asyncio as aioredis

    namespace = shared_namespace
    admin = aioredis.Redis.from_url(REDIS_URL)
    folder = Path(tempfile.mkdtemp(prefix="ivip-lockconn-"))
    root = Path(__file__).parent.parent.parent
    peer = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.redis_backend.coordination_peer",
        REDIS_URL, namespace, str(folder), "peer", cwd=root,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    ipc = AsyncIPC(REDIS_URL, namespace=namespace)
    errors: list[BaseException] = []
    peak: dict[str, int] = {}
    try:
        await ipc.start()
        cache = AsyncCache(ipc)
        mine = f"ivip:{namespace}:{ipc.stats()['peer']}:"
        stop = asyncio.Event()
        done = 0

        @cache.memoize(ttl=0.05)
        async def square(x: int) -> int:
            await asyncio.sleep(0.005)
            return x * x

        async def user(i: int) -> None:
            nonlocal done
            while not stop.is_set():
                try:
                    if i % 10 == 0:
                        async with Leadership(ipc, "boss", lease=2.0):
                            await asyncio.sleep(0.005)
                    elif i % 10 < 4:
                        assert await square(i % 5) == (i % 5) ** 2
                    else:
                        name = "shared" if i % 2 else f"l{i % 5}"
                        async with ipc.lock(name, lease=2.0, timeout=30):
                            await asyncio.sleep(0.002)
                    done += 1
                except Exception as exc:
                    errors.append(exc)
                    return

        async def count() -> dict[str, int]:
            roles: dict[str, int] = {}
            for client in await admin.client_list():
                name = client.get("name", "")
                if name.startswith(mine):
                    role = name[len(mine) :]
                    roles[role] = roles.get(role, 0) + 1
            return roles

        # Wait for the peer to be busy too.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while (
            not (folder / "peer.progress").exists()
            or int((folder / "peer.progress").read_text() or 0) < 5
        ):
            assert loop.time() < deadline, "the peer process did not start its work"
            await asyncio.sleep(0.05)
        users = [asyncio.create_task(user(i)) for i in range(60)]
        end = loop.time() + 2.5
        while loop.time() < end and not errors:
            for role, n in (await count()).items():
                peak[role] = max(peak.get(role, 0), n)
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*users), 30)
        for role, n in (await count()).items():
            peak[role] = max(peak.get(role, 0), n)
        assert not errors, errors
        assert done > 60, f"only {done} operations in 2.5 s"
        assert peak.get("l", 0) <= LOCK_COMMANDS, peak
        assert peak.get("n", 0) <= NOTICES, peak
        assert sum(peak.values()) <= BASE + LOCK_COMMANDS + NOTICES, peak
    finally:
        (folder / "stop").touch()
        await ipc.destroy()
        try:
            out, _ = await asyncio.wait_for(peer.communicate(), 30)
        finally:
            await reap(peer)
        await admin.aclose()
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    assert peer.returncode == 0
    assert out.strip() == b"[]", out  # the peer's errors


@needs_redis_server
async def test_lock_commands_waiting_for_a_connection_still_give_up_in_time() -> None:
    """20 tasks try locks while the server is frozen: each raises
    `BackendUnavailableError` within `retry_timeout` + one attempt's time limit,
    though only 2 connections serve the lock commands (they wait their turn for
    no longer than that)."""
    from ivip_ipc_async.errors import BackendUnavailableError

    from ..redis_server import Server

    server = Server()
    server.start()
    ipc = AsyncIPC(server.url, namespace="frozen", retry_timeout=1.0)
    try:
        await ipc.start()
        locks = ipc.medium.backend.locks()  # type: ignore[union-attr]
        locks.command_timeout = 0.5  # one attempt's limit (5 s by default)
        server.freeze()
        loop = asyncio.get_running_loop()
        started = loop.time()
        tries = [asyncio.create_task(ipc.lock(f"k{i}", timeout=30).acquire()) for i in range(20)]
        results = await asyncio.wait_for(asyncio.gather(*tries, return_exceptions=True), 30)
        took = loop.time() - started
        assert all(isinstance(r, BackendUnavailableError) for r in results), results
        assert took < 1.0 + 0.5 + 1.5, f"the last gave up after {took:.1f} s"
    finally:
        server.thaw()
        await ipc.destroy()
        server.close()
