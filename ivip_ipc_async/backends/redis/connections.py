"""Reaching Redis: URL checks, the backend's connections by role, the listener
connection's guards, retries with backoff, and redis-py's errors wrapped into
the library's.

Connections are named `ivip:<namespace>:<peer>:<role>` in `CLIENT LIST`: `c`
serves the listener's requests (start, catch-up, reload, the periodic check),
`w` writes, `r` is the subscription, `g` reads cache entries while the mirror
is rebuilt (made on demand, closed after); the locks add `l` for their
commands (`leases.COMMAND_CONNECTIONS`, 2) and `n` for their release notices
(1). At most four per instance besides the locks' three: seven.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

from ...errors import (
    BackendError,
    BackendFullError,
    BackendPermissionError,
    BackendUnavailableError,
)
from ...logs import rate_limited
from .endpoints import SENTINEL_SCHEMES, Endpoint, SentinelTarget, failover_pause
from .replies import is_kind
from .scripts import script_command
from .settings import Shared

__all__ = ["Connections", "check_redis_url", "listening_peers", "redacted", "retryable", "wrap"]

_T = TypeVar("_T")


def redacted(url: str) -> str:
    """`url` with its password, if any, shown as `***`.

    Example:
        >>> redacted("redis://user:secret@host:6379/0")
        'redis://user:***@host:6379/0'
    """
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def check_redis_url(url: str) -> None:
    """Refuse, with a `ValueError` naming the problem, a Redis URL that redis-py
    would misread (a missing host, a database that is not a number, ...).

    Example:
        >>> check_redis_url("redis://cache.internal:6379/2")
        >>> check_redis_url("redis://cache/abc")
        Traceback (most recent call last):
        ...
        ValueError: bad Redis URL 'redis://cache/abc': the database must be a number, not 'abc'
    """
    shown = redacted(url) if "://" in url else url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()

    def bad(problem: str) -> ValueError:
        return ValueError(f"bad Redis URL {shown!r}: {problem}")

    if scheme not in ("redis", "rediss", "unix", *SENTINEL_SCHEMES) or not url[
        len(scheme) :
    ].startswith("://"):
        raise bad(
            "it must start with redis://, rediss://, unix://, redis+sentinel:// "
            "or rediss+sentinel://"
        )
    if scheme in SENTINEL_SCHEMES:
        try:
            SentinelTarget.parse(url)
        except ValueError as exc:
            raise bad(str(exc)) from None
        return
    try:
        port = parts.port
    except ValueError as exc:  # not a number, or out of range
        raise bad(f"the port must be a number from 1 to 65535 ({exc})") from None
    query = parse_qs(parts.query)
    db_texts = [parts.path.strip("/")] if scheme != "unix" else []
    db_texts += query.get("db", [])
    if scheme == "unix":
        if not parts.path:
            raise bad("no socket path (unix:///path/to/redis.sock)")
    else:
        if not parts.hostname:
            raise bad("no host (redis://host:6379/0)")
        if port == 0:
            raise bad("the port must be a number from 1 to 65535")
    for text in db_texts:
        if text and not (text.isascii() and text.isdigit()):
            raise bad(f"the database must be a number, not {text!r}")


def wrap(exc: BaseException, doing: str, url: str) -> Exception:
    """A redis-py error (or a timeout) as one of the library's documented errors,
    with the original as its `__cause__`."""
    wrapped = _wrapped(exc, doing, url)
    if wrapped is not exc:
        wrapped.__cause__ = exc
    return wrapped


def _wrapped(exc: BaseException, doing: str, url: str) -> Exception:
    from redis import exceptions as rx

    where = f"Redis at {redacted(url)}"
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError | rx.NoPermissionError):
        return BackendPermissionError(f"{where} refused {doing}: {exc}")
    text = str(exc)
    if isinstance(exc, rx.ResponseError) and (
        re.search(r"\b(NOPERM|WRONGPASS|NOAUTH)\b", text)
        or "can't run this command" in text
        or "executing the script can't" in text  # (a key or channel, Redis 7.0)
    ):
        return BackendPermissionError(f"{where} refused {doing}: {exc}{script_command(text)}")
    if isinstance(exc, rx.OutOfMemoryError) or (
        isinstance(exc, rx.ResponseError) and "OOM command not allowed" in text
    ):
        return BackendFullError(f"{where} is out of memory and refused {doing}: {exc}")
    if isinstance(exc, rx.ConnectionError | rx.TimeoutError | OSError):
        return BackendUnavailableError(f"{where} could not be reached ({doing}): {exc}")
    return BackendError(f"{where} refused {doing}: {exc}")


def retryable(exc: BaseException) -> bool:
    """An error that a reconnection can cure (the request may have been executed)."""
    from redis import exceptions as rx

    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError | BackendError):
        return False  # (redis-py's auth errors are ConnectionErrors; no retry cures them)
    if _certificate_refused(exc):
        return False  # nor does one cure a certificate that cannot be verified
    # ReadOnlyError: connected to a replica after a failover; NoScriptError: the
    # server restarted between loading the script and running it.
    return isinstance(
        exc, rx.ConnectionError | rx.TimeoutError | rx.ReadOnlyError | rx.NoScriptError | OSError
    )


def _certificate_refused(exc: BaseException) -> bool:
    """A TLS certificate verification failure, in `exc` or what it was raised from."""
    import ssl

    seen: BaseException | None = exc
    for _ in range(5):  # (redis-py chains the ssl error under its ConnectionError)
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or (
            "CERTIFICATE_VERIFY_FAILED" in str(seen)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _as_is(response: Any) -> Any:
    return response


class Connections:
    """The redis-py clients of one backend, by role, and what guards them.

    Args:
        shared: What the backend's parts share (settings, counters).
    """

    def __init__(self, shared: Shared) -> None:
        self._settings = shared.settings
        self._counters = shared.counters
        self.endpoint = Endpoint(shared.settings.url, shared.settings.namespace)
        self.control: Any = None  # the listener's requests (c)
        self.write: Any = None  # writes (w)
        self.reader: Any = None  # the subscription (r)
        self._read: Any = None  # cache reads while the mirror is rebuilt (g, lazy)
        self._reads = 0  # cache reads under way on it
        self.subscribed = False  # the listener's connection is subscribed
        self.reader_reconnected = False  # set by redis-py when it reconnects the listener
        self._watchdog = _Watchdog()  # the time limit of each attempt of `retrying`

    def make(self, role: str) -> Any:
        """A redis-py client for `role` (see the module's docstring)."""
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        settings = self._settings
        options = dict(settings.redis_options)
        label = re.sub(r"[^!-~]", "_", settings.namespace)  # names allow no spaces
        options.setdefault("client_name", f"ivip:{label}:{settings.node:016x}:{role}")
        options.setdefault("socket_connect_timeout", 5.0)
        if role == "r":
            # The listener must see every disconnect (to check for a gap and
            # resynchronise), and must not wait forever on a half-open connection.
            for name in ("retry_on_error", "retry_on_timeout", "health_check_interval"):
                options.pop(name, None)
            options["retry"] = Retry(NoBackoff(), 0)
            options["single_connection_client"] = True  # one reader: no pool per read
            timeout = options.get("socket_timeout") or 0.0
            options["socket_timeout"] = max(float(timeout), settings.ping_interval + 5.0)
        else:
            # Writes retry in `retrying` (counted, logged, deduplicated by readers).
            options.setdefault("retry", Retry(NoBackoff(), 0))
            # Writes have no socket timeout (redis-py 8 sets 5 s by default):
            # `retrying` times each attempt, at the cost of one timer, where a
            # socket timeout wraps every command in `asyncio.wait_for` (a task per
            # command on Python 3.11).
            timeout = max(settings.retry_timeout, 1.0) if role == "c" else None
            options.setdefault("socket_timeout", timeout)
            if role in ("g", "w", "l"):  # one connection, serialised (the writer
                options["single_connection_client"] = True  # sends on it by hand)
        return self.endpoint.client(options)

    def open(self) -> None:
        """Make the clients of the control, write and reader roles (they connect
        on first use)."""
        self.control = self.make("c")
        self.write = self.make("w")
        self.reader = self.make("r")

    async def close(self) -> None:
        """Close every client."""
        clients = (self.control, self.write, self.reader, self._read)
        self.control = self.write = self.reader = self._read = None
        self._watchdog.stop()
        self.subscribed = False
        for client in clients:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        await self.endpoint.close()

    def drop(self) -> None:
        """The loop is gone: forget the clients without awaiting."""
        self.control = self.write = self.reader = self._read = None

    # -- the listener's connection ---------------------------------------------------------

    async def note_reader_connection(self) -> None:
        """Connect the listener, and have redis-py say if it ever reconnects it.

        redis-py reopens a connection found closed, when it sends, without
        raising anything. The listener only sends on a connection it has just
        read from, so this is a guard: a reconnection behind its back would lose
        the subscription silently.
        """
        client = self.reader
        await client.ping()  # connects the listener's single connection
        connection = client.connection
        if connection is not None:
            # Held weakly by redis-py: a bound method of this object.
            connection.register_connect_callback(self._on_reader_connect)
            # redis-py's own health check would PING, and read the answer, on the
            # subscribed connection, throwing away a push that came first (RESP3)
            # or failing on it (RESP2); `ping_interval` does that job. (A URL's
            # `?health_check_interval=` overrides options, hence here.)
            connection.health_check_interval = 0
            # Pushes handed over as they are (as redis-py's own PubSub sets it): its
            # default handler formats each one for a debug log, first.
            set_handler = getattr(
                getattr(connection, "_parser", None), "set_pubsub_push_handler", None
            )
            if set_handler is not None:
                set_handler(_as_is)
        self.reader_reconnected = False

    async def subscribe(self) -> None:
        """SUBSCRIBE the listener's connection to the channel (a refusal raises)."""
        connection = self.reader.connection
        await connection.send_command("SUBSCRIBE", self._settings.channel)
        while not is_kind(await connection.read_response(push_request=True), "subscribe"):
            pass  # (a stale PING answer)
        self.subscribed = True

    async def drop_reader_connection(self) -> None:
        """Close the listener's connection (subscribed, maybe half-read): the
        resync opens a fresh one."""
        self.subscribed = False
        connection = self.reader.connection if self.reader else None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.disconnect()

    def _on_reader_connect(self, _connection: Any) -> None:
        self.reader_reconnected = True

    # -- cache reads while the mirror is rebuilt ---------------------------------------------

    async def read_entry(self, entry_key: bytes) -> Any:
        """HGET the frame of one cache entry, on the `g` connection (made on first
        use), retried for `read_timeout` seconds."""
        if self._read is None:
            self._read = self.make("g")
        client = self._read
        self._reads += 1
        try:
            return await self.retrying(
                "cache read", client.hget, entry_key, "r", timeout=self._settings.read_timeout
            )
        finally:
            self._reads -= 1

    async def close_read_client(self) -> None:
        """Close the cache reads' connection once the mirror serves them again."""
        client = self._read
        if client is not None and not self._reads:
            self._read = None
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- retries -------------------------------------------------------------------------

    async def retrying(
        self,
        what: str,
        attempt: Callable[..., Awaitable[_T]],
        *args: Any,
        timeout: float | None = None,
    ) -> _T:
        """`attempt(*args)`, again after connection errors, for up to `timeout`
        seconds (`retry_timeout` by default); Redis's errors raised as the
        documented ones."""
        settings = self._settings
        loop = asyncio.get_running_loop()
        limit = settings.retry_timeout if timeout is None else timeout
        deadline = loop.time() + limit
        delay = 0.05
        while True:
            # The attempt's own time limit (the connection has no socket timeout).
            guard = self._watchdog.arm(max(deadline, loop.time() + min(limit, 1.0)))
            try:
                return await attempt(*args)
            except asyncio.CancelledError as cancelled:
                if not self._watchdog.expired(guard):
                    raise
                exc: Exception = TimeoutError(f"no answer in {guard.when - guard.armed:.3g}s")
                exc.__cause__ = cancelled
            except Exception as error:
                exc = error
            finally:
                self._watchdog.disarm(guard)
            if not retryable(exc) or self.control is None:
                if isinstance(exc, ConnectionAbortedError):
                    raise exc
                raise wrap(exc, f"a {what}", settings.url) from exc
            self._counters["write_retries" if what == "write" else "connection_errors"] += 1
            if loop.time() >= deadline:
                raise BackendUnavailableError(
                    f"Redis at {redacted(settings.url)} did not answer for "
                    f"{limit:g}s ({what} not acknowledged): {exc or type(exc).__name__}"
                ) from exc
            rate_limited(
                logging.WARNING,
                ("redis-retry", settings.stream_key, what),
                "Redis %s failed (%s); retrying for up to %gs",
                what,
                exc,
                limit,
                interval=5.0,
            )
            pause = failover_pause(delay, exc) * (1 + random.random() / 2)
            await asyncio.sleep(min(pause, max(deadline - loop.time(), 0.0)))
            delay = min(delay * 2, 1.0)


class _Guard:
    """One attempt under the watchdog: its task, when it started, its deadline, and
    whether the watchdog cancelled it."""

    __slots__ = ("armed", "cancelling", "fired", "task", "when")

    def __init__(self, task: asyncio.Task[Any], armed: float, when: float) -> None:
        self.task = task
        self.armed = armed
        self.when = when
        self.cancelling = task.cancelling()
        self.fired = False


class _Watchdog:
    """Deadlines for many attempts on one timer: what `asyncio.timeout` does, without
    a timer (scheduled, then cancelled) per attempt, which was a twentieth of an
    awaited `notify`. The timer fires at the earliest deadline it was armed for; a
    later attempt's deadline is then armed anew, so a steady stream of writes costs
    one timer per `retry_timeout`, and an attempt past its deadline is cancelled
    (and its cancellation taken back, as `asyncio.timeout` does) within a loop
    iteration of it.
    """

    def __init__(self) -> None:
        self._guards: set[_Guard] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._next = math.inf  # when the timer fires

    def arm(self, when: float) -> _Guard:
        """Watch the current task until `disarm`; cancel it at `when` (loop time)."""
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        guard = _Guard(task, loop.time(), when)
        self._guards.add(guard)
        if when < self._next:
            if self._timer is not None:
                self._timer.cancel()
            self._next = when
            self._timer = loop.call_at(when, self._fire, loop)
        return guard

    def disarm(self, guard: _Guard) -> None:
        """The attempt ended (the timer stays armed: it may serve the next one)."""
        self._guards.discard(guard)

    def expired(self, guard: _Guard) -> bool:
        """Whether the CancelledError an attempt ended with was the watchdog's own
        (then taken back from the task), not a cancellation from outside."""
        return guard.fired and guard.task.uncancel() <= guard.cancelling

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._next = None, math.inf
        now = loop.time()
        later = math.inf
        for guard in self._guards:
            if guard.fired:
                continue
            if guard.when <= now:
                guard.fired = True
                guard.task.cancel()
            else:
                later = min(later, guard.when)
        if later < math.inf:
            self._next = later
            self._timer = loop.call_at(later, self._fire, loop)

    def stop(self) -> None:
        """Drop the timer (the connections are closed)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._next = None, math.inf


async def listening_peers(url: str, namespace: str) -> list[str]:
    """The peers of `namespace` listening on the Redis server at `url` now: the
    ids in the names of their subscription connections (role `r`, see the
    module's docstring) in `CLIENT LIST`, sorted. Needs the `CLIENT` command.

    Example (against a server)::

        peers = await listening_peers("redis://localhost:6379/0", "shop")
    """
    import redis.asyncio as aioredis

    label = re.sub(r"[^!-~]", "_", namespace)  # as `Connections.make` names them
    client = aioredis.Redis.from_url(url)
    try:
        clients = await client.client_list()
    finally:
        await client.aclose()
    peers = set()
    for entry in clients:
        parts = str(entry.get("name", "")).split(":")
        if len(parts) == 4 and parts[:2] == ["ivip", label] and parts[3] == "r":
            peers.add(parts[2])
    return sorted(peers)
