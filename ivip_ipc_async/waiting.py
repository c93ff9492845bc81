"""Waits that never lose a cancellation, on every Python this library supports.

On Python 3.11, `asyncio.wait_for(aw, timeout)` returns `aw`'s result when
`aw` finishes in the same loop iteration as the caller is cancelled: the
`CancelledError` is swallowed. Inside `asyncio.timeout(...)` the deadline is
then lost (the block ends normally, no `TimeoutError`), and a task that
shutdown cancels keeps running (a lock wait returns holding the lock). 3.12
rewrote `wait_for` on `asyncio.timeout`; this module gives every version those
semantics, and a guard for waits the library does not control:

* `wait_for(aw, timeout)`: as 3.12's `asyncio.wait_for`.
* `wait_event(event, timeout)`: wait for an `asyncio.Event`, True when set.
* `cancel_and_wait(task)`: stop a helper task, without swallowing the
  caller's own cancellation while waiting for it.
* `CancelGuard`: taken before a wait loop, `check()` raises `CancelledError`
  when a cancellation of the current task was requested since and swallowed
  (say, by a third-party wait): a lock won in that iteration is then let go
  by the caller's cleanup, and the enclosing `asyncio.timeout` raises
  `TimeoutError` as it should.

Example:
    >>> import asyncio
    >>> async def main():
    ...     event = asyncio.Event()
    ...     asyncio.get_running_loop().call_later(0.01, event.set)
    ...     return await wait_event(event, 5), await wait_event(asyncio.Event(), 0.01)
    >>> asyncio.run(main())
    (True, False)
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

__all__ = ["CancelGuard", "cancel_and_wait", "wait_event", "wait_for"]

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """`aw`'s result, or `TimeoutError` after `timeout` seconds (None: no limit).

    As `asyncio.wait_for` on 3.12+: `aw` is cancelled on timeout, and a
    cancellation of the caller always propagates, even when `aw` finished in
    the same loop iteration (3.11's `wait_for` returned its result instead).

    Example:
        >>> import asyncio
        >>> async def main():
        ...     try:
        ...         await wait_for(asyncio.sleep(5), 0.01)
        ...     except TimeoutError:
        ...         return "timed out"
        >>> asyncio.run(main())
        'timed out'
    """
    if sys.version_info >= (3, 12):
        return await asyncio.wait_for(aw, timeout)
    if timeout is not None and timeout <= 0:
        fut = asyncio.ensure_future(aw)
        if fut.done():
            return fut.result()
        fut.cancel()
        try:
            await fut
        except asyncio.CancelledError as exc:
            raise TimeoutError from exc
        return fut.result()
    # Awaited in this task, not in a task of its own: nothing can finish "beside"
    # the cancellation and win over it.
    async with asyncio.timeout(timeout):
        return await aw


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until `event` is set (True) or `timeout` seconds passed (False).

    A cancellation of the caller always propagates, even when the event is set
    in the same loop iteration.

    Example:
        >>> import asyncio
        >>> async def main():
        ...     event = asyncio.Event()
        ...     event.set()
        ...     return await wait_event(event, 0)
        >>> asyncio.run(main())
        True
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        # Only this block's own deadline ends as TimeoutError here: an enclosing
        # timeout's cancellation leaves it as CancelledError.
        return False
    return True


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel `task` (a helper this code owns) and wait until it has ended.

    Its `CancelledError` is absorbed, but not the caller's: if the caller is
    cancelled meanwhile, that propagates (the helper still ends). Its other
    exceptions are not raised.

    Example:
        >>> import asyncio
        >>> async def main():
        ...     helper = asyncio.ensure_future(asyncio.sleep(5))
        ...     await cancel_and_wait(helper)
        ...     return helper.cancelled()
        >>> asyncio.run(main())
        True
    """
    task.cancel()
    # `asyncio.wait` never swallows the caller's cancellation (the helper, already
    # cancelled, still ends on its own).
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: a helper's failure is reported where it happens


class CancelGuard:
    """Notices a cancellation of the current task that some wait swallowed.

    Take one before a wait loop; call `check()` after each wait and after the
    wait is won: it raises `CancelledError` if the task was asked to cancel
    since the guard was taken and nothing raised it. Inside `asyncio.timeout`,
    that `CancelledError` becomes the `TimeoutError` the deadline owes.

    Example:
        >>> import asyncio
        >>> async def swallowing_wait():  # say, 3.11's wait_for in a library
        ...     try:
        ...         await asyncio.sleep(5)
        ...     except asyncio.CancelledError:
        ...         pass
        >>> async def main():
        ...     guard, task = CancelGuard(), asyncio.current_task()
        ...     asyncio.get_running_loop().call_later(0.01, task.cancel)
        ...     await swallowing_wait()
        ...     try:
        ...         guard.check()
        ...     except asyncio.CancelledError:
        ...         task.uncancel()
        ...         return "raised"
        >>> asyncio.run(main())
        'raised'
    """

    __slots__ = ("_baseline", "_task")

    def __init__(self) -> None:
        self._task = asyncio.current_task()
        self._baseline = self._task.cancelling() if self._task is not None else 0

    def pending(self) -> bool:
        """True when a cancellation was requested since the guard was taken and
        has not been undone (`uncancel`) by whoever handled it."""
        return self._task is not None and self._task.cancelling() > self._baseline

    def check(self) -> None:
        """Raise `CancelledError` if `pending()`."""
        if self.pending():
            raise asyncio.CancelledError
