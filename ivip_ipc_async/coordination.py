"""`Lock`: a lock shared by the processes of a namespace, on every backend.

`ipc.lock(name)` is exclusive across the processes sharing `ipc`'s directory,
or across every host on the same Redis namespace. What each backend promises
(see docs/coordination.md):

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
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from .waiting import CancelGuard

if TYPE_CHECKING:
    from .backends.base import Contender
    from .ipc import AsyncIPC

__all__ = ["Lock"]

NAME: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")
DEFAULT_LEASE: Final = 10.0


def check_name(name: object, what: str) -> str:
    """A lock, leadership or job name: 1-100 letters, digits, `.`, `_`, `-`."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(
            f"invalid {what} name {name!r}: use 1-100 letters, digits, '.', '_' "
            "and '-', not starting with '.' or '-'"
        )
    return name


def check_timing(lease: float, poll_interval: float) -> None:
    """Refuse a lease or poll interval that is not a positive number of seconds."""
    for value, what in ((lease, "lease"), (poll_interval, "poll_interval")):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{what} must be a positive number of seconds, not {value!r}")


async def release_on_exit(
    contender: Contender | None, release: Callable[[], Awaitable[None]]
) -> None:
    """Let go at the end of an `async with`: shielded, so that a cancelled block
    still lets go now, not at the lease's expiry."""
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


class Lock:
    """A lock across the processes of `ipc`'s namespace (and hosts, on Redis).

    Made by `AsyncIPC.lock`; one object is one holding at a time (make one per
    `async with`). Two `Lock`s of one name exclude each other in one process too.

    Args:
        ipc: The `AsyncIPC` whose medium keeps the lock (started if it is not).
        name: 1-100 letters, digits, `.`, `_`, `-`.
        timeout: Seconds `async with` (and `acquire()`) waits; `TimeoutError`
            after. None: wait as long as it takes.
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

    def __init__(
        self,
        ipc: AsyncIPC,
        name: str,
        *,
        timeout: float | None = None,
        lease: float = DEFAULT_LEASE,
        poll_interval: float = 1.0,
    ) -> None:
        self.ipc = ipc
        self.name = check_name(name, "lock")
        check_timing(lease, poll_interval)
        if timeout is not None and (isinstance(timeout, bool) or not timeout >= 0):
            raise ValueError(f"timeout must be None or seconds >= 0, not {timeout!r}")
        self.timeout = timeout
        self.lease = float(lease)
        self.poll_interval = float(poll_interval)
        self._kind = "u"
        self._contender: Contender | None = None

    def __repr__(self) -> str:
        return f"<Lock {self.name!r} {'held' if self.held else 'not held'}>"

    @property
    def held(self) -> bool:
        """True while this object holds the lock, as far as this process knows.

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

    async def _new_contender(self) -> Contender:
        if self.held:
            raise RuntimeError(f"{self!r} is held already: use one Lock object per holding")
        if self._contender is not None:
            await self._contender.release()
        backend = await self.ipc._ensure()
        self._contender = backend.locks().contender(f"{self._kind}.{self.name}", lease=self.lease)
        return self._contender

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
        contender = await self._new_contender()
        try:
            taken = await contender.try_acquire()
        finally:
            if not contender.held:
                await contender.release()
        return taken

    async def acquire(self, timeout: float | None = -1.0) -> None:
        """Wait until this object holds the lock.

        Args:
            timeout: Seconds to wait (the object's `timeout` when not given);
                None waits as long as it takes.

        Raises:
            TimeoutError: the lock was not free within `timeout` seconds.
            RuntimeError: this object holds the lock already.

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
        if timeout is not None and timeout < 0:
            timeout = self.timeout
        contender = await self._new_contender()
        await hold(contender, timeout=timeout, poll_interval=self.poll_interval)

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
        """Let go of the lock (a waiter takes it at once). Safe to repeat.

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
        contender = self._contender
        if contender is not None:
            await contender.release()

    async def __aenter__(self) -> Lock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await release_on_exit(self._contender, self.release)
