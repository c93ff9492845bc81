"""`Lock` and `Leadership`: held by one process of a namespace at a time, on every backend.

Both are one idea, a holding of a named lock of the backend (`Holding`); they
differ in what they are for: `ipc.lock(name)` guards a piece of work, and is
let go when it is done; a `Leadership` is kept while its process lives (a
scheduler), and handed over when it dies. Each is exclusive across the
processes sharing `ipc`'s directory, or across every host on the same Redis
namespace. What each backend promises (see docs/coordination.md):

* **Directory**: the kernel's `flock`. Held until released or until the
  holder dies, however it dies: a waiter takes over at once. Never inherited
  by a forked child. Never lost while the holder lives.
* **Redis**: a lease of `lease` seconds, renewed while held. A holder that is
  killed, paused or cut off loses it when the lease runs out; then `held`
  reads False in that holder, and its fencing token (`fence`) is smaller
  than the next holder's, so a store that checks tokens refuses its writes.

Waiting never blocks the event loop, is cancellable, and is woken when the
lock is released (and on a timer, every `poll_interval` seconds, as a
safety net).

Example:
    >>> import asyncio, tempfile
    >>> from ivip_ipc_async import AsyncIPC
    >>> async def main():
    ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
    ...         async with ipc.lock("reports", timeout=5) as lock:
    ...             return lock.held, lock.fence
    >>> asyncio.run(main())
    (True, 1)
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar, Final, Self

from .backends.base import Contender
from .medium import HasMedium
from .waiting import CancelGuard

__all__ = ["Leadership", "Lock"]  # exported at the top; the rest serves run_once (jobs.py)

NAME: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")
DEFAULT_LEASE: Final = 10.0
"""Seconds a Redis lease outlives a holder that stopped renewing it."""
RUNNING: Final = "running"
"""The note a leader shows while it leads (`Contender.holder_note`)."""


def check_name(name: object, what: str) -> str:
    """A lock, leadership or job name: 1-100 letters, digits, `.`, `_`, `-`.

    Example:
        >>> check_name("reports.daily", "lock")
        'reports.daily'
    """
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(
            f"invalid {what} name {name!r}: use 1-100 letters, digits, '.', '_' "
            "and '-', not starting with '.' or '-'"
        )
    return name


def check_timeout(timeout: float | None) -> float | None:
    """A wait's timeout: None (as long as it takes) or seconds >= 0.

    Example:
        >>> check_timeout(None), check_timeout(2)
        (None, 2)
    """
    if timeout is not None and (isinstance(timeout, bool) or not timeout >= 0):
        raise ValueError(f"timeout must be None or seconds >= 0, not {timeout!r}")
    return timeout


async def contender(ipc: HasMedium, name: str, *, lease: float) -> Contender:
    """A new attempt at the backend's lock `name` (`<kind>.<name>`, see
    `LockProvider`), `ipc` started first if it is not.

    Example:
        >>> import asyncio, tempfile
        >>> from ivip_ipc_async import AsyncIPC
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         attempt = await contender(ipc, "u.reports", lease=DEFAULT_LEASE)
        ...         taken = await attempt.try_acquire()
        ...         await attempt.release()
        ...         return taken
        >>> asyncio.run(main())
        True
    """
    backend = await ipc.medium.started_backend()
    return backend.locks().contender(name, lease=float(lease))


def check_timing(lease: float, poll_interval: float) -> None:
    """Refuse a lease or poll interval that is not a positive number of seconds.

    Example:
        >>> check_timing(10.0, 0)
        Traceback (most recent call last):
        ...
        ValueError: poll_interval must be a positive number of seconds, not 0
    """
    for value, what in ((lease, "lease"), (poll_interval, "poll_interval")):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{what} must be a positive number of seconds, not {value!r}")


async def release_on_exit(
    contender: Contender | None, release: Callable[[], Awaitable[None]]
) -> None:
    """Let go at the end of an `async with`: shielded, so that a cancelled block
    still lets go now, not at the lease's expiry.

    Example:
        >>> import asyncio
        >>> async def release() -> None:
        ...     print("let go")
        >>> asyncio.run(release_on_exit(None, release))
        let go
    """
    if contender is None or not contender.held:
        await release()
        return
    releasing = asyncio.ensure_future(release())
    try:
        await asyncio.shield(releasing)
    except asyncio.CancelledError:
        await releasing
        raise


async def hold(
    contender: Contender,
    *,
    timeout: float | None,
    poll_interval: float,
    note: str = "",
    enough: Callable[[], Awaitable[bool]] | None = None,
) -> bool:
    """Wait until `contender` holds its lock: True; `TimeoutError` after `timeout`.

    `enough()`, asked before each wait, ends the wait early (False) when it says
    the lock is not needed any more (say, the job it guards is done).

    Whatever else ends the wait (a timeout, a cancellation) leaves nothing held,
    even when the lock was won in the very loop iteration the cancellation came
    in, or a wait swallowed it (3.11's `asyncio.wait_for`): the lock is let go,
    and the cancellation (or the timeout's `TimeoutError`) raised.

    Example:
        >>> import asyncio, tempfile
        >>> from ivip_ipc_async import AsyncIPC
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         attempt = await contender(ipc, "u.reports", lease=DEFAULT_LEASE)
        ...         won = await hold(attempt, timeout=5, poll_interval=1.0)
        ...         await attempt.release()
        ...         return won
        >>> asyncio.run(main())
        True
    """
    guard = CancelGuard()
    won = False
    try:
        async with asyncio.timeout(timeout):
            while not await contender.try_acquire(note):
                if enough is not None and await enough():
                    return False
                await contender.wait(poll_interval)
                guard.check()
            guard.check()  # won as the task was cancelled: not ours to keep
        won = True
        return True
    finally:
        if not won:
            # Shielded: a second cancellation must not leave a won lock held.
            await release_on_exit(contender, contender.release)


class Holding:
    """A holding of one named lock of the backend: what `Lock` and `Leadership` share.

    One object is one holding at a time; two objects of one name exclude each
    other in one process too. `async with` waits up to the object's `timeout`,
    and lets go at the end of the block, even when the block is cancelled.

    Example:
        >>> import asyncio, tempfile
        >>> from ivip_ipc_async import AsyncIPC
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         async with Lock(ipc, "reports") as lock:
        ...             return isinstance(lock, Holding), lock.held
        >>> asyncio.run(main())
        (True, True)
    """

    KIND: ClassVar[str] = "u"
    """The lock kind of the backend's lock names (`LockProvider`)."""
    NOTE: ClassVar[str] = ""
    """What a holder shows the others (`Contender.holder_note`)."""

    def __init__(
        self,
        ipc: HasMedium,
        name: str,
        *,
        timeout: float | None = None,
        lease: float = DEFAULT_LEASE,
        poll_interval: float = 1.0,
    ) -> None:
        self.ipc = ipc
        self.name = check_name(name, type(self).__name__.lower())
        check_timing(lease, poll_interval)
        self.timeout = check_timeout(timeout)
        self.lease = float(lease)
        self.poll_interval = float(poll_interval)
        self._contender: Contender | None = None
        self._since = 0.0  # monotonic time the holding began

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {'held' if self.held else 'not held'}>"

    @property
    def held(self) -> bool:
        """True while this object holds its lock, as far as this process knows.

        On Redis it turns False as soon as the lease could not be renewed in
        time (say, after this process was paused longer than the lease).

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         lock = ipc.lock("report")
            ...         async with lock:
            ...             inside = lock.held
            ...         return inside, lock.held
            >>> asyncio.run(main())
            (True, False)
        """
        return self._contender is not None and self._contender.held

    @property
    def fence(self) -> int:
        """The fencing token of this holding (0 before the first): every later
        holding of the lock has a larger one. Pass it to a store that refuses
        writes with a token smaller than the last it saw.

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         async with ipc.lock("report") as first:
            ...             pass
            ...         async with ipc.lock("report") as second:
            ...             return second.fence > first.fence
            >>> asyncio.run(main())
            True
        """
        return 0 if self._contender is None else self._contender.fence

    def _held_already(self) -> bool:
        """What `try_acquire` answers when this object holds its lock already."""
        raise RuntimeError(f"{self!r} is held already: use one object per holding")

    async def _next_contender(self) -> Contender:
        if self._contender is not None:
            await self._contender.release()
        self._contender = await contender(self.ipc, f"{self.KIND}.{self.name}", lease=self.lease)
        return self._contender

    def _won(self) -> None:
        self._since = time.monotonic()
        self.ipc.medium.tally.holds += 1

    async def try_acquire(self) -> bool:
        """Take the lock if it is free, without waiting; True when taken.

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         lock = ipc.lock("once")
            ...         return await lock.try_acquire(), await ipc.lock("once").try_acquire()
            >>> asyncio.run(main())
            (True, False)
        """
        if self.held:
            return self._held_already()
        attempt = await self._next_contender()
        try:
            taken = await attempt.try_acquire(self.NOTE)
        finally:
            if not attempt.held:
                await attempt.release()
        if taken:
            self._won()
        return taken

    async def acquire(self, timeout: float | None = None) -> None:
        """Wait until this object holds the lock; never blocks the event loop,
        cancellable while waiting.

        Args:
            timeout: Seconds to wait; None (the default) waits as long as it
                takes. (`async with` waits the object's `timeout`.)

        Raises:
            TimeoutError: the lock was not free within `timeout` seconds.
            RuntimeError: a `Lock` that holds its lock already.

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         holder, waiter = ipc.lock("report"), ipc.lock("report")
            ...         await holder.acquire()
            ...         try:
            ...             await waiter.acquire(timeout=0.05)
            ...         except TimeoutError:
            ...             await holder.release()
            ...         await waiter.acquire(timeout=1)
            ...         return waiter.held
            >>> asyncio.run(main())
            True
        """
        if self.held and not self._held_already():
            return
        check_timeout(timeout)
        attempt = await self._next_contender()
        tally = self.ipc.medium.tally
        began = time.monotonic()
        try:
            await hold(attempt, timeout=timeout, poll_interval=self.poll_interval, note=self.NOTE)
        finally:
            tally.waits += 1
            tally.wait_seconds += time.monotonic() - began
            if not attempt.held:
                await attempt.release()
        self._won()

    async def verify(self) -> bool:
        """Ask the medium whether this object still holds the lock.

        Always `held` on the directory; on Redis one round trip, which also
        turns `held` False when the lease was lost.

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         async with ipc.lock("report") as lock:
            ...             return await lock.verify()
            >>> asyncio.run(main())
            True
        """
        return self._contender is not None and await self._contender.verify()

    async def release(self) -> None:
        """Let go (a waiter takes over at once). Safe to repeat.

        On Redis, a lease that expired and was taken by another is left alone.

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         lock = ipc.lock("report")
            ...         await lock.acquire()
            ...         await lock.release(); await lock.release()
            ...         return lock.held, await ipc.lock("report").try_acquire()
            >>> asyncio.run(main())
            (False, True)
        """
        attempt = self._contender
        if attempt is None:
            return
        if self._since:
            self.ipc.medium.tally.hold_seconds += time.monotonic() - self._since
            self._since = 0.0
        await attempt.release()

    async def __aenter__(self) -> Self:
        await self.acquire(self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await release_on_exit(self._contender, self.release)


class Lock(Holding):
    """A lock across the processes of `ipc`'s namespace (and hosts, on Redis).

    Made by `AsyncIPC.lock`; one object is one holding at a time (make one per
    `async with`). Two `Lock`s of one name exclude each other in one process too.

    Args:
        ipc: The `AsyncIPC` whose medium keeps the lock (started if it is not).
        name: 1-100 letters, digits, `.`, `_`, `-`.
        timeout: Seconds `async with` waits; `TimeoutError` after. None: wait
            as long as it takes.
        lease: Redis only: seconds a holder that stopped renewing (killed,
            paused, cut off) keeps the lock. It is renewed every `lease / 3`
            seconds while held. The directory's kernel lock has no lease.
        poll_interval: Seconds between tries while waiting, the safety net
            behind the release notices.

    Example:
        >>> import asyncio, tempfile
        >>> from ivip_ipc_async import AsyncIPC
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         first, second = ipc.lock("token-refresh"), ipc.lock("token-refresh")
        ...         got = await first.try_acquire(), await second.try_acquire()
        ...         await first.release()
        ...         await second.acquire(timeout=5)
        ...         fences = first.fence, second.fence
        ...         await second.release()
        ...         return got, fences
        >>> asyncio.run(main())
        ((True, False), (1, 2))

        Refresh a token in one worker of many; the others wait, then reuse it::

            async with ipc.lock("token-refresh", timeout=30):
                token = await cache.get("token")
                if token is None:
                    token = await fetch_token()
                    await cache.set("token", token, ttl=3000)
    """

    KIND = "u"


class Leadership(Holding):
    """The leadership of `name` among the processes sharing `ipc`'s medium:
    work that must keep running in exactly one process (a scheduler), handed
    over when that process dies.

    At most one `Leadership` of a name leads at a time, across processes (and
    hosts, on Redis) and within one process. On the directory the lock is the
    kernel's: released when the leader lets go, closes, or dies (even
    `kill -9`: a waiting follower takes over at once). On Redis it is a lease
    of `lease` seconds, renewed while the leader lives; a leader that lost it
    reads `held == False`. `try_acquire` while leading answers True.

    Args:
        ipc: An `AsyncIPC` on any backend; started if it is not.
        name: What is led, e.g. "scheduler": 1-100 letters, digits, `.`, `_`, `-`.
        timeout: Seconds `async with` waits to lead; None: as long as it takes.
        lease: Redis only: seconds a leader that stopped renewing keeps leading.
        poll_interval: Seconds between tries while waiting to lead (the safety
            net: a release wakes followers at once).

    Example:
        >>> import asyncio, tempfile
        >>> from ivip_ipc_async import AsyncIPC
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         first, second = Leadership(ipc, "jobs"), Leadership(ipc, "jobs")
        ...         got = await first.try_acquire(), await second.try_acquire()
        ...         await first.release()
        ...         await second.acquire(timeout=5)
        ...         return got, first.held, second.held
        >>> asyncio.run(main())
        ((True, False), False, True)

        Work that must run in one process only, handed over when it dies::

            async with Leadership(ipc, "scheduler") as leadership:  # waits to lead
                while leadership.held:
                    await run_due_jobs()
                    await asyncio.sleep(60)
    """

    KIND = "l"
    NOTE = RUNNING

    def _held_already(self) -> bool:
        return True
