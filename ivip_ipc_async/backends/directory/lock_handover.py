"""How a lock is handed over: its waiters woken when the holder lets go.

A holder lets go of a lock by closing its file (`locks.py`: at release, or
when it dies, the kernel closes it), and the next waiter takes it. What wakes
the waiters is one inotify instance per `DirectoryLocks`, `LockWakeups`: one
watch, on `locks/` itself, read by the event loop; every event names the lock
file it concerns, and wakes the waiters of that name only. A hundred waiters
on a hundred locks cost one descriptor (the per-user limit,
`fs.inotify.max_user_instances`, is often 128), opened when the first waits
and closed when the last stops.

A waiter is woken when a lock file is closed after being opened for writing
(a holder's release or death: `IN_CLOSE_WRITE`), written (a note), changed,
created, deleted or renamed; an overflow of the queue, or `locks/` itself going
away, wakes every waiter. A wake-up only says "try again": the waiter's timer
is the safety net for anything missed, and the waiter then tries the `flock`
without blocking, so whoever tries first after the release holds the lock.

Depends on: `inotify`, `logs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Final

from ...logs import logger
from .inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    open_inotify,
    read_events,
)

__all__ = ["LockWakeups"]

_IN_MASK: Final = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_CREATE
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)


class LockWakeups:
    """One inotify watch on `locks/` (the directory `dir_fd`), read by `loop`,
    waking the waiters registered under the name of the file an event concerns.

    Raises OSError when inotify is not to be had (then waiters use their timer).

    Example:
        >>> import os, tempfile
        >>> from ivip_ipc_async.waiting import wait_event
        >>> async def main():
        ...     fd = os.open(tempfile.mkdtemp(), os.O_RDONLY)
        ...     wakeups = LockWakeups(asyncio.get_running_loop(), fd)
        ...     event = wakeups.add("u.a")
        ...     os.close(os.open("u.a", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
        ...     await wait_event(event, 5)
        ...     wakeups.close(); os.close(fd)
        ...     return event.is_set()
        >>> asyncio.run(main())
        True
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, dir_fd: int) -> None:
        self.loop = loop
        self.fd: int | None = open_inotify([(dir_fd, None, _IN_MASK)])
        self._waiting: dict[str, set[asyncio.Event]] = {}
        try:
            loop.add_reader(self.fd, self._on_events)
        except (NotImplementedError, OSError):  # a loop that cannot watch a descriptor
            self.forget()
            raise OSError("the event loop cannot watch an inotify descriptor") from None

    def add(self, name: str) -> asyncio.Event:
        """A new event, set by every later change to lock file `name`."""
        event = asyncio.Event()
        self._waiting.setdefault(name, set()).add(event)
        return event

    def discard(self, name: str, event: asyncio.Event) -> bool:
        """Stop waking `event`; True when nobody waits here any more."""
        events = self._waiting.get(name)
        if events is not None:
            events.discard(event)
            if not events:
                del self._waiting[name]
        return not self._waiting

    def _on_events(self) -> None:
        if self.fd is None:
            return
        try:
            events = read_events(self.fd)
        except OSError as exc:  # never expected: wake everyone, their timers remain
            logger.warning("could not read the lock waiters' inotify events: %s", exc)
            events = [(-1, 0, "")]
        for _wd, _mask, name in events:
            # No name: an overflow, or locks/ itself went away: everyone looks.
            targets = self._waiting.get(name, ()) if name else self._every()
            for event in targets:
                event.set()

    def _every(self) -> list[asyncio.Event]:
        return [event for events in self._waiting.values() for event in events]

    def close(self) -> None:
        """Stop watching; every waiter is woken, to try again and register anew."""
        fd = self.fd
        if fd is not None and not self.loop.is_closed():
            with contextlib.suppress(Exception):
                self.loop.remove_reader(fd)
            for event in self._every():
                event.set()
        self.forget()

    def forget(self) -> None:
        """Close the descriptor without touching the event loop (a forked child's
        loop shares its epoll instance with the parent's)."""
        fd, self.fd = self.fd, None
        self._waiting.clear()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
