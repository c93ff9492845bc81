"""Writing to Redis: records framed once, sent through the scripts (one
`EVALSHA` from the caller's task, or a pipeline of everything queued from one
writer task: group commit), retried through a lost connection, each append
told its own outcome, and this process's mirror told what was stored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from ...errors import IPCClosedError
from ...records import HEADER_SIZE, Kind, Record, encode_frame
from .connections import Connections, retryable, wrap
from .endpoints import failover_pause
from .scripts import APPEND_SHA, SET_IF_NEWER_SHA, load_scripts
from .settings import Settings, Shared

__all__ = ["OWN_WINDOW", "Writer"]

# An encoded write: frame, cache entry key (None: messages), version, expiry ms,
# and the cache record it carries (None: messages).
_Op = tuple[bytes, bytes | None, str, int, Record | None]
OWN_WINDOW: Final = 30.0  # seconds own pushes are applied after an unknown outcome
_STORED: Final[list[Exception | None]] = [None]  # `_send`'s answer for one op, stored


def _messages_op(frames: list[bytes], first_seq: int, node: int) -> _Op:
    """Message frames (sequence numbers from `first_seq` on) as one stream entry: a
    BATCH frame when there are several (readers get all or none; one XADD)."""
    if len(frames) == 1:
        return frames[0], None, "", 0, None
    batch = Record(Kind.BATCH, "", b"", b"".join(frames), node=node)
    return encode_frame(batch, first_seq), None, "", 0, None


class Writer:
    """The writes of one backend: sequence numbers, the queue and its writer
    task, and the window after a write of unknown outcome.

    Args:
        shared: What the backend's parts share (settings, counters, sink).
        connections: Its connections (writes go on `connections.write`).
    """

    def __init__(self, shared: Shared, connections: Connections) -> None:
        self._shared = shared
        self._settings = shared.settings
        self._connections = connections
        self._counters = shared.counters
        self._seq = 0
        self._task: asyncio.Future[None] | None = None  # the write under way
        self._queue: list[tuple[Sequence[Record], asyncio.Future[None]]] = []
        # Until then (loop time), this process's own cache records pushed back by
        # Redis are applied here too: a write whose outcome is unknown may be run.
        self.own_until = 0.0
        self._packer: _Packer | None = None  # made on the first write (the encoder)

    async def append(self, records: Sequence[Record]) -> None:
        """Write records; return once Redis has them (and their state applies here).

        A lone append of messages, with nothing else being written, is sent from
        the caller's task; otherwise appends queue for one writer task that sends
        everything queued as one pipeline (group commit), so concurrent appends
        share a round trip and keep their order.
        """
        idle = not self._queue and (self._task is None or self._task.done())
        if idle and all(r.kind is Kind.MESSAGE for r in records):
            # Nothing else is being written: send from this task, sparing a writer
            # task (a third of the cost of an awaited notify). Only messages: a
            # cache write cancelled on the wire must still learn whether it was
            # stored (to apply it here too), which the writer task sees through.
            self._task = done = asyncio.get_running_loop().create_future()
            try:
                ops = self._encode(records)
                errors = await self._connections.retrying("write", self._send, ops)
                if errors is not _STORED:
                    failed = next((error for error in errors if error is not None), None)
                    if failed is not None:
                        raise failed
                self._counters["records_written"] += len(records)
            finally:
                if not done.done():
                    done.set_result(None)
                if self._queue:  # appends that came meanwhile
                    self._task = asyncio.get_running_loop().create_task(self._write_queued())
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((records, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._write_queued())
        await fut

    async def alone(self, request: Callable[[int], bytes]) -> Any:
        """Send one request by itself, in order with this writer's appends (after
        those appended before it, before those appended after), and return
        Redis's answer. `request` gets the next sequence number and returns the
        packed command.

        Sent once, never resent after it may have reached Redis (a conditional
        write run twice would not be one write): a lost connection, a time limit
        or a cancellation leaves the outcome unknown (raised as
        `BackendUnavailableError`, and this process applies its own writes that
        Redis pushes back for a while, as after any write of unknown outcome).
        An error Redis answered stored nothing (raised as a `BackendError`).
        """
        from redis.exceptions import NoScriptError, ResponseError

        loop = asyncio.get_running_loop()
        while self._queue or (self._task is not None and not self._task.done()):
            await self.drain()
            if self._queue and (self._task is None or self._task.done()):
                await asyncio.sleep(0)  # (the queue's task is about to start)
        self._task = done = loop.create_future()
        try:
            client = self._connections.write
            if client is None:
                raise ConnectionAbortedError("the IPC instance is closed")
            self._seq += 1
            command = request(self._seq)
            sent = False
            deadline = loop.time() + max(self._settings.retry_timeout, 1.0)
            delay = 0.05
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        connection = client.connection
                        if connection is None:
                            connection = (await client.initialize()).connection
                        for _ in range(2):
                            # Connected first (redis-py reconnects a dropped
                            # connection on send): a failure here sent nothing.
                            await _drop_if_closed(connection)
                            await connection.connect()
                            sent = True
                            await connection.send_packed_command(command, check_health=False)
                            try:
                                return await connection.read_response()
                            except NoScriptError:
                                # Not run: Redis lost its scripts (a restart, SCRIPT FLUSH).
                                sent = False
                                await load_scripts(self._connections.control)
                        raise ConnectionError("Redis lost its scripts twice")
                except ResponseError as exc:
                    raise wrap(exc, "a conditional write", self._settings.url) from exc
                except BaseException as exc:
                    if sent:  # Redis may have run it (or may yet): its push is applied here
                        self.own_until = loop.time() + OWN_WINDOW
                    elif (
                        isinstance(exc, Exception)
                        and retryable(exc)
                        and loop.time() + delay < deadline
                    ):
                        self._counters["write_retries"] += 1
                        await asyncio.sleep(failover_pause(delay, exc))  # nothing sent:
                        delay = min(delay * 2, 1.0)  # safe to try again
                        continue
                    if isinstance(exc, Exception) and not isinstance(exc, ConnectionAbortedError):
                        raise wrap(exc, "a conditional write", self._settings.url) from exc
                    raise
        finally:
            done.set_result(None)
            if self._queue:  # appends that came meanwhile
                self._task = loop.create_task(self._write_queued())

    async def drain(self) -> None:
        """Wait until what was accepted is sent: the write under way, and the
        writer task it may hand the queue to. (`wait`, unlike `gather`, never
        cancels them.)"""
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    async def _write_queued(self) -> None:
        while self._queue:
            # An append whose caller was cancelled while it waited is not sent: a
            # cancelled `notify` or `set` then happened nowhere.
            batch = [(records, fut) for records, fut in self._queue if not fut.cancelled()]
            self._queue = []
            if not batch:
                continue
            # Framed once: a retry resends the same sequence numbers, which is
            # how readers recognise (and drop) what an attempt already stored.
            # Each append is encoded alone, so its messages share one entry.
            encoded = [self._encode(records) for records, _ in batch]
            ops = [op for part in encoded for op in part]
            try:
                errors = await self._connections.retrying("write", self._send, ops)
                if len(errors) != len(ops):  # (never: a guard, so no caller waits forever)
                    raise RuntimeError(f"{len(errors)} answers to {len(ops)} writes")
            except Exception as exc:
                # Unknown outcome: Redis may have run (or may yet run) any of them.
                # What it stores it pushes back here too: applied for a while.
                if any(op[4] is not None for op in ops):
                    self.own_until = asyncio.get_running_loop().time() + OWN_WINDOW
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            # Stored (each op for which Redis answered no error): the peers apply
            # these cache records, so this process must too, whether or not their
            # callers are still waiting (one cancelled while on the wire was
            # stored all the same), and whether or not the rest of their append was.
            if not any(errors):  # all stored: the usual case, without the bookkeeping
                state = [op[4] for op in ops if op[4] is not None]
                if state and self._shared.sink is not None:
                    self._shared.sink.written(state)
                self._counters["records_written"] += sum(len(records) for records, _ in batch)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
                continue
            state = [
                op[4]
                for op, error in zip(ops, errors, strict=True)
                if error is None and op[4] is not None
            ]
            if state and self._shared.sink is not None:
                self._shared.sink.written(state)
            at = 0
            for (records, fut), part in zip(batch, encoded, strict=True):
                failed = next((e for e in errors[at : at + len(part)] if e is not None), None)
                at += len(part)
                if failed is None:
                    self._counters["records_written"] += len(records)
                if not fut.done():
                    if failed is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(failed)

    def _encode(self, records: Sequence[Record]) -> list[_Op]:
        """`(frame, entry key, version, expiry ms)` per record (key None: a message)."""
        settings = self._settings
        now_ms = int(time.time() * 1000)
        ops: list[_Op] = []
        messages: list[bytes] = []  # consecutive message frames: one stream entry
        size = 0
        for record in records:
            self._seq += 1
            frame = encode_frame(record, self._seq)
            if record.kind is Kind.MESSAGE:
                if messages and size + len(frame) > settings.max_record_size - HEADER_SIZE:
                    ops.append(_messages_op(messages, self._seq - len(messages), settings.node))
                    messages, size = [], 0
                messages.append(frame)
                size += len(frame)
                continue
            if messages:
                ops.append(_messages_op(messages, self._seq - len(messages), settings.node))
                messages, size = [], 0
            if record.kind is Kind.CACHE_SET:
                expires_ms = int(record.expires * 1000) if record.expires else 0
            else:
                expires_ms = now_ms + int(settings.tombstone_ttl * 1000)
            version = f"{record.hlc:020d}{record.node:020d}"
            ops.append(
                (frame, settings.entry_key(record.topic, record.key), version, expires_ms, record)
            )
        if messages:
            ops.append(_messages_op(messages, self._seq + 1 - len(messages), settings.node))
        return ops

    async def _send(self, ops: list[_Op]) -> list[Exception | None]:
        """Store and publish: messages through `APPEND`, cache records through the
        last-writer-wins script; several in one pipeline. Returns, per op, None
        (stored) or the documented error Redis answered (nothing stored); raises
        what a retry may cure."""
        from redis.exceptions import NoScriptError, ResponseError

        client = self._connections.write
        if client is None:
            raise IPCClosedError("the IPC instance is closed")
        connection = client.connection
        if connection is None:  # (connects it; a failure is retried like any write)
            connection = (await client.initialize()).connection
        if self._packer is None:
            self._packer = _Packer(self._settings, connection.encoder.encode)
        pack = self._packer.pack
        # EVALSHA packed by hand, on the write connection itself: redis-py's
        # command path (its connection pool, argument encoding, retry and
        # telemetry wrappers) was a fifth of an awaited notify, and its Script
        # objects cost a wrapper per call, and in a pipeline one more round trip
        # (SCRIPT EXISTS) per write. redis-py still connects (AUTH, SELECT, the
        # name), reconnects on the next send after an error, parses the replies,
        # and drops the connection when a read is interrupted (a timeout, a
        # cancellation), so no stale reply is ever read as another's.
        try:
            if len(ops) == 1:
                await connection.send_packed_command(pack(ops[0]), check_health=False)
                await connection.read_response()
                return _STORED
            await connection.send_packed_command(
                b"".join([pack(op) for op in ops]), check_health=False
            )
            replies: list[Exception | None] = []
            for _ in ops:
                try:
                    await connection.read_response()
                    replies.append(None)
                except ResponseError as exc:  # (answered: the connection reads on)
                    replies.append(exc)
            for reply in replies:
                if reply is not None and retryable(reply):
                    raise reply  # resent whole: readers drop what was stored twice
        except NoScriptError:
            # Redis lost the scripts (a restart, SCRIPT FLUSH): load them, and let
            # `retrying` send again (readers drop what was already stored).
            await load_scripts(self._connections.control)
            raise
        return [
            None if reply is None else wrap(reply, "a write", self._settings.url)
            for reply in replies
        ]


async def _drop_if_closed(connection: Any) -> None:
    """Disconnect a connection the server has closed (its end of stream already
    seen) or that holds an unread answer, so that `connect()` makes a new one
    before anything is sent on it."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    if not getattr(connection, "is_connected", True):
        return
    check = getattr(connection, "can_read", None)
    if check is None:  # redis-py 7
        check = connection.can_read_destructive
    try:
        stale = await check()
    except (RedisConnectionError, OSError):
        stale = True
    if stale:
        await connection.disconnect()


