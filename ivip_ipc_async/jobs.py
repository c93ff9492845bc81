"""`run_once`: jobs that run in one process of a fleet, and their durable "done" records.

`run_once(ipc, name, job)` is for start-up jobs (migrations, warming a cache)
that must run in one worker of a fleet while the others wait until it is
done: once per start-up of the fleet (the leader of `name` keeps its
`Leadership` while it lives), or once per `generation` (a release). Built on
the coordination layer's locks and on a cache of records, so it works the
same on the shared directory and on Redis.

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
from collections.abc import Awaitable, Callable
from typing import Any, Final

from . import coordination, forks
from .backends.base import Contender
from .cache import AsyncCache
from .coordination import (
    DEFAULT_LEASE,
    RUNNING,
    Leadership,
    check_name,
    check_timing,
    hold,
    release_on_exit,
)
from .ipc import AsyncIPC

__all__ = ["reset_run_once", "run_once"]  # exported at the top; the records are internal

TOPIC: Final = "ivip.run_once"  # a cache name reserved for these records
MAX_GENERATION: Final = 200  # characters
START_UP: Final = "#start-up"  # the key suffix of the per-start-up records
_DONE: Final = "done"  # the note of a leader whose job of this start-up is done


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


# Leaderships won by `run_once` without a generation, kept for the life of the
# process (or of its event loop, or of its `AsyncIPC`): while one is held with
# the note "done", later callers know the job was done in this start-up.
# A forked child keeps none of them.
class _Kept:
    """Those leaderships (an object: `forks` holds what registers weakly)."""

    def __init__(self) -> None:
        self.contenders: list[Contender] = []

    def forget(self) -> None:
        self.contenders.clear()


_kept = _Kept()
forks.forget_in_child(_kept, _Kept.forget)


async def run_once(
    ipc: AsyncIPC,
    name: str,
    job: Callable[[], Awaitable[Any]],
    *,
    generation: str | int | None = None,
    timeout: float | None = None,
    poll_interval: float = 1.0,
    lease: float = DEFAULT_LEASE,
) -> bool:
    """Run `job` in one process of the fleet; the others wait until it is done.

    Every worker of a fleet calls it at start-up; one of them (the leader of
    `name`) runs `job()`, and the call returns False in the others once the job
    has finished, even if the leader's process exits right after it. Returns
    True in the process that ran `job` (this call). What "once" means:

    * By default (`generation=None`), **once per start-up of the fleet**. The
      leader keeps the leadership of `name` while its process (its event loop,
      its `AsyncIPC`) lives, so a worker that starts later returns False at
      once. Once no process holds it (every worker was stopped, a redeploy),
      the next caller runs the job again. Each run ends with a record in the
      namespace, which a caller that waited during the run sees appear: it
      returns False even when the leader has exited since.
    * With a `generation` (your release or schema version), **once per
      generation, for the life of the namespace**: the record says which
      generation was done, and every later call with the same one returns False
      without running the job, whatever became of the leader. Another
      generation runs it again, once; `reset_run_once` drops the record.

    If the leader dies before the job's end is recorded (killed mid-job, or
    right after it), or `job` raises there, a waiting process takes over and
    runs it: at least once when a runner dies, exactly once otherwise. Jobs
    should be idempotent, as migrations and cache warm-ups are. On Redis the
    same holds with the lease: a leader paused for longer than `lease` seconds
    counts as dead.

    Args:
        ipc: An `AsyncIPC` on any backend (started if not).
        name: The job's name (as for `Leadership`).
        job: An async callable with no arguments.
        generation: None (once per start-up of the fleet), or what "once" is
            counted per: a str of at most 200 characters, or an int.
        timeout: Seconds to wait for another process's job; `TimeoutError` after.
        poll_interval: Seconds between tries while waiting (see `Leadership`).
        lease: Redis only: see `Leadership`.

    Raises:
        TimeoutError: waited longer than `timeout` for another process's job.
        Exception: whatever `job` raised, in the process that ran it (the
            leadership is released first, so another process may try).

    Example:
        >>> import asyncio, tempfile
        >>> from ivip_ipc_async import AsyncIPC
        >>> async def main():
        ...     path = tempfile.mkdtemp()
        ...     async with AsyncIPC(path) as one, AsyncIPC(path) as two:
        ...         async def warm_up():
        ...             await asyncio.sleep(0.05)
        ...         return await asyncio.gather(
        ...             run_once(one, "warm-up", warm_up), run_once(two, "warm-up", warm_up)
        ...         )
        >>> sorted(asyncio.run(main()))  # one ran it, the other waited for it
        [False, True]

        Once per release, whichever worker starts first, even across restarts::

            await run_once(IPC, "migrations", migrate, generation=os.environ["RELEASE"])
    """
    check_name(name, "job")
    check_timing(lease, poll_interval)
    if generation is None:
        return await _once_per_start_up(
            ipc, name, job, timeout=timeout, poll_interval=float(poll_interval), lease=lease
        )
    wanted = check_generation(generation)
    records = JobRecords(ipc)

    async def done() -> bool:
        # Asked of the medium, not of this process's mirror, which may still show
        # a record since reset (or of a generation since replaced).
        return await records.current(name) == wanted

    if await done():
        return False  # done before: no lock needed

    contender = await _generation_lock(ipc, name, lease)
    try:
        if not await hold(
            contender,
            timeout=timeout,
            poll_interval=float(poll_interval),
            note=RUNNING,
            enough=done,  # asked at each wake-up: the leader recorded it
        ):
            return False
        # Ours now; the holder before us may have finished: its record was
        # stored before it let go.
        if await done():
            return False
        await job()
        await records.mark_done(name, wanted, fence=contender.fence)
    finally:
        await release_on_exit(contender, contender.release)
    return True


async def _once_per_start_up(
    ipc: AsyncIPC,
    name: str,
    job: Callable[[], Awaitable[Any]],
    *,
    timeout: float | None,
    poll_interval: float,
    lease: float,
) -> bool:
    """`run_once` without a generation: the leader keeps the leadership while it
    lives; a run's end is recorded for those who waited during it."""
    # A run that ended after this call began was done for this call, even if its
    # leader has exited since: its record is stamped after `began` (the clock of
    # one machine; across Redis hosts, as close as theirs), or differs from the
    # record read as the call began.
    began = time.time()
    records = JobRecords(ipc)
    key = record_key(name, None)
    before = await records.latest(key)

    async def ended_since() -> bool:
        latest = await records.latest(key)
        if latest is None:
            return False
        at = latest.get("at")
        return latest != before or (isinstance(at, int | float) and at >= began)

    contender = await coordination.contender(ipc, f"{Leadership.KIND}.{name}", lease=lease)

    async def done() -> bool:
        # Asked when the leadership is taken: "done" is its living leader's note.
        return await contender.holder_note() == _DONE or await ended_since()

    keep = False
    try:
        if not await hold(
            contender, timeout=timeout, poll_interval=poll_interval, note=RUNNING, enough=done
        ):
            return False
        # Ours now; the holder before us may have finished during our wait: its
        # record was stored before it let go.
        if await ended_since():
            return False
        await job()
        await records.mark_done(name, None, fence=contender.fence)
        await contender.set_note(_DONE)
        keep = True
    finally:
        if not keep:
            await release_on_exit(contender, contender.release)
    _kept.contenders.append(contender)
    return True


