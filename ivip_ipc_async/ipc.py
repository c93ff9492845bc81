"""`AsyncIPC`: events between processes, and the dispatch that feeds caches.

Flow, one way only: `notify` -> record -> codec -> backend write -> (file) ->
peer's backend read -> `AsyncIPC` dispatch -> handlers, and cache records ->
the mirror that `AsyncCache` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
import time
from asyncio import get_running_loop as _running_loop  # (a coroutine always has one)
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from time import perf_counter as _clock
from typing import Any, Final

from . import forks, waiting
from .backends import backend_imports, check_url, open_backend
from .backends.base import Backend
from .clock import HybridLogicalClock
from .coordination import Lock
from .emitter import Emitter, Handler, MessageStream, Subscription
from .errors import IPCClosedError
from .logs import logger
from .medium import Medium, check_record_size
from .mirror import Mirror
from .records import (
    HEADER_SIZE,
    MAX_NAME_BYTES,
    Codec,
    Kind,
    Record,
    _new_record,
    codec_named,
    decode_key,
)

_MESSAGE = Kind.MESSAGE  # a module global: `Kind.MESSAGE` is a class lookup of ~75 ns

__all__ = ["GAP_EVENT", "AsyncIPC"]

GAP_EVENT = "ivip:gap"
"""Local event emitted when records were lost to this process (it fell more than
the retention window behind; on Redis, also when Redis lost the namespace's
keys): the message is `{"peer": id, "lost": count}`, `count` None when how many
is unknown (maybe none). The cache reloads itself (from the snapshot, or from
Redis); `stats()` counts `gaps` and `records_lost`; `health()` is unhealthy for
`AsyncIPC.unhealthy_after_gap` seconds.

Example:
    >>> from ivip_ipc_async import GAP_EVENT
    >>> ipc = AsyncIPC("/tmp/unused")
    >>> sub = ipc.on(GAP_EVENT, lambda gap: print("lost", gap["lost"], "from", gap["peer"]))
    >>> GAP_EVENT
    'ivip:gap'
