"""`Medium`: what the layers above `AsyncIPC` use of it.

`AsyncCache`, the coordination layer (`Lock`, `Leadership`) and `run_once`'s
records need three things of an `AsyncIPC`, and only these: its backend,
started in this event loop and process (`started_backend()`), the mirror that
backend keeps current (`mirror`, `mirror_current`, `wait_mirror()`), and the
record size limit (`check_record_size`). `AsyncIPC` owns one `Medium`
(`ipc.medium`), keeps it current as it starts, stops and hears from its
backend, and reads it on its own hot paths; the layers above read it, and
never `AsyncIPC`'s private state. Passive: it holds state and starts nothing
itself but through the `start` it is given.

Example:
    >>> import asyncio, tempfile
    >>> from ivip_ipc_async import AsyncIPC
    >>> async def main():
    ...     ipc = AsyncIPC(tempfile.mkdtemp())
    ...     medium = ipc.medium
    ...     before = medium.ready()
    ...     backend = await medium.started_backend()  # starts ipc
    ...     after = medium.ready(), medium.mirror_current, backend is medium.backend
    ...     await ipc.destroy()
    ...     return before, after
    >>> asyncio.run(main())
    (False, (True, True, True))
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from . import forks, waiting
from .backends.base import Backend
from .errors import BackendUnavailableError
from .mirror import Mirror
from .records import HEADER_SIZE

__all__ = ["HasMedium", "Medium", "Tally", "check_record_size"]

HITS, MISSES, EXPIRED = 0, 1, 2  # the places of a cache's reads in its counts (`Tally.reads`)


class Tally:
    """What the layers above count for `AsyncIPC.stats()`: lock waits and
    holdings (`Lock`, `Leadership`), and the reads of every `AsyncCache` of
    the instance, which only grow (a cache object dropped keeps its part).

    Example:
        >>> tally = Tally()
        >>> class Cache: pass
        >>> cache = Cache()
        >>> tally.reads(cache)[HITS] += 2
        >>> del cache  # collected: its counts stay
        >>> tally.stats()["cache_hits"], tally.stats()["lock_waits"]
        (2, 0)
    """

    __slots__ = ("_live", "_retired", "hold_seconds", "holds", "wait_seconds", "waits")

    def __init__(self) -> None:
        self.waits = 0  # waits for a lock (`acquire`), ended won, timed out or cancelled
        self.wait_seconds = 0.0
        self.holds = 0  # holdings won (`acquire`, `try_acquire`)
        self.hold_seconds = 0.0  # of the holdings let go
        self._live: dict[int, list[int]] = {}  # id -> counts, of the caches alive
        self._retired = [0, 0, 0]  # the counts of the caches collected since

    def reads(self, cache: Any) -> list[int]:
        """The counts `[hits, misses, expired]` of `cache`'s reads, summed here
        while it lives and kept when it is collected.

        Example:
            >>> class Cache: pass
            >>> Tally().reads(Cache())
            [0, 0, 0]
        """
        counts = [0, 0, 0]
        key = id(counts)
        self._live[key] = counts
        weakref.finalize(cache, self._retire, key)
        return counts

    def _retire(self, key: int) -> None:
        counts = self._live.pop(key, None)
        if counts is not None:
            for i, n in enumerate(counts):
                self._retired[i] += n

    def stats(self) -> dict[str, Any]:
        """The figures for `AsyncIPC.stats()`.

        Example:
            >>> sorted(Tally().stats())  # doctest: +NORMALIZE_WHITESPACE
            ['cache_expirations', 'cache_hits', 'cache_misses', 'lock_hold_seconds',
             'lock_holds', 'lock_wait_seconds', 'lock_waits']
        """
        hits, misses, expired = self._retired
        for counts in list(self._live.values()):
            hits += counts[HITS]
            misses += counts[MISSES]
            expired += counts[EXPIRED]
        return {
            "lock_waits": self.waits,
            "lock_wait_seconds": self.wait_seconds,
            "lock_holds": self.holds,
            "lock_hold_seconds": self.hold_seconds,
            "cache_hits": hits,
            "cache_misses": misses,
            "cache_expirations": expired,
        }


class Medium:
    """One `AsyncIPC`'s started backend and cache mirror, as the layers above see them.

    Args:
        start: Starts the owner (`AsyncIPC.start`); called by `started_backend`
            when the backend is not started in this loop and process.

    Attributes:
        backend: The backend started last (None: not started, or destroyed).
        loop: The event loop it was started in.
        generation: The fork generation it was started in (`forks.generation`).
        mirror: Every cache's state in this process (replaced at each start,
            and when the backend drops it to rebuild it).
        mirror_current: False while the backend rebuilds the mirror (Redis
            reconnecting): cache reads then ask the backend (`Backend.fetch`).
        tally: What the layers above count for `stats()` (lock waits and
            holdings, cache reads).

    Example:
        >>> medium = Medium(start=lambda: asyncio.sleep(0))
        >>> medium.ready(), medium.mirror_current, medium.mirror.count()
        (False, True, 0)
    """

    __slots__ = (
        "_start",
        "_waiters",
        "backend",
        "generation",
        "loop",
        "mirror",
        "mirror_current",
        "tally",
    )

    def __init__(self, start: Callable[[], Awaitable[object]]) -> None:
        self._start = start
        self.backend: Backend | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.generation = -1
        self.mirror = Mirror()
        self.mirror_current = True
        self._waiters: list[asyncio.Future[None]] = []  # for the mirror to be current
        self.tally = Tally()

    def ready(self) -> bool:
        """True while the backend is started in the running loop of this process
        (outside a loop: in a loop that is not closed).

        Example:
            >>> Medium(start=lambda: asyncio.sleep(0)).ready()
            False
        """
        if self.backend is None or self.generation != forks.generation[0]:
            return False
        try:
            return self.loop is asyncio.get_running_loop()
        except RuntimeError:
            return self.loop is not None and not self.loop.is_closed()

    async def started_backend(self) -> Backend:
        """The backend, started in this loop and process (the owner is started
        first when it is not).

        Example:
            >>> import tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         backend = await ipc.medium.started_backend()
            ...         return type(backend).__name__
            >>> asyncio.run(main())
            'DirectoryBackend'
        """
        backend = self.backend
        if backend is not None and self.ready():
            return backend
        await self._start()
        assert self.backend is not None
        return self.backend

    def attach(self, backend: Backend, loop: asyncio.AbstractEventLoop) -> None:
        """The owner started `backend` in `loop` (in this process).

        Example:
            >>> import tempfile
            >>> from ivip_ipc_async.backends import open_backend
            >>> medium = Medium(start=lambda: asyncio.sleep(0))
            >>> async def main():
            ...     medium.attach(open_backend(tempfile.mkdtemp(), namespace=None,
            ...                                max_record_size=4096), asyncio.get_running_loop())
            ...     return medium.ready()
            >>> asyncio.run(main())
            True
        """
        self.backend, self.loop, self.generation = backend, loop, forks.generation[0]

    def detach(self) -> Backend | None:
        """Forget the backend (the owner stops, or restarts elsewhere); returns it.

        Example:
            >>> Medium(start=lambda: asyncio.sleep(0)).detach() is None
            True
        """
        backend, self.backend = self.backend, None
        return backend

    def reset_mirror(self) -> None:
        """A new, empty, current mirror (at each start: the backend loads it).

        Example:
            >>> medium = Medium(start=lambda: asyncio.sleep(0))
            >>> old = medium.mirror; medium.reset_mirror(); medium.mirror is old
            False
        """
        self.mirror = Mirror()
        self.mirror_current = True

    def set_mirror_current(self, current: bool) -> None:
        """What the backend says of the mirror (`RecordSink.mirror_ready`): not
        current drops it (the backend rebuilds it before it is current again);
        current again wakes those waiting in `wait_mirror`.

        Example:
            >>> medium = Medium(start=lambda: asyncio.sleep(0))
            >>> medium.set_mirror_current(False); medium.mirror_current
            False
        """
        if not current and self.mirror_current:
            self.mirror = Mirror()
        self.mirror_current = current
        if current:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait_mirror(self) -> None:
        """Wait for the mirror to be current again (the backend reconnecting),
        for the backend's `read_timeout` (5 s when it has none).

        Raises:
            BackendUnavailableError: still not current after that.

        Example:
            >>> asyncio.run(Medium(start=lambda: asyncio.sleep(0)).wait_mirror())  # current
        """
        if self.mirror_current:
            return
        timeout = float(getattr(self.backend, "read_timeout", 5.0))
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiting.wait_for(waiter, timeout)
        except TimeoutError:
            raise self.mirror_unavailable(timeout) from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def mirror_unavailable(self, timeout: float | None = None) -> BackendUnavailableError:
        """The error of a read that needs the whole mirror while it is not current.

        Example:
            >>> Medium(start=lambda: asyncio.sleep(0)).mirror_unavailable(5.0)
            BackendUnavailableError('the cache is being reloaded ... (not connected for 5s): ...')
        """
        waited = f" for {timeout:g}s" if timeout is not None else ""
        return BackendUnavailableError(
            f"the cache is being reloaded from the backend (not connected{waited}): "
            "its keys cannot be listed until it is"
        )


class HasMedium(Protocol):
    """What the coordination layer is given: an `AsyncIPC` (anything with a `Medium`).

    Example:
        >>> from ivip_ipc_async import AsyncIPC
        >>> ipc: HasMedium = AsyncIPC("/tmp/unused")
        >>> isinstance(ipc.medium, Medium)
        True
    """

    @property
    def medium(self) -> Medium:
        """The owner's `Medium`."""
        ...


def check_record_size(limit: int, name_len: int, data_len: int) -> None:
    """Refuse (`ValueError`) a record of a `name_len`-byte event or cache name
    and key, and `data_len` bytes of data, larger than `limit` bytes in all.

    Example:
        >>> check_record_size(1024, 5, 100)
        >>> check_record_size(1024, 5, 1000)
        Traceback (most recent call last):
        ...
        ValueError: record of 1057 bytes is over the limit of 1024 bytes (raise ...)
    """
    size = HEADER_SIZE + name_len + data_len
    if size > limit:
        raise ValueError(
            f"record of {size} bytes is over the limit of {limit} bytes "
            "(raise max_record_size, or send a reference to the data instead)"
        )
