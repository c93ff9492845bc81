"""Locks over Redis (backends/redis/leases.py): the behaviour shared with the
directory's locks (leases, fencing, waiters, a holder killed or paused) is
tested on both backends in tests/test_coordination.py; here, what only the
Redis provider itself checks."""

from __future__ import annotations

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
