"""Listeners: `on` / `once` / `off`, `Subscription`, and message streams.

The emitter knows nothing of files or peers: `AsyncIPC` calls `emit` for each
record it dispatches, in record order. Ordering given to handlers:

* handlers of one event run in registration order, for each record in the
  order records arrive (per sender: the order they were sent);
* a sync handler runs to completion before the next handler is called;
* an async handler is *started* in that order as its own task; it does not
  hold back later records, so async handlers may *finish* out of order.

A handler that raises is logged (with the event name) and the others still run.
Slow handlers: `AsyncIPC` times each dispatch as a whole (two clock reads per
batch of records, not per handler) and hands one that held the loop longer
than `slow_threshold` seconds to `held_loop`, which names the handler that ran
(with one handler, it is the one) or, when several ran, names them and times
each call for the next `slow_interval` seconds (`timing`), which then names the
slow one exactly. Warnings are rate-limited per handler and event; each is
counted in `slow_handlers`; `dispatch_seconds` sums the dispatch time.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from functools import partial
from time import perf_counter
from typing import Any

from .logs import logger, rate_limited

__all__ = ["Emitter", "Handler", "MessageStream", "Subscription"]


Handler = Callable[[Any], Any]
"""A listener: called with the message; may be sync or return an awaitable."""


class Subscription:
    """A registered listener, as `AsyncIPC.on` and `once` return it; `stop()` removes it.

    Attributes: `event`, `handler`, `once` (True for `once`), `active` (False
    once stopped, or after a `once` listener ran).

    Example:
        >>> from ivip_ipc_async import AsyncIPC
        >>> ipc = AsyncIPC("/tmp/unused")
        >>> sub = ipc.on("greet", print)
        >>> sub.event, sub.active, sub.once, ipc.listener_count("greet")
        ('greet', True, False, 1)
        >>> sub.stop(); sub.active, ipc.listener_count("greet")
        (False, 0)
    """

    __slots__ = ("_emitter", "active", "event", "handler", "on_stop", "once")

    def __init__(self, emitter: Emitter, event: str, handler: Handler, once: bool) -> None:
        self._emitter = emitter
        self.event = event
        self.handler = handler
        self.once = once
        self.active = True
        self.on_stop: Callable[[], None] | None = None

    def stop(self) -> None:
        """Remove this listener. Safe to call more than once.

        Example:
            >>> from ivip_ipc_async import AsyncIPC
            >>> ipc = AsyncIPC("/tmp/unused")
            >>> sub = ipc.on("greet", print)
            >>> sub.stop(); sub.stop()
            >>> ipc.listener_count("greet")
            0
        """
        if self.active:
            self._emitter._remove(self)

    def __repr__(self) -> str:
        state = "active" if self.active else "stopped"
        return f"<Subscription {self.event!r} {self.handler!r} {state}>"


class Emitter:
    """The listener registry of one `AsyncIPC`.

    Example:
        >>> emitter = Emitter()
        >>> seen = []
        >>> _ = emitter.once("tick", seen.append)
        >>> emitter.emit("tick", lambda: 1); emitter.emit("tick", lambda: 2)
        >>> seen
        [1]
    """

    def __init__(self) -> None:
        self._listeners: dict[str, list[Subscription]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.handler_errors = 0
        # Slow handlers: warn past `slow_threshold` s (inf: never), at most once per
        # handler and event per `slow_interval` s; count them, and the time spent.
        self.slow_threshold = float("inf")
        self.slow_interval = 10.0
        self.slow_handlers = 0
        self.dispatch_seconds = 0.0
        self.timing = False  # True: each handler call is timed (see `held_loop`)
        self._timing_until = 0.0
        self._wanted: frozenset[bytes] | None = None  # see `wanted`

    # -- registration -------------------------------------------------------

    def on(self, event: str, handler: Handler) -> Subscription:
        """Call `handler(message)` for every message of `event`."""
        return self._add(event, handler, once=False)

    def once(self, event: str, handler: Handler) -> Subscription:
        """Call `handler(message)` for the next message of `event` only."""
        return self._add(event, handler, once=True)

    def off(self, event: str, handler: Handler | None = None) -> int:
        """Remove `handler` from `event` (every handler when None); returns how many."""
        _check_event(event)
        subs = self._listeners.get(event, [])
        doomed = [s for s in subs if handler is None or s.handler == handler]
        for sub in doomed:
            self._remove(sub)
        return len(doomed)

    def listener_count(self, event: str | None = None) -> int:
        """How many listeners `event` has (all events when None)."""
        if event is None:
            return sum(len(v) for v in self._listeners.values())
        return len(self._listeners.get(event, ()))

    def wanted(self) -> frozenset[bytes]:
        """The events with listeners, UTF-8 encoded (what a reader may skip the
        others by), made again only after a listener is added or removed."""
        wanted = self._wanted
        if wanted is None:
            wanted = self._wanted = frozenset(
                event.encode("utf-8", "surrogatepass") for event in self._listeners
            )
        return wanted

    def has_listeners(self, event: str) -> bool:
        """Whether a message of `event` would reach anyone."""
        return event in self._listeners

    def clear(self) -> None:
        """Drop every listener and cancel running async handlers."""
        for subs in list(self._listeners.values()):
            for sub in list(subs):
                self._remove(sub)
        for task in list(self._tasks):
            task.cancel()

    async def drain(self) -> None:
        """Wait for the async handlers already started (cancelled ones included)."""
        while self._tasks:
            tasks = list(self._tasks)
            await asyncio.gather(*tasks, return_exceptions=True)
            # Their done callbacks (which also drop them) may not have run yet, and on
            # Python 3.12+ gather over finished tasks returns without yielding: drop
            # them here, or this loop would spin for ever.
            self._tasks.difference_update(tasks)

    def stream(self, event: str, maxsize: int = 10_000) -> MessageStream:
        """A bounded buffered stream of the messages of `event` (see `MessageStream`)."""
        return MessageStream(self, event, maxsize)

    def _add(self, event: str, handler: Handler, once: bool) -> Subscription:
        _check_event(event)
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        sub = Subscription(self, event, handler, once)
        self._listeners.setdefault(event, []).append(sub)
        self._wanted = None
        return sub

    def _remove(self, sub: Subscription) -> None:
        was_active, sub.active = sub.active, False
        subs = self._listeners.get(sub.event)
        if subs is not None and sub in subs:
            subs.remove(sub)
            if not subs:
                del self._listeners[sub.event]
                self._wanted = None
        if was_active and sub.on_stop is not None:
            sub.on_stop()

    # -- dispatch -------------------------------------------------------------

    def emit(self, event: str, decode: Callable[[], Any]) -> None:
        """Call every handler of `event` with a fresh `decode()` of the message."""
        subs = self._listeners.get(event)
        if not subs:
            return
        for sub in tuple(subs):
            if not sub.active:
                continue
            if sub.once:
                sub.on_stop = None  # it fired: nobody needs telling
                self._remove(sub)
            try:
                message = decode()
            except Exception:
                self._undecodable(event)
                return
            if self.timing:
                result = self._call_timed(event, sub, message)
            else:
                try:
                    result = sub.handler(message)
                except Exception:
                    self._failed(event, sub)
                    continue
            if result is not None and inspect.isawaitable(result):  # sync handlers: None
                self._start(event, sub.handler, result)

    def emit_data(
        self, event: str, subs: list[Subscription], data: bytes, loads: Callable[[bytes], Any]
    ) -> None:
        """`emit(event, lambda: loads(data))` to `subs`, the listeners of `event`
        (the caller looked them up), faster for the common case of one `on`
        listener (every received message goes through here)."""
        if len(subs) != 1 or subs[0].once:
            self.emit(event, partial(loads, data))
            return
        sub = subs[0]
        try:
            message = loads(data)
        except Exception:
            self._undecodable(event)
            return
        try:
            result = sub.handler(message)
        except Exception:
            self._failed(event, sub)
            return
        if result is not None and inspect.isawaitable(result):  # sync handlers: None
            self._start(event, sub.handler, result)

    def emit_data_timed(
        self, event: str, subs: list[Subscription], data: bytes, loads: Callable[[bytes], Any]
    ) -> None:
        """`emit_data`, timing the handler's call (while `timing`)."""
        if len(subs) != 1 or subs[0].once:
            self.emit(event, partial(loads, data))
            return
        sub = subs[0]
        try:
            message = loads(data)
        except Exception:
            self._undecodable(event)
            return
        result = self._call_timed(event, sub, message)
        if result is not None and inspect.isawaitable(result):  # sync handlers: None
            self._start(event, sub.handler, result)

    def _call_timed(self, event: str, sub: Subscription, message: Any) -> Any:
        start = perf_counter()
        try:
            result = sub.handler(message)
        except Exception:
            self._failed(event, sub)
            result = None
        held = perf_counter() - start
        if held > self.slow_threshold:
            self._slow({(event, sub.handler): 1}, held, timed=True)
        return result

    # -- slow handlers ---------------------------------------------------------

    def still_timing(self) -> bool:
        """Whether each handler call is still to be timed (`timing` ends
        `slow_interval` seconds after the slow dispatch that began it).

        Example:
            >>> Emitter().still_timing()
            False
        """
        if self.timing and time.monotonic() >= self._timing_until:
            self.timing = False
        return self.timing

    def held_loop(
        self, held: float, calls: dict[tuple[str, Handler], int], *, shared: bool = False
    ) -> None:
        """A dispatch held the loop `held` seconds; `calls` counts the handler
        calls it made, by (event, handler). Past `slow_threshold`, name them in a
        warning; with several, time each call for the next `slow_interval` s.
        `shared`: the dispatch also did other work (applied cache records), so
        its time is not the handlers' alone: nobody is named, each call is timed
        for the next `slow_interval` s instead.

        Example:
            >>> emitter = Emitter(); emitter.slow_threshold = 0.05
            >>> emitter.held_loop(0.2, {("a", print): 1, ("b", repr): 1})
            >>> emitter.slow_handlers, emitter.timing
            (1, True)
            >>> emitter = Emitter(); emitter.slow_threshold = 0.05
            >>> emitter.held_loop(0.2, {("a", print): 1}, shared=True)
            >>> emitter.slow_handlers, emitter.timing
            (0, True)
        """
        if self.still_timing():
            return  # its calls were timed one by one
        if held <= self.slow_threshold or not calls:
            return
        if not shared:
            self._slow(calls, held, timed=False)
        if shared or len(calls) > 1:
            self.timing = True
            self._timing_until = time.monotonic() + self.slow_interval

    def _slow(self, calls: dict[tuple[str, Handler], int], held: float, *, timed: bool) -> None:
        self.slow_handlers += 1
        named = sorted(
            (handler_name(handler), event, count) for (event, handler), count in calls.items()
        )
        advice = "make it async, or run its blocking part in a thread (asyncio.to_thread)"
        limit = f"slow_handler_threshold is {self.slow_threshold * 1000:.0f} ms"
        if len(named) == 1:
            name, event, count = named[0]
            over = "" if timed or count == 1 else f" over {count} calls"
            key: tuple[Any, ...] = ("slow", name, event)
            text = (
                f"handler {name} for event {event!r} held the event loop for "
                f"{held * 1000:.0f} ms{over} ({limit}): {advice}"
            )
        else:
            key = ("slow", *((name, event) for name, event, _ in named))
            listed = ", ".join(f"{name} for {event!r} ({count}x)" for name, event, count in named)
            text = (
                f"handlers {listed} held the event loop for {held * 1000:.0f} ms together "
                f"({limit}); timing each call for {self.slow_interval:g} s to name the slow "
                "one"
            )
        rate_limited(logging.WARNING, key, "%s", text, interval=self.slow_interval)

    def _undecodable(self, event: str) -> None:
        rate_limited(
            logging.ERROR,
            ("decode", event),
            "could not decode a message of event %r; skipped",
            event,
            exc_info=True,
        )

    def _failed(self, event: str, sub: Subscription) -> None:
        self.handler_errors += 1
        rate_limited(
            logging.ERROR,
            ("handler", event, id(sub)),
            "handler %r for event %r raised",
            sub.handler,
            event,
            exc_info=True,
        )

    def _start(self, event: str, handler: Handler, awaitable: Any) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.handler_errors += 1
                rate_limited(
                    logging.ERROR,
                    ("handler", event, id(handler)),
                    "async handler %r for event %r raised",
                    handler,
                    event,
                    exc_info=t.exception(),
                )

        task.add_done_callback(done)


