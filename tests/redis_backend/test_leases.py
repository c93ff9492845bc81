"""Locks over Redis (backends/redis/leases.py): the behaviour shared with the
directory's locks (leases, fencing, waiters, a holder killed or paused) is
tested on both backends in tests/test_coordination.py; here, what only the
Redis provider itself checks."""

from __future__ import annotations

import asyncio

import pytest

from ivip_ipc_async.backends.redis import RedisBackend

from ..test_backends import REDIS_URL, needs_redis

pytestmark = needs_redis


async def test_a_note_longer_than_512_characters_is_refused(namespace: str) -> None:
    backend = RedisBackend(REDIS_URL, namespace=namespace)
    locks = backend.locks()
    contender = locks.contender("u.notes", lease=5.0)
    try:
        with pytest.raises(ValueError, match="at most 512 characters"):
            await contender.try_acquire("x" * 513)
        assert await contender.try_acquire("x" * 512)
        with pytest.raises(ValueError, match="at most 512 characters"):
            await contender.set_note("y" * 513)
        assert await contender.holder_note() == "x" * 512
    finally:
        await contender.release()
        await locks.close()


TAKE_ONCE = """
import asyncio, sys
from ivip_ipc_async import AsyncIPC

async def main():
    async with AsyncIPC(sys.argv[1], namespace=sys.argv[2], state_ttl=1.0) as ipc:
        async with ipc.lock("x", lease=5) as lock:
            print(lock.fence, flush=True)

asyncio.run(main())
"""


async def _take_once(namespace: str) -> int:
    """Another process takes lock `x` once and leaves; its fencing token."""
    import subprocess
    import sys

    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", TAKE_ONCE, REDIS_URL, namespace],
        capture_output=True,
        check=True,
        timeout=30,
    )
    return int(done.stdout)


async def test_no_key_of_the_locks_stays_and_fences_still_increase(namespace: str) -> None:
    """Processes take a lock and leave: `state_ttl` later no key of the namespace
    is left (the fencing counter too), and the next holder's token is still
    larger than every earlier one."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(REDIS_URL)
    try:
        first = await _take_once(namespace)
        second = await _take_once(namespace)
        assert second > first
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while keys := await admin.keys(f"ivip:{{{namespace}}}:*"):
            assert loop.time() < deadline, f"keys left after every process left: {keys}"
            await asyncio.sleep(0.1)
        third = await _take_once(namespace)
        assert third > second
    finally:
        await admin.aclose()