async def _generation_lock(ipc: AsyncIPC, name: str, lease: float) -> Contender:
    """The lock of `name`'s runs with a generation: not the leadership that a
    run without one keeps for life, so that neither waits for the other."""
    return await coordination.contender(ipc, f"g.{name}", lease=lease)


async def reset_run_once(
    ipc: AsyncIPC,
    name: str,
    *,
    timeout: float | None = None,
    lease: float = DEFAULT_LEASE,
) -> None:
    """Forget that job `name` was done: the next `run_once` of it runs the job.

    For jobs run with a `generation`: waits for such a run in progress to end
    first (it takes the job's lock), so the record of that run cannot come back
    after the reset. Changing the `generation` is the other way to run a job
    again. A job run without a generation runs again at the next start-up of
    the fleet anyway; its leader's leadership is left alone.

    Example:
        >>> import asyncio, tempfile
        >>> from ivip_ipc_async import AsyncIPC
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         async def job():
        ...             pass
        ...         first = await run_once(ipc, "warm-up", job, generation=1)
        ...         await reset_run_once(ipc, "warm-up")
        ...         return first, await run_once(ipc, "warm-up", job, generation=1)
        >>> asyncio.run(main())
        (True, True)
    """
    check_name(name, "job")
    check_timing(lease, 1.0)
    contender = await _generation_lock(ipc, name, lease)
    try:
        await hold(contender, timeout=timeout, poll_interval=1.0, note=RUNNING)
        await JobRecords(ipc).forget(name)
    finally:
        await release_on_exit(contender, contender.release)
