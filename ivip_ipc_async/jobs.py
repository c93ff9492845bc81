"""The durable "done" records of `run_once` jobs.

A job that has run to its end is recorded, before its leader lets go of the
job's lock, as an entry of the reserved cache `ivip.run_once` (key: the job's
name; value: the generation done, the fence of the holding that ran it, the
pid and the time). It lives as long as the namespace does (the directory's
files, the Redis keys), whatever becomes of the process that ran the job.

A *generation* is an opaque text the caller names (a release, a schema
version): a job runs once per generation. The record keeps the last generation
done; a call with another one runs the job and replaces it.

Without a generation (`run_once`'s default: once per start-up of the fleet)
the record is kept under its own key (`<name>#start-up`, which no job name can
be): there it does not say "done", only "a run ended": a caller that waited
during a run sees it change and knows that the job was done meanwhile.

Example:
    >>> import asyncio, tempfile
    >>> from ivip_ipc_async import AsyncIPC
    >>> async def main():
    ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
    ...         jobs = JobRecords(ipc)
    ...         before = jobs.seen("migrate")
    ...         await jobs.mark_done("migrate", "v2", fence=1)
    ...         return before, jobs.seen("migrate"), await jobs.current("migrate")
    >>> asyncio.run(main())
    (None, 'v2', 'v2')
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Final

from .cache import AsyncCache

if TYPE_CHECKING:
    from .ipc import AsyncIPC

__all__ = ["TOPIC", "JobRecords", "check_generation", "record_key"]

TOPIC: Final = "ivip.run_once"  # a cache name reserved for these records
MAX_GENERATION: Final = 200  # characters
START_UP: Final = "#start-up"  # the key suffix of the per-start-up records


def record_key(name: str, generation: str | None) -> str:
    """The key of `name`'s record: per generation, or (None) per start-up.

    Example:
        >>> record_key("migrate", "v2"), record_key("migrate", None)
        ('migrate', 'migrate#start-up')
    """
    return name if generation is not None else name + START_UP


def check_generation(generation: object) -> str:
    """A generation as text: a str of at most 200 characters, or an int.

    Example:
        >>> check_generation(3), check_generation("2024-06-01")
        ('3', '2024-06-01')
    """
    if isinstance(generation, bool) or not isinstance(generation, str | int):
        raise TypeError(f"generation must be a str or an int, not {type(generation).__name__}")
    text = str(generation)
    if len(text) > MAX_GENERATION:
        raise ValueError(f"a generation is at most {MAX_GENERATION} characters")
    return text


class JobRecords:
    """Read and write the done records of one `AsyncIPC`'s namespace."""

    def __init__(self, ipc: AsyncIPC) -> None:
        self.ipc = ipc
        self.cache: AsyncCache[Any] = AsyncCache(ipc, name=TOPIC, default_ttl=0)

    def seen(self, name: str) -> str | None:
        """The generation done, as this process's mirror has it (no I/O; may lag)."""
        medium = self.ipc.medium
        if not medium.mirror_current:
            return None
        entry = medium.mirror.lookup(TOPIC, name)
        if entry is None or entry.deleted or not entry.live(time.time()):
            return None
        return _generation(_decode(self.ipc, entry.data))

    async def latest(self, key: str) -> dict[str, Any] | None:
        """The record at `key` as the medium has it now (None: none, or unreadable).

        Asked by a process that has just taken the job's lock: whatever the last
        holder recorded before letting go is seen (on Redis, read from Redis; on
        the directory, the log is read up to now first).
        """
        data = await self.cache._settled(key)
        return None if data is None else _decode(self.ipc, data)

    async def current(self, name: str) -> str | None:
        """The generation of `name` done, as the medium has it now (see `latest`)."""
        return _generation(await self.latest(name))

    async def mark_done(self, name: str, generation: str | None, *, fence: int) -> None:
        """Record a run of `name` done, for `generation` or (None) for this
        start-up (stored when this returns)."""
        done = {"generation": generation, "fence": fence, "pid": os.getpid(), "at": time.time()}
        await self.cache.set(record_key(name, generation), done, 0)

    async def forget(self, name: str) -> None:
        """Drop the record of the generation done: the next `run_once` of `name`
        with a generation runs the job."""
        await self.cache.delete(name)


def _decode(ipc: AsyncIPC, data: bytes) -> dict[str, Any] | None:
    try:
        value = ipc.codec.loads(data)
    except Exception:  # written by a peer with another codec, or damaged: none
        return None
    return value if isinstance(value, dict) else None


def _generation(record: dict[str, Any] | None) -> str | None:
    generation = None if record is None else record.get("generation")
    return generation if isinstance(generation, str) else None