class _Packer:
    """`EVALSHA` commands, in the wire format, for the encoded ops of one backend:
    what every write of a kind shares is packed once.

    Args:
        settings: The backend's settings (key names, limits).
        encode: The connection's encoder (str to bytes, as redis-py sends them).
    """

    def __init__(self, settings: Settings, encode: Any) -> None:
        self._settings = settings
        self._encode = encode
        self._ttl = str(int(settings.state_ttl * 1000)).encode()
        self._half_bytes = settings.stream_max_bytes >> 1
        stream, channel = encode(settings.stream_key), encode(settings.channel)
        self._stream, self._channel = stream, channel
        self._index = encode(settings.index_key)
        self._cut = b"%d" % len(settings.entry_prefix)
        # APPEND: EVALSHA sha 1 stream | frame maxlen | channel ttl
        self._append_head = _bulks([b"EVALSHA", APPEND_SHA.encode(), b"1", stream], 8)
        self._append_tail = _bulks([channel, self._ttl])

    def pack(self, op: _Op) -> bytes:
        """One op's `EVALSHA`: sha, number of keys, keys (the entry's, the stream,
        the index), then the frame, (the version and expiry,) MAXLEN, channel,
        the TTL (and the length of the entries' prefix)."""
        frame, entry_key, version, expires_ms, _ = op
        # The stream holds at most stream_maxlen entries, and about
        # stream_max_bytes: each write trims it to as many entries of its own
        # size as fit in half of that (so a run of small entries after large
        # ones can hold the large ones and fill the other half, no more).
        maxlen = b"%d" % min(self._settings.stream_maxlen, max(1, self._half_bytes // len(frame)))
        if entry_key is None:
            return b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n%s" % (
                self._append_head, len(frame), frame, len(maxlen), maxlen, self._append_tail
            )  # fmt: skip
        return _bulks(
            [
                b"EVALSHA", SET_IF_NEWER_SHA.encode(), b"3", entry_key, self._stream,
                self._index, frame, self._encode(version), b"%d" % expires_ms, maxlen,
                self._channel, self._ttl, self._cut,
            ],
            13,
        )  # fmt: skip


def _bulks(parts: list[bytes], count: int | None = None) -> bytes:
    """`parts` as RESP bulk strings, after an array header of `count` when given."""
    head = [b"*%d\r\n" % count] if count is not None else []
    return b"".join(head + [b"$%d\r\n%s\r\n" % (len(part), part) for part in parts])
