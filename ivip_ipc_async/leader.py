"""Leader election among the processes of one namespace, and jobs that run once.

Built on the backend's lock capability (see `ivip_ipc_async.coordination`), so
both tools work the same on the shared directory and on Redis:

* Directory: one process at a time holds the kernel's `flock` of the name. The
  kernel releases it when the leader dies, however it dies (even `kill -9`),
  and a waiting follower takes over at once (woken by the lock file's inotify
  events, with a timer as the safety net).
* Redis: the leader holds a lease, renewed while it lives; a leader that is
  killed, paused or cut off loses it after `lease` seconds, and a follower
  takes over. A leader that lost its lease reads `is_leader == False`.

Two tools:

* `run_once(ipc, name, job)`: start-up jobs (migrations, warming a cache) that
  must run in one worker of a fleet, while the others wait until it is done;
  once per start-up of the fleet, or once per `generation` (a release),
  recorded durably in the namespace (see `jobs`).
* `Leadership(ipc, name)`: work that must keep running in exactly one process
  (a scheduler), handed over when that process dies.

Example:
    >>> import asyncio, tempfile
    >>> from ivip_ipc_async import AsyncIPC
    >>> async def main():
    ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
    ...         ran = []
    ...         async def migrate():
    ...             ran.append("migrated")
    ...         first = await run_once(ipc, "migrations", migrate)
    ...         again = await run_once(ipc, "migrations", migrate)  # done: not again
    ...         return first, again, ran
    >>> asyncio.run(main())
    (True, False, ['migrated'])
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from .coordination import DEFAULT_LEASE, check_name, check_timing, hold, release_on_exit
from .jobs import JobRecords, check_generation, record_key

if TYPE_CHECKING:
    from .backends.base import Contender
    from .ipc import AsyncIPC

__all__ = ["Leadership", "reset_run_once", "run_once"]

_DONE: Final = "done"
_RUNNING: Final = "running"

# Leaderships won by `run_once` without a generation, kept for the life of the
# process (or of its event loop, or of its `AsyncIPC`): while one is held with
# the note "done", later callers know the job was done in this start-up.
# A forked child keeps none of them.
_kept: list[Contender] = []
os.register_at_fork(after_in_child=_kept.clear)


class Leadership:
    """The leadership of `name` among the processes sharing `ipc`'s medium.

    At most one `Leadership` of a name leads at a time, across processes (and
    hosts, on Redis) and within one process. On the directory the lock is the
    kernel's: released when the leader lets go, closes, or dies. On Redis it is
    a lease of `lease` seconds, renewed while the leader lives.

    Args:
        ipc: An `AsyncIPC` on any backend; started if it is not.
        name: What is led, e.g. "scheduler": 1-100 letters, digits, `.`, `_`, `-`.
        poll_interval: Seconds between tries while waiting to lead (the safety
            net: a release wakes followers at once).
        lease: Redis only: seconds a leader that stopped renewing keeps leading.

    Example:
        >>> import asyncio, tempfile
        >>> from ivip_ipc_async import AsyncIPC
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         first, second = Leadership(ipc, "jobs"), Leadership(ipc, "jobs")
        ...         got = await first.try_acquire(), await second.try_acquire()
        ...         await first.release()
        ...         await second.acquire(timeout=5)
        ...         return got, first.is_leader, second.is_leader
        >>> asyncio.run(main())
        ((True, False), False, True)

        Work that must run in one process only, handed over when it dies::

            async with Leadership(ipc, "scheduler") as leadership:  # waits to lead
                while leadership.is_leader:
                    await run_due_jobs()
                    await asyncio.sleep(60)
    """

    def __init__(
        self,
        ipc: AsyncIPC,
        name: str,
        *,
        poll_interval: float = 1.0,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        self.ipc = ipc
        self.name = check_name(name, "leadership")
        check_timing(lease, poll_interval)
        self.poll_interval = float(poll_interval)
        self.lease = float(lease)
        self._contender: Contender | None = None

    def __repr__(self) -> str:
        state = "leading" if self.is_leader else "following"
        return f"<Leadership {self.name!r} {state}>"

    @property
    def is_leader(self) -> bool:
        """True while this object holds the leadership (on Redis: its lease is current).

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         leadership = Leadership(ipc, "scheduler")
            ...         before = leadership.is_leader
            ...         async with leadership:
            ...             return before, leadership.is_leader
            >>> asyncio.run(main())
            (False, True)
        """
        return self._contender is not None and self._contender.held

    @property
    def fence(self) -> int:
        """The fencing token of this leadership (see `Lock.fence`); 0 before leading.

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         leadership = Leadership(ipc, "scheduler")
            ...         before = leadership.fence
            ...         async with leadership:
            ...             return before, leadership.fence > 0
            >>> asyncio.run(main())
            (0, True)
        """
        return 0 if self._contender is None else self._contender.fence

    async def _contend(self) -> Contender:
        if self._contender is None:
            backend = await self.ipc._ensure()
            self._contender = backend.locks().contender(f"l.{self.name}", lease=self.lease)
        return self._contender

    async def try_acquire(self) -> bool:
        """Take the leadership if it is free, without waiting; True when held.

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         leadership = Leadership(ipc, "once")
            ...         return await leadership.try_acquire(), await leadership.try_acquire()
            >>> asyncio.run(main())
            (True, True)
        """
        contender = await self._contend()
        if await contender.try_acquire(_RUNNING):
            return True
        await self.release()  # nothing held: close what the try opened
        return False

    async def acquire(self, timeout: float | None = None) -> None:
        """Wait until this object leads; `TimeoutError` after `timeout` seconds.

        Never blocks the event loop; cancellable while waiting.

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         first, second = Leadership(ipc, "jobs"), Leadership(ipc, "jobs")
            ...         await first.acquire()
            ...         try:
            ...             await second.acquire(timeout=0.05)
            ...         except TimeoutError:
            ...             waited = "timed out"
            ...         await first.release()
            ...         return waited
            >>> asyncio.run(main())
            'timed out'
        """
        contender = await self._contend()
        try:
            await hold(contender, timeout=timeout, poll_interval=self.poll_interval, note=_RUNNING)
        finally:
            if not contender.held:
                await self.release()

    async def release(self) -> None:
        """Let go: a waiting follower takes over at once. Safe to repeat.

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         first, second = Leadership(ipc, "jobs"), Leadership(ipc, "jobs")
            ...         await first.acquire()
            ...         await first.release(); await first.release()
            ...         return await second.try_acquire()
            >>> asyncio.run(main())
            True
        """
        contender, self._contender = self._contender, None
        if contender is not None:
            await contender.release()

    async def __aenter__(self) -> Leadership:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await release_on_exit(self._contender, self.release)


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
            note=_RUNNING,
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

    leadership = Leadership(ipc, name, poll_interval=poll_interval, lease=lease)
    contender = await leadership._contend()

    async def done() -> bool:
        # Asked when the leadership is taken: "done" is its living leader's note.
        return await contender.holder_note() == _DONE or await ended_since()

    keep = False
    try:
        if not await hold(
            contender, timeout=timeout, poll_interval=poll_interval, note=_RUNNING, enough=done
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
    _kept.append(contender)
    return True


async def _generation_lock(ipc: AsyncIPC, name: str, lease: float) -> Contender:
    """The lock of `name`'s runs with a generation: not the leadership that a
    run without one keeps for life, so that neither waits for the other."""
    backend = await ipc._ensure()
    return backend.locks().contender(f"g.{name}", lease=float(lease))


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
        await hold(contender, timeout=timeout, poll_interval=1.0, note=_RUNNING)
        await JobRecords(ipc).forget(name)
    finally:
        await release_on_exit(contender, contender.release)