class MessageStream:
    """Messages of one event as an async iterator, buffered from creation.

    The listener is registered when the stream is created, so nothing sent after
    `subscribe()` returns is missed. The buffer holds `maxsize` messages; when a
    consumer falls further behind, the *oldest* message is dropped, counted in
    `dropped` and logged (at most once a second), so a stuck consumer cannot grow
    memory without bound. Leaving the `async for` (break, return, exception)
    unsubscribes; so does `close()` or leaving `async with`.

    Example:
        >>> import tempfile
        >>> from ivip_ipc_async import AsyncIPC
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         async with ipc.subscribe("tick") as stream:
        ...             await ipc.notify_many("tick", [1, 2], include_self=True)
        ...             got = [await stream.get(), await stream.get()]
        ...         return got, stream.dropped, ipc.listener_count("tick")
        >>> asyncio.run(main())
        ([1, 2], 0, 0)
    """

    def __init__(self, emitter: Emitter, event: str, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self._buffer: deque[Any] = deque()
        self._maxsize = maxsize
        self._waiter: asyncio.Future[None] | None = None
        self._last_warning = 0.0
        self.event = event
        self.dropped = 0
        self._sub = emitter.on(event, self._push)
        self._sub.on_stop = self._wake
        self._before_next: Callable[[], Any] | None = None

    @property
    def closed(self) -> bool:
        """True once the stream no longer receives messages.

        Example:
            >>> from ivip_ipc_async import AsyncIPC
            >>> stream = AsyncIPC("/tmp/unused").subscribe("tick")
            >>> stream.closed
            False
            >>> stream.close(); stream.closed
            True
        """
        return not self._sub.active

    def close(self) -> None:
        """Unsubscribe; buffered messages can still be read. Safe to repeat.

        Example:
            >>> import tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         stream = ipc.subscribe("tick")
            ...         await ipc.notify("tick", 1, include_self=True)
            ...         stream.close()  # nothing more comes in
            ...         await ipc.notify("tick", 2, include_self=True)
            ...         return [message async for message in stream]
            >>> asyncio.run(main())
            [1]
        """
        self._sub.stop()

    def _push(self, message: Any) -> None:
        if len(self._buffer) >= self._maxsize:
            self._buffer.popleft()
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_warning >= 1.0:
                self._last_warning = now
                logger.warning(
                    "subscriber to %r is too slow: dropped %d oldest messages so far "
                    "(buffer of %d)",
                    self.event,
                    self.dropped,
                    self._maxsize,
                )
        self._buffer.append(message)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        """The next message; raises `StopAsyncIteration` once closed and drained.

        Starts the instance if needed, as `async for` does.

        Example:
            >>> import tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         stream = ipc.subscribe("price")
            ...         await ipc.notify("price", 42, include_self=True)
            ...         async with asyncio.timeout(5):  # with a deadline
            ...             first = await stream.get()
            ...         stream.close()
            ...         try:
            ...             await stream.get()
            ...         except StopAsyncIteration:
            ...             return first, "closed and drained"
            >>> asyncio.run(main())
            (42, 'closed and drained')
        """
        if self._before_next is not None:
            await self._before_next()
        while not self._buffer:
            if self.closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._buffer.popleft()

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            while True:
                try:
                    yield await self.get()
                except StopAsyncIteration:
                    return
        finally:
            self.close()

    async def __aenter__(self) -> MessageStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def handler_name(handler: Handler) -> str:
    """`module.qualified.name` of a handler, as a slow-handler warning names it.

    Example:
        >>> class Worker:
        ...     def handle(self, message): ...
        >>> handler_name(Worker().handle).endswith("Worker.handle")
        True
        >>> handler_name(print)
        'builtins.print'
    """
    target = handler.func if isinstance(handler, partial) else handler
    qualname = getattr(target, "__qualname__", None)
    if not isinstance(qualname, str):
        return repr(handler)
    module = getattr(target, "__module__", None)
    name = f"{module}.{qualname}" if isinstance(module, str) else qualname
    return f"partial({name})" if target is not handler else name


def _check_event(event: object) -> None:
    if not isinstance(event, str):
        raise TypeError(f"event names are str, not {type(event).__name__}")
