"""Conditional cache writes on the shared directory: a lock, a barrier, a decision.

`ConditionalWrites.write_if` takes the `flock` of the key's bucket
(`locks/c.<bucket>`, through the lock capability), reads every writer's segment
to its end (`LogReader.barrier`), decides on this process's mirror
(`conditions.decide`), appends the record, and releases the lock only once the
append has returned (the record is in its segment). So every holder sees the
writes of every holder before it:

- a holder that released did so after its record was in its segment, and the
  next holder's barrier starts after it took the lock, so it reads that record;
- a holder killed after its append returned and before it released: the kernel
  releases the flock, and the record is in its segment all the same;
- a holder killed before its append returned: its record is whole in its
  segment or not there at all (one `os.write`; a torn tail is dropped), and its
  caller never learnt an outcome.

Plain `set`/`delete` take no lock: they race with conditional writes by last
writer wins, as documented in docs/api.md.

Depends on: `state` (the sink), `conditions`, `records`, and the callables
`backend.py` hands it (the reader's barrier, the writer's append, the locks).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from ...conditions import Conditional, Outcome, decide
from ...records import Record
from ..base import LockProvider
from .state import Life

__all__ = ["BUCKETS", "ConditionalWrites"]

BUCKETS: Final = 64  # lock files for conditional writes (keys share them by hash)
_POLL: Final = 0.5  # seconds: the lock waiters' safety net (inotify wakes them first)


def bucket_of(topic: str, key: bytes) -> str:
    """The lock name of a key's bucket.

    Example:
        >>> bucket_of("default", b"shits")
        'c.55'
    """
    digest = hashlib.sha256(topic.encode() + b"\0" + key).digest()
    return f"c.{int.from_bytes(digest[:4], 'big') % BUCKETS:02d}"


class ConditionalWrites:
    """`write_if` of the directory backend.

    Args:
        life: Where the backend runs (its sink is the mirror decided on).
        barrier: The reader's barrier: delivers what others wrote so far.
        append: The group commit's append.
        locks: The lock capability (made on first use).

    Example:
        >>> async def nothing(*args): pass
        >>> from ivip_ipc_async.backends.directory.state import Counters
        >>> writes = ConditionalWrites(Life(Counters()), nothing, nothing, print)
    """

    def __init__(
        self,
        life: Life,
        barrier: Callable[[], Awaitable[None]],
        append: Callable[[Sequence[Record]], Awaitable[None]],
        locks: Callable[[], LockProvider],
    ) -> None:
        self._life = life
        self._barrier = barrier
        self._append = append
        self._locks = locks
        # One task of this process at a time per bucket: the others wait here
        # rather than churn on the file lock.
        self._local: dict[str, asyncio.Lock] = {}

    async def write_if(self, op: Conditional) -> Outcome:
        record = op.record
        name = bucket_of(record.topic, record.key)
        local = self._local.get(name)
        if local is None:
            local = self._local[name] = asyncio.Lock()
        async with local:
            contender = self._locks().contender(name, lease=30.0)
            try:
                while not await contender.try_acquire():
                    await contender.wait(_POLL)
                await self._barrier()
                sink = self._life.sink
                if sink is None:
                    raise ConnectionAbortedError("the IPC instance is closed")
                current = sink.current(record.topic, record.key)
                outcome = decide(op, current, time.time())
                if outcome.applied:
                    assert outcome.record is not None
                    await self._append((outcome.record,))
                return outcome
            finally:
                # Released only after the append returned (or failed): shielded, so
                # a cancelled caller still lets go of the lock.
                release = asyncio.ensure_future(contender.release())
                try:
                    await asyncio.shield(release)
                except asyncio.CancelledError:
                    await release
                    raise