"""


# Event names whose size `notify` keeps, and the longest kept (an application
# that makes a new name per call, or long names, pays the check each time; the
# dict stays under ~300 KiB).
_EVENT_SIZES_KEPT: Final = 1024
_EVENT_NAME_KEPT: Final = 256

# Bumped in a forked child, so an instance notices that its files belong to the
# parent without a getpid() system call on every cache read (a module global
# here: the hot path reads it).
_fork_generation = forks.generation


class _FromEnvironment:
    """The default of `slow_handler_threshold`: read `$IVIP_IPC_SLOW_HANDLER`."""

    def __repr__(self) -> str:
        return "$IVIP_IPC_SLOW_HANDLER or 0.05"


_FROM_ENVIRONMENT: Final = _FromEnvironment()


class AsyncIPC:
    """Events between the processes that share a directory.

    Args:
        path: The shared directory. None: `$IVIP_IPC_DIR` if set, else a private
            per-user directory where processes started from the same working
            directory meet (see the README, "Where processes meet").
        namespace: A sub-space of `path`: instances in different namespaces do
            not hear each other. Defaults to "default" with a path, and to a
            name derived from the working directory without one.
        backend: A ready backend object, for full control (overrides `path`).
        codec: How messages and cache values become bytes: a `Codec`, or "json"
            (the default, stdlib) or "orjson" (faster; the `fast` extra). None:
            `$IVIP_IPC_CODEC`, else "json". Nothing read is ever executed.
        max_record_size: Largest record in bytes; bigger ones raise `ValueError`.
        slow_handler_threshold: Seconds a sync handler may hold the event loop
            before a warning names it and the event (at most once per handler
            and event per `slow_handler_log_interval` seconds; every one counted
            in `stats()["slow_handlers"]`). None or 0: no warnings. Default:
            `$IVIP_IPC_SLOW_HANDLER` if set (seconds, or "off"), else 0.05.
        **backend_options: Passed to the backend (see `DirectoryBackend`).

    Example:
        >>> import asyncio, tempfile
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         got = []
        ...         ipc.on("greet", got.append)
        ...         await ipc.notify("greet", {"name": "Ana"}, include_self=True)
        ...         return got
        >>> asyncio.run(main())
        [{'name': 'Ana'}]
    """

    unhealthy_after_gap: float = 60.0
    """Seconds `health()` stays unhealthy after a gap (then healthy again, if
    nothing else is wrong). Set it on the class or on one instance."""

    DEFAULT_SLOW_HANDLER_THRESHOLD: Final = 0.05
    """Seconds, when neither the argument nor `$IVIP_IPC_SLOW_HANDLER` says."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        namespace: str | None = None,
        backend: Backend | None = None,
        codec: Codec | str | None = None,
        max_record_size: int = 16 << 20,
        slow_handler_threshold: float | _FromEnvironment | None = _FROM_ENVIRONMENT,
        **backend_options: Any,
    ) -> None:
        if namespace is not None:
            from .namespaces import check_namespace

            check_namespace(namespace)
        if max_record_size < 1024:
            raise ValueError("max_record_size must be at least 1024 bytes")
        if isinstance(path, str):
            check_url(path)
        self._path = path
        self._namespace = namespace
        self._given_backend = backend
        self._backend_options = backend_options
        if codec is None:
            codec = os.environ.get("IVIP_IPC_CODEC", "json")
        self.codec: Codec = codec_named(codec) if isinstance(codec, str) else codec
        self.max_record_size = max_record_size
        self._emitter = Emitter()
        if isinstance(slow_handler_threshold, _FromEnvironment):
            slow_handler_threshold = _threshold_from_environment(
                self.DEFAULT_SLOW_HANDLER_THRESHOLD
            )
        self.slow_handler_threshold = slow_handler_threshold
        self.clock = HybridLogicalClock()
        self.medium = Medium(self.start)
        """The started backend and the cache mirror, as `AsyncCache` and the
        coordination layer use them (see `ivip_ipc_async.medium`)."""
        self._starting: asyncio.Future[None] | None = None
        self._foreign_codec_warned: set[int] = set()
        self._last_gap: tuple[float, int | None] | None = None  # (monotonic time, lost)
        self._sink = _Sink(self)
        # Of the started backend, for `notify`: its node id, and its optional
        # synchronous write (`DirectoryBackend.write_now`).
        self._node = 0
        self._write_now: Callable[[Sequence[Record]], bool] | None = None
        # UTF-8 sizes of the event names `notify` was given (checked once each):
        # a lookup instead of a check and an encode per call.
        self._event_sizes: dict[str, int] = {}

    # -- life ---------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True while started in the running loop of this process.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     ipc = AsyncIPC(tempfile.mkdtemp())
            ...     before = ipc.started
            ...     async with ipc:
            ...         during = ipc.started
            ...     return before, during, ipc.started
            >>> asyncio.run(main())
            (False, True, False)
        """
        return self.medium.ready()

    @property
    def namespace(self) -> str | None:
        """The namespace given to the constructor (None: chosen at start, see
        the constructor; `stats()` names the one in use once started).

        Example:
            >>> AsyncIPC("/tmp/unused", namespace="shop").namespace
            'shop'
        """
        return self._namespace

    @property
    def mirror(self) -> Mirror:
        """Every cache's state in this process, as `AsyncCache` reads it
        (`medium.mirror`: replaced at each start).

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncCache
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         await AsyncCache(ipc).set("k", 1)
            ...         return ipc.mirror.live_keys("default")
            >>> asyncio.run(main())
            ['k']
        """
        return self.medium.mirror

    async def start(self) -> AsyncIPC:
        """Join the shared directory and start receiving. Idempotent.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     ipc = AsyncIPC(tempfile.mkdtemp())
            ...     await ipc.start(); await ipc.start()
            ...     started = ipc.started
            ...     await ipc.destroy()
            ...     return started, ipc.started
            >>> asyncio.run(main())
            (True, False)
        """
        loop = asyncio.get_running_loop()
        medium = self.medium
        while not medium.ready():
            starting = self._starting
            if starting is None or starting.get_loop() is not loop:
                break
            await asyncio.shield(starting)
        else:
            return self
        self._drop_stale()
        self._starting = done = loop.create_future()
        try:
            for module in backend_imports(self._path):
                if module not in sys.modules:  # the first start: imported off the loop
                    with contextlib.suppress(ImportError):  # open_backend says what to install
                        await asyncio.to_thread(importlib.import_module, module)
            backend = self._make_backend()
            medium.reset_mirror()
            await backend.start(self._sink)
            medium.attach(backend, loop)
            self._node = backend.node
            self._write_now = getattr(backend, "write_now", None)
        finally:
            self._starting = None
            done.set_result(None)
        return self

    def _drop_stale(self) -> None:
        """Forget a backend started in a loop that is gone, or in the parent process."""
        backend = self.medium.detach()
        if backend is None:
            return
        if self.medium.generation == _fork_generation[0]:
            backend.abandon()
        # After a fork the files belong to the parent: leave them alone.

    def _make_backend(self) -> Backend:
        if self._given_backend is not None:
            return self._given_backend
        return open_backend(
            self._path,
            namespace=self._namespace,
            max_record_size=self.max_record_size,
            **self._backend_options,
        )

    async def _ensure(self) -> Backend:
        return await self.medium.started_backend()

    async def destroy(self) -> None:
        """Stop watching, drop every listener, release every file. Safe to repeat.

        Pending `wait_for` calls raise `IPCClosedError`, `subscribe` loops end.
        The instance may be started again afterwards (with no listeners).

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     ipc = await AsyncIPC(tempfile.mkdtemp()).start()
            ...     ipc.on("greet", print)
            ...     await ipc.destroy(); await ipc.destroy()
            ...     return ipc.started, ipc.listener_count()
            >>> asyncio.run(main())
            (False, 0)
        """
        self._emitter.clear()
        await self._emitter.drain()
        medium = self.medium
        backend = medium.detach()
        if backend is None:
            return
        same_loop = False
        with contextlib.suppress(RuntimeError):
            same_loop = medium.loop is asyncio.get_running_loop()
        if same_loop and medium.generation == _fork_generation[0]:
            await backend.close()
        elif medium.generation == _fork_generation[0]:
            backend.abandon()
        medium.loop = None

    async def __aenter__(self) -> AsyncIPC:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.destroy()

    @property
    def slow_handler_threshold(self) -> float | None:
        """Seconds a sync handler may hold the loop before it is named in a
        warning; None: never (see the constructor). Settable.

        Example:
            >>> ipc = AsyncIPC("/tmp/unused", slow_handler_threshold=0.2)
            >>> ipc.slow_handler_threshold
            0.2
            >>> ipc.slow_handler_threshold = 0; ipc.slow_handler_threshold is None
            True
        """
        threshold = self._emitter.slow_threshold
        return None if threshold == float("inf") else threshold

    @slow_handler_threshold.setter
    def slow_handler_threshold(self, seconds: float | None) -> None:
        if seconds is not None and not seconds >= 0:  # also refuses NaN
            raise ValueError(f"slow_handler_threshold must be >= 0 seconds, not {seconds!r}")
        self._emitter.slow_threshold = float(seconds) if seconds else float("inf")

    @property
    def slow_handler_log_interval(self) -> float:
        """Seconds between two slow-handler warnings for one handler and event
        (10 by default); the next one says how many were left out meanwhile.

        Example:
            >>> ipc = AsyncIPC("/tmp/unused")
            >>> ipc.slow_handler_log_interval = 60.0
            >>> ipc.slow_handler_log_interval
            60.0
        """
        return self._emitter.slow_interval

    @slow_handler_log_interval.setter
    def slow_handler_log_interval(self, seconds: float) -> None:
        self._emitter.slow_interval = float(seconds)

    # -- listeners ------------------------------------------------------------------

    def on(self, event: str, handler: Handler) -> Subscription:
        """Call `handler(message)` for every message of `event` from other processes.

        Works before `start()`. `handler` may be sync or async; see the emitter
        module for the order handlers run in.

        Example:
            >>> ipc = AsyncIPC("/tmp/unused")
            >>> sub = ipc.on("user:updated", print)
            >>> sub.stop()
        """
        return self._emitter.on(event, handler)

    def once(self, event: str, handler: Handler) -> Subscription:
        """Like `on`, for the next message only.

        Example:
            >>> AsyncIPC("/tmp/unused").once("ready", print).once
            True
        """
        return self._emitter.once(event, handler)

    def off(self, event: str, handler: Handler | None = None) -> int:
        """Remove `handler` from `event`, or all of its handlers; returns how many.

        Example:
            >>> ipc = AsyncIPC("/tmp/unused")
            >>> _ = ipc.on("a", print); _ = ipc.on("a", repr)
            >>> ipc.off("a", print), ipc.off("a")
            (1, 1)
        """
        return self._emitter.off(event, handler)

    def listener_count(self, event: str | None = None) -> int:
        """How many listeners `event` has (every event when None).

        Example:
            >>> ipc = AsyncIPC("/tmp/unused")
            >>> _ = ipc.on("a", print); _ = ipc.once("a", print); _ = ipc.on("b", print)
            >>> ipc.listener_count("a"), ipc.listener_count()
            (2, 3)
        """
        return self._emitter.listener_count(event)

    async def wait_for(self, event: str, timeout: float | None = None) -> Any:
        """The next message of `event`; `TimeoutError` after `timeout` seconds.

        Raises `IPCClosedError` if the instance is destroyed meanwhile.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         try:
            ...             await ipc.wait_for("never", timeout=0.01)
            ...         except TimeoutError:
            ...             return "timed out"
            >>> asyncio.run(main())
            'timed out'
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def resolve(message: Any) -> None:
            if not fut.done():
                fut.set_result(message)

        def closed() -> None:
            if not fut.done():
                fut.set_exception(IPCClosedError(f"destroyed while waiting for {event!r}"))

        sub = self.once(event, resolve)
        sub.on_stop = closed
        try:
            await self._ensure()
            return await waiting.wait_for(fut, timeout)  # 3.11's loses cancellations
        finally:
            sub.on_stop = None
            sub.stop()

    def subscribe(self, event: str, *, maxsize: int = 10_000) -> MessageStream:
        """Messages of `event` as an async iterator (listening from this call on).

        Leaving the loop unsubscribes. At most `maxsize` messages wait in the
        buffer; past that the oldest are dropped and counted (`stream.dropped`).

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         stream = ipc.subscribe("ticks")
            ...         await ipc.notify("ticks", 1, include_self=True)
            ...         async for message in stream:
            ...             return message
            >>> asyncio.run(main())
            1
        """
        stream = self._emitter.stream(event, maxsize)
        stream._before_next = self._ensure
        return stream

    def lock(
        self,
        name: str,
        *,
        timeout: float | None = None,
        lease: float = 10.0,
        poll_interval: float = 1.0,
    ) -> Lock:
        """A lock shared by every process of this namespace: `async with ipc.lock(name):`.

        See `ivip_ipc_async.coordination.Lock` for the arguments and guarantees.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         async with ipc.lock("migrations", timeout=10) as lock:
            ...             return lock.held
            >>> asyncio.run(main())
            True
        """
        return Lock(self, name, timeout=timeout, lease=lease, poll_interval=poll_interval)

    # -- sending ----------------------------------------------------------------------

    async def notify(self, event: str, message: Any = None, *, include_self: bool = False) -> None:
        """Send `message` to the handlers of `event` in the other processes.

        When this returns the record is in the shared directory: every live peer
        will receive it, even if this process is killed right after. With
        `include_self`, this process's handlers get it too (after the write).

        Raises:
            TypeError: `message` cannot be encoded (nothing was written).
            ValueError: the record is larger than `max_record_size`.
            BackendFullError: no room (a full disk, Redis's `maxmemory`):
                nothing was written.
            BackendError: Redis refused or could not store it; for
                `BackendUnavailableError` it may have been stored anyway (see
                docs/api.md, "Errors").

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         await ipc.notify("user:updated", {"id": 7})
            >>> asyncio.run(main())
        """
        topic_len = self._event_sizes.get(event) if type(event) is str else None
        if topic_len is None:
            topic_len = _check_name(event, "event name")
            if topic_len <= _EVENT_NAME_KEPT and len(self._event_sizes) < _EVENT_SIZES_KEPT:
                self._event_sizes[event] = topic_len
        codec = self.codec
        data = codec.dumps(message)
        if HEADER_SIZE + topic_len + len(data) > self.max_record_size:
            check_record_size(self.max_record_size, topic_len, len(data))
        medium = self.medium
        backend = medium.backend
        # `medium.ready()` inlined, and no coroutine: the hot path.
        if (
            backend is None
            or medium.loop is not _running_loop()
            or medium.generation != _fork_generation[0]
        ):
            backend = await medium.started_backend()
        records = (
            _new_record(Record, (_MESSAGE, event, b"", data, 0, self._node, 0.0, 0, codec.id)),
        )
        # Written at once when the backend can (no coroutine, no suspension);
        # else through `append`. Either way, written when this returns.
        write_now = self._write_now
        if write_now is None or not write_now(records):
            await backend.append(records)
        if include_self:
            self._emit_here(event, partial(self.codec.loads, data))

    async def notify_many(
        self, event: str, messages: Iterable[Any], *, include_self: bool = False
    ) -> None:
        """Send several messages of `event` at once: `notify` for each, in order,
        written together (the way a Redis pipeline sends many commands at once).

        Every message is encoded and checked before anything is written. Messages
        that fit in one record of `max_record_size` are written all or none; a
        larger batch goes out in several such parts, in order.

        Raises:
            TypeError: a message cannot be encoded (nothing was written).
            ValueError: one message alone is larger than `max_record_size`.
            BackendError: as for `notify` (parts already sent stay sent).

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         got = []
            ...         ipc.on("tick", got.append)
            ...         await ipc.notify_many("tick", range(3), include_self=True)
            ...         return got
            >>> asyncio.run(main())
            [0, 1, 2]
        """
        topic_len = _check_name(event, "event name")
        dumps = self.codec.dumps
        encoded = [dumps(message) for message in messages]
        for data in encoded:
            check_record_size(self.max_record_size, topic_len, len(data))
        backend = await self._ensure()
        node, codec_id = backend.node, self.codec.id
        part: list[Record] = []
        room = self.max_record_size - HEADER_SIZE  # a batch is one frame of records
        for data in encoded:
            size = HEADER_SIZE + topic_len + len(data)
            if part and size > room:
                await backend.append(part)
                part, room = [], self.max_record_size - HEADER_SIZE
            part.append(
                _new_record(Record, (_MESSAGE, event, b"", data, 0, node, 0.0, 0, codec_id))
            )
            room -= size
        if part:
            await backend.append(part)
        if include_self:
            loads = self.codec.loads
            for data in encoded:
                self._emit_here(event, partial(loads, data))

    # -- receiving ----------------------------------------------------------------------

    def _dispatch(self, records: Sequence[Record]) -> None:
        # Timed as a whole (two clock reads per batch, not per handler): see
        # `Emitter.held_loop` for how a slow one is named.
        start = _clock()
        codec_id = self.codec.id
        loads = self.codec.loads
        emitter = self._emitter
        # (`timing` is rare: the clock is read again only then)
        emit = (
            emitter.emit_data_timed
            if emitter.timing and emitter.still_timing()
            else emitter.emit_data
        )
        listeners = emitter._listeners
        message = _MESSAGE
        skipped = Kind.SKIPPED  # a message read unparsed: no listener here
        get = listeners.get
        applied = 0  # cache records: their time is in `held` too
        medium = self.medium
        for rec in records:
            # One unpacking instead of an attribute lookup per field.
            kind, topic, _, data, hlc, _, _, _, codec = rec
            if kind is skipped:
                continue
            if codec != codec_id:
                self._foreign_codec(rec)
                continue
            if kind is message:
                subs = get(topic)
                if subs:
                    emit(topic, subs, data, loads)
            elif kind is Kind.CACHE_SET or kind is Kind.CACHE_DELETE:
                self.clock.observe(hlc)
                medium.mirror.apply(rec)
                applied += 1
        held = _clock() - start
        emitter.dispatch_seconds += held
        if held > emitter.slow_threshold:
            emitter.held_loop(held, self._calls_of(records), shared=applied > 0)

    def _calls_of(self, records: Sequence[Record]) -> dict[tuple[str, Handler], int]:
        """The handler calls a dispatch of `records` made (the listeners now), by
        (event, handler): asked only after a slow dispatch."""
        calls: dict[tuple[str, Handler], int] = {}
        listeners = self._emitter._listeners
        for rec in records:
            if rec.kind is _MESSAGE and rec.codec == self.codec.id:
                for sub in listeners.get(rec.topic, ()):
                    key = (rec.topic, sub.handler)
                    calls[key] = calls.get(key, 0) + 1
        return calls

    def _emit_here(self, event: str, decode: Callable[[], Any]) -> None:
        """`include_self`: this process's handlers, timed as a dispatch is."""
        emitter = self._emitter
        if emitter.timing:
            emitter.still_timing()
        start = _clock()
        emitter.emit(event, decode)
        held = _clock() - start
        emitter.dispatch_seconds += held
        if held > emitter.slow_threshold:
            subs = emitter._listeners.get(event, ())
            emitter.held_loop(held, {(event, sub.handler): 1 for sub in subs})

    def _foreign_codec(self, rec: Record) -> None:
        if rec.codec not in self._foreign_codec_warned:
            self._foreign_codec_warned.add(rec.codec)
            logger.warning(
                "skipping records encoded with codec %d (this process uses %d): "
                "all processes on one directory must use the same codec",
                rec.codec,
                self.codec.id,
            )

    # -- health -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and health: peers, segments, footprint, lag, gaps, errors.

        Example:
            >>> AsyncIPC("/tmp/unused").stats()["started"]
            False
        """
        out: dict[str, Any] = {
            "started": self.started,
            "listeners": self._emitter.listener_count(),
            "handler_errors": self._emitter.handler_errors,
            "slow_handlers": self._emitter.slow_handlers,
            "dispatch_seconds": self._emitter.dispatch_seconds,
            "cache_entries": self.mirror.count(),
            **self.medium.tally.stats(),
        }
        backend = self.medium.backend
        if backend is not None:
            out.update(backend.stats())
        return out

    def health(self) -> dict[str, Any]:
        """Is this instance well now? A summary of `stats()` with the problems named.

        `healthy` is True when the instance is started, its maintenance task
        (or Redis listener) runs and is connected, no problem its backend names
        makes it unhealthy (`Backend.problems`), and no gap happened in the
        last `unhealthy_after_gap` seconds (60 by default); `problems` says what
        is wrong otherwise (a watcher that stopped means slower wake-ups, not
        lost records). Past gaps stay counted in `errors["gaps"]`.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         return ipc.health()["healthy"]
            >>> asyncio.run(main())
            True
        """
        stats = self.stats()
        problems: list[str] = []
        recent_gap = unhealthy = False
        if not stats["started"]:
            problems.append("not started")
        else:
            backend = self.medium.backend
            assert backend is not None  # started
            for problem in backend.problems():
                problems.append(problem.text)
                unhealthy = unhealthy or problem.unhealthy
            if self._last_gap is not None:
                at, lost = self._last_gap
                age = time.monotonic() - at
                recent_gap = age < self.unhealthy_after_gap
                if recent_gap:
                    why = backend.gap_cause
                    count = "an unknown number of records" if lost is None else f"{lost} records"
                    problems.append(
                        f"{count} may have been lost in a gap {age:.0f}s ago ({why}; the "
                        f"cache was reloaded; healthy again {self.unhealthy_after_gap:g}s "
                        "after the gap)"
                    )
        return {
            "healthy": stats["started"] and not unhealthy and not recent_gap,
            "problems": problems,
            "peers": len(stats.get("peers", [])),
            "lag_bytes": stats.get("lag_bytes", 0),
            "errors": {
                key: stats.get(key, 0)
                for key in (
                    "handler_errors",
                    "write_errors",
                    "task_failures",
                    "garbage_bytes",
                    "torn_tails",
                    "gaps",
                )
            },
        }


class _Sink:
    """The `RecordSink` a backend delivers to: it feeds `AsyncIPC._dispatch`."""

    __slots__ = ("_ipc",)

    def __init__(self, ipc: AsyncIPC) -> None:
        self._ipc = ipc

    def deliver(self, records: Sequence[Record]) -> None:
        self._ipc._dispatch(records)

    def restore(self, records: Sequence[Record]) -> None:
        ipc = self._ipc
        latest = ipc.medium.mirror.restore(records, ipc.codec.id)  # one call per slice
        if latest:
            ipc.clock.observe(latest)

    written = restore  # own stored writes: only their state matters here too

    def state(self) -> Iterable[Record]:
        return self._ipc.medium.mirror.records()

    def wanted(self) -> frozenset[bytes]:
        # Optional for a sink: the events whose messages are dispatched here
        # (UTF-8); a backend may hand the others on as Kind.SKIPPED records.
        return self._ipc._emitter.wanted()

    def state_version(self) -> int:
        return self._ipc.medium.mirror.version

    def state_bytes(self) -> int:
        return self._ipc.medium.mirror.nbytes

    def mirror_ready(self, ready: bool) -> None:
        self._ipc.medium.set_mirror_current(ready)

    def current(self, topic: str, key: bytes) -> Record | None:
        entry = self._ipc.medium.mirror.lookup(topic, decode_key(key))
        return None if entry is None else entry.record

    def gap(self, peer: str, lost: int | None) -> None:
        # Local only: tell this process's listeners; the cache is being reloaded.
        self._ipc._last_gap = (time.monotonic(), lost)
        self._ipc._emitter.emit(GAP_EVENT, lambda: {"peer": peer, "lost": lost})


def _threshold_from_environment(default: float) -> float | None:
    raw = os.environ.get("IVIP_IPC_SLOW_HANDLER")
    if raw is None or not raw.strip():
        return default
    if raw.strip().lower() in ("off", "none", "no", "false"):
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(
            f"$IVIP_IPC_SLOW_HANDLER must be seconds (e.g. 0.05) or 'off', not {raw!r}"
        )
    return seconds or None


def _check_name(name: object, what: str) -> int:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be str, not {type(name).__name__}")
    size = len(name.encode())
    if size > MAX_NAME_BYTES:
        raise ValueError(f"{what} too long: {size} bytes, the limit is {MAX_NAME_BYTES}")
    return size
