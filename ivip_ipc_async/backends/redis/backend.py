"""`RedisBackend`: the parts of the Redis backend composed, its life (start,
close, abandon), cache reads while the mirror is rebuilt, and its stats."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Sequence
from typing import Any

from ...conditions import Conditional, Outcome
from ...errors import IPCClosedError
from ...logs import logger
from ...records import FrameReader, Record
from ..base import Problem, RecordSink
from .conditional import ConditionalWrites
from .connections import Connections, check_redis_url, redacted, retryable, wrap
from .delivery import Delivery
from .leases import RedisLeases
from .listener import Listener
from .position import Position
from .replies import is_no_such_key, parse_info
from .scripts import PROBE_SHA, load_scripts
from .settings import Settings, Shared
from .state import NamespaceState
from .writer import Writer

__all__ = ["RedisBackend"]


class RedisBackend:
    """Records stored in a Redis stream and pushed by pub/sub; cache state in hashes.

    Args:
        url: `redis://`, `rediss://` or `unix://` URL (as redis-py takes it), a
            `redis+sentinel://host:port[,host:port…]/service[/db]` URL
            (`rediss+sentinel://` with TLS), or any
            node's URL of a Redis Cluster (see endpoints.py).
        namespace: Instances in different namespaces do not hear each other.
        max_record_size: Largest record, in bytes.
        stream_maxlen: Entries kept in the stream (at least; it is trimmed
            approximately): the window a disconnected peer can catch up on.
            The same for every peer of a namespace.
        tombstone_ttl: Seconds a delete is remembered in Redis.
        ping_interval: Seconds of silence after which the listener PINGs Redis;
            no answer within as long again counts as a lost connection.
        retry_timeout: Seconds a write, or `start()`, keeps retrying a lost
            connection before it raises `BackendUnavailableError` (a
            `ConnectionError`; each write attempt gets at least 1 s, so the
            call may end up to a second past it).
        read_timeout: Seconds a cache read waits while the mirror is being
            rebuilt (it goes to Redis, or, for `keys()`, waits for the
            mirror) before it raises `BackendUnavailableError`.
        stream_max_bytes: About the most bytes of records the stream keeps
            (each write trims it to as many entries of its size as fit in
            half of this; a record larger than that is kept alone).
        state_ttl: Seconds the namespace's own keys (the stream, its marker)
            live after the last process stopped refreshing them.
        state_check_interval: Seconds between checks that Redis still holds
            the namespace's keys (marker gone or replaced: FLUSHALL, eviction,
            a failover; or, after the server's `evicted_keys` grew, entries
            of the mirror gone): then every process reports a gap and reloads.
        **redis_options: Passed to `redis.asyncio.Redis.from_url` (e.g. `protocol=2`).
            The listener's connection always has redis-py's own retries off and
            a socket timeout above `ping_interval` (it reconnects, and
            resynchronises, itself). By default writes time out after
            `retry_timeout` (at least 1 s), and the connections are named
            `ivip:<namespace>:<peer>:<role>` in `CLIENT LIST` (role `w` writes,
            `r` listens, `c` serves the listener's requests, `g` reads cache
            entries while the mirror is rebuilt, and is closed after; locks add
            two `l` for their commands and one `n` for their release notices;
            `client_name=None` to leave them unnamed). At most these seven
            connections per instance.

    Raises:
        ValueError: a URL that is not a valid Redis URL, or a bad option.

    Example:
        >>> backend = RedisBackend("redis://127.0.0.1:6379/0", namespace="docs")
        >>> backend.stream_key
        'ivip:{docs}:log'
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "default",
        max_record_size: int = 16 << 20,
        stream_maxlen: int = 100_000,
        tombstone_ttl: float = 120.0,
        ping_interval: float = 10.0,
        retry_timeout: float = 10.0,
        read_timeout: float = 5.0,
        stream_max_bytes: int = 64 << 20,
        state_ttl: float = 3600.0,
        state_check_interval: float = 2.0,
        **redis_options: Any,
    ) -> None:
        check_redis_url(url)
        if stream_maxlen < 1:
            raise ValueError("stream_maxlen must be at least 1")
        if stream_max_bytes < 1:
            raise ValueError("stream_max_bytes must be at least 1")
        if not ping_interval > 0:
            raise ValueError("ping_interval must be above 0 seconds")
        for name, value in (
            ("retry_timeout", retry_timeout),
            ("read_timeout", read_timeout),
            ("state_ttl", state_ttl),
            ("state_check_interval", state_check_interval),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be above 0 seconds")
        if redis_options.get("decode_responses"):
            raise ValueError("decode_responses must be off: records are binary frames")
        self.node = secrets.randbits(63) or 1
        self.settings = settings = Settings(
            url,
            namespace,
            self.node,
            max_record_size=max_record_size,
            stream_maxlen=stream_maxlen,
            tombstone_ttl=tombstone_ttl,
            ping_interval=ping_interval,
            retry_timeout=retry_timeout,
            read_timeout=read_timeout,
            stream_max_bytes=stream_max_bytes,
            state_ttl=state_ttl,
            state_check_interval=state_check_interval,
            redis_options=redis_options,
        )
        # The options, as attributes (read-only by convention: the parts read `settings`).
        self.url = url
        self.namespace = namespace
        self.max_record_size = max_record_size
        self.stream_maxlen = stream_maxlen
        self.tombstone_ttl = tombstone_ttl
        self.ping_interval = ping_interval
        self.retry_timeout = retry_timeout
        self.read_timeout = read_timeout
        self.stream_max_bytes = stream_max_bytes
        self.state_ttl = state_ttl
        self.state_check_interval = state_check_interval
        self.redis_options = redis_options
        self.stream_key = settings.stream_key
        self.channel = settings.channel
        self.entry_prefix = settings.entry_prefix
        self.marker_key = settings.marker_key
        # The parts, each with its own state (see "The Redis backend's files" in
        # docs/design.md), and what they share.
        self.shared = shared = Shared(settings)
        self.counters = shared.counters
        self.connections = Connections(shared)
        self.position = Position(stream_maxlen)
        self.state = NamespaceState(shared, self.connections, self.position)
        self.writer = Writer(shared, self.connections)
        self.delivery = Delivery(shared, self.position, self.writer)
        self.listener = Listener(
            shared, self.connections, self.position, self.state, self.delivery, self.writer
        )
        self._leases: RedisLeases | None = None  # made by locks() on first use
        self._conditional = ConditionalWrites(shared, self.writer)

    # -- life -------------------------------------------------------------------------

    async def start(self, sink: RecordSink) -> None:
        """Connect, check what the backend needs, load the cache state, and start
        the listener task.

        A connection refused, lost or unanswered is retried for `retry_timeout`
        seconds; anything else fails at once.

        Raises:
            BackendUnavailableError: Redis could not be reached in time.
            BackendPermissionError: the credentials, or a command, key or
                channel the backend needs, were refused (nothing was stored).
            BackendError: any other refusal (say, `DB index is out of range`).
        """
        self.shared.sink = sink
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_timeout
        delay = 0.1
        while True:
            self.connections.open()
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.1)):
                    await self._join()
                await self.state.load()  # (its own requests time out; no overall limit)
                break
            except Exception as exc:
                await self.connections.close()
                if not retryable(exc) or loop.time() + delay > deadline:
                    if isinstance(exc, TimeoutError) and not str(exc):
                        exc = TimeoutError(f"no answer in {self.retry_timeout:g}s")
                    raise wrap(exc, "the start", self.url) from exc
                logger.info("Redis not available yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except BaseException:
                await self.connections.close()
                raise
        self.listener.start()

    async def _join(self) -> None:
        """`start`'s requests: each checks something the backend needs, in the order
        that stores nothing until every permission is known to be there."""
        from redis.exceptions import OutOfMemoryError

        settings = self.settings
        client = self.connections.control
        await client.ping()
        await self.connections.endpoint.discover(client)  # a cluster: go to the slot's master
        await load_scripts(client)
        self.state.note_server(await self.state.server_info())
        full = None
        pipe = client.pipeline(transaction=False)
        # Every write command and PUBLISH (the locks' too, on their channels), on
        # a key that is gone when it ends; and EVAL, which the locks fall back on
        # when Redis lost their scripts (a restart).
        pipe.evalsha(PROBE_SHA, 1, settings.probe_key, settings.channel, settings.lock_prefix)
        pipe.eval("return 1", 0)
        try:
            await pipe.execute()
        except OutOfMemoryError as exc:  # a reader may start: writes will say it
            full = exc
        await self.connections.note_reader_connection()
        await self.connections.subscribe()
        # The reads of the catch-up (a MULTI of XINFO, XREAD, XRANGE): the position.
        pipe = client.pipeline(transaction=True)
        pipe.xinfo_stream(settings.stream_key)
        pipe.xread({settings.stream_key: b"0-0"}, count=1)
        pipe.xrange(settings.stream_key, b"-", b"+", count=1)
        raw_info, *rest = await pipe.execute(raise_on_error=False)
        for reply in (raw_info, *rest):
            if isinstance(reply, Exception) and not is_no_such_key(reply):
                raise reply
        self.position.move_to_end(None if isinstance(raw_info, Exception) else parse_info(raw_info))
        await client.scan(0, match=settings.entry_prefix + b"*", count=1)  # (the reload's)
        if full is None:
            with contextlib.suppress(OutOfMemoryError):
                await self.state.keep()  # the marker, and the keys' expiry: the first write
        if full is not None:
            logger.warning(
                "Redis at %s is full (%s): writes fail until it has room",
                redacted(self.url),
                full,
            )

    async def close(self) -> None:
        """Stop the listener and close the connections."""
        await self.writer.drain()  # what was accepted is sent first
        if self._leases is not None:
            await self._leases.close()  # held leases are released, not left to expire
        await self.listener.stop()
        await self.connections.close()

    def abandon(self) -> None:
        """The loop is gone: drop the connections without awaiting."""
        if self._leases is not None:
            self._leases.abandon()
        self.listener.abandon()
        self.connections.drop()

    def locks(self) -> RedisLeases:
        """The lock capability: leases with fencing tokens (backends/redis/leases.py)."""
        if self._leases is None:
            self._leases = RedisLeases(
                self.connections.make,
                self.namespace,
                retry_timeout=self.retry_timeout,
                url=self.url,
                state_ttl=self.state_ttl,
            )
        return self._leases

    # -- records -------------------------------------------------------------------------

    async def append(self, records: Sequence[Record]) -> None:
        """Write records; return once Redis has them (and their state applies here).

        A lone append of messages, with nothing else being written, is sent from
        the caller's task; otherwise appends queue for one writer task that sends
        everything queued as one pipeline (group commit), so concurrent appends
        share a round trip and keep their order.

        Raises:
            IPCClosedError: the backend is closed.
            ConnectionError: Redis could not be reached for `retry_timeout`
                seconds; the records may or may not have been stored.
        """
        if self.listener.closing or self.connections.control is None:
            raise IPCClosedError("the IPC instance is closed")
        await self.writer.append(records)

    async def write_if(self, op: Conditional) -> Outcome:
        """A conditional cache write: one script, one round trip (conditional.py).

        Raises:
            BackendUnavailableError: no answer: it may or may not have been stored.
        """
        if self.listener.closing or self.connections.control is None:
            raise ConnectionAbortedError("the IPC instance is closed")
        return await self._conditional.write_if(op)

    async def catch_up(self) -> None:
        """Nothing to do: a read that must see the present asks Redis (`fetch`)."""

    async def fetch(self, topic: str, key: bytes) -> Record | None:
        """One cache entry, read from Redis (while the mirror is being rebuilt).

        Reads share one connection, opened for the rebuild and closed after it.

        Raises:
            BackendUnavailableError: no answer within `read_timeout` seconds.
        """
        if self.listener.closing or self.connections.write is None:
            return None
        frame = await self.connections.read_entry(self.settings.entry_key(topic, key))
        if not frame:
            return None
        records = FrameReader(self.max_record_size, self.shared.garbage).feed(frame)
        return records[0] if records else None

    # -- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Connection state and counters."""
        task = self.listener.task
        last_id = self.position.last_id
        return {
            "backend": "redis",
            "url": redacted(self.url),
            "namespace": self.namespace,
            "peer": f"{self.node:016x}",
            "connected": self.listener.connected,
            # False while a lock waiter's release notices are down (resubscribing).
            "lock_notices_connected": self._leases is None or self._leases.notices_connected,
            "maintenance_alive": task is not None and not task.done(),
            "last_id": last_id.decode() if isinstance(last_id, bytes) else str(last_id),
            **self.counters,
        }

    # -- health ----------------------------------------------------------------------------

    gap_cause = "trimmed or deleted from the stream, or lost by Redis"

    def problems(self) -> list[Problem]:
        """What is wrong now, for `AsyncIPC.health()` (see `Backend.problems`)."""
        task = self.listener.task
        problems = []
        if task is None or task.done():
            problems.append(Problem("maintenance task is not running", unhealthy=True))
        if not self.listener.connected:
            text = (
                "not connected to Redis (reconnecting; cache reads go to Redis, writes are retried)"
            )
            problems.append(Problem(text, unhealthy=True))
        if self._leases is not None and not self._leases.notices_connected:
            text = "lock release notices are down (resubscribing; waiters poll)"
            problems.append(Problem(text, unhealthy=True))
        return problems
