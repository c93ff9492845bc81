"""The listener: one task per backend that subscribes, catches up from the
stream with checked reads, delivers what Redis pushes (each sender's records
once, in order), PINGs a silent connection, runs the periodic state check, and
reconnects and resynchronises after any error."""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any, Final

from ...logs import logger
from ...records import MAGIC, FrameReader
from ..base import LossCause, count_loss
from .connections import Connections
from .delivery import Delivery
from .endpoints import failover_pause
from .position import Position
from .replies import (
    StreamId,
    StreamInfo,
    field,
    id_tuple,
    is_kind,
    is_no_such_key,
    parse_info,
    stream_entries,
)
from .settings import Shared
from .state import NamespaceState
from .writer import OWN_WINDOW, Writer

__all__ = ["Listener"]

READ_COUNT: Final = 1000  # stream entries per catch-up read
_ID_MAX: Final = 41  # the longest stream id: two 64-bit numbers and a dash


class _Reconnected(ConnectionError):
    """The listener's connection was re-established behind its back (by redis-py)."""


class Listener:
    """The reading side of one backend: the task, whether it is connected, and
    where the last catch-up read up to (the first pushes may repeat it).

    Args:
        shared: What the backend's parts share (settings, counters, sink).
        connections: Its connections (`reader` subscribed, `control` for reads).
        position: Where it is in the stream.
        state: The namespace's state (reloads, the periodic check).
        delivery: Hands what was read to the sink.
        writer: The writes (the own-write window outlives a reconnection).
    """

    def __init__(
        self,
        shared: Shared,
        connections: Connections,
        position: Position,
        state: NamespaceState,
        delivery: Delivery,
        writer: Writer,
    ) -> None:
        self._shared = shared
        self._settings = shared.settings
        self._connections = connections
        self.position = position
        self._state = state
        self.delivery = delivery
        self._writer = writer
        self._counters = shared.counters
        self._garbage = shared.garbage
        self.task: asyncio.Task[None] | None = None
        self.connected = False
        self.closing = False
        self._replayed: StreamId | None = None  # where the last catch-up read up to

    def start(self) -> None:
        """Start the listener task (the backend has joined: connected and loaded)."""
        self.connected = True
        self.task = asyncio.get_running_loop().create_task(
            self._listen(), name="ivip-ipc-redis-listener"
        )

    async def stop(self) -> None:
        """Stop the task, and wait until it has ended."""
        self.closing = True
        listener = self.task
        if listener is not None:
            # Cancelled until it ends: a redis-py read with a socket timeout that
            # completes just as the cancellation lands can swallow it (Python 3.11).
            while not listener.done():
                listener.cancel()
                await asyncio.wait({listener}, timeout=0.05)
            await asyncio.gather(listener, return_exceptions=True)

    def abandon(self) -> None:
        """The loop is gone: cancel the task if its loop still can."""
        self.closing = True
        if self.task is not None and not self.task.get_loop().is_closed():
            self.task.cancel()

    async def _listen(self) -> None:
        """Read the stream forever; reconnect with backoff; never die silently."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        backoff = 0.1
        resync = False
        while not self.closing:
            try:
                if resync:
                    await self._resync()
                    resync = False
                    backoff = 0.1
                await self._read_forever()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection lost, server restarting, a bug, ...
                # (close() cancels this task: a closing instance never gets here)
                if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
                    self._counters["connection_errors"] += 1
                    if self.connected:
                        logger.warning("lost the Redis connection (%s); reconnecting", exc)
                    else:
                        logger.info(
                            "Redis still unavailable (%s); retrying in %.1fs",
                            exc,
                            failover_pause(backoff, exc),
                        )
                else:
                    self._counters["task_failures"] += 1
                    logger.error("the Redis listener failed; resynchronising", exc_info=True)
                if self.connected:
                    self.connected = False
                    if self._shared.sink is not None:
                        self._shared.sink.mirror_ready(False)  # reads go to Redis meanwhile
                await self._connections.drop_reader_connection()
                resync = True
                await asyncio.sleep(failover_pause(backoff, exc) * (1 + random.random() / 2))
                backoff = min(backoff * 2, 1.0)

    async def _resync(self) -> None:
        """Back after a disconnect: check for a gap, reload the cache state, read on."""
        assert self._shared.sink is not None
        state = self._state
        await self._connections.control.ping()
        restarted = await state.server_restarted()
        await self._connections.note_reader_connection()
        reported = restarted and self.check_gap(await state.stream_info(), restarted=True)
        if restarted and not reported:
            logger.info("Redis restarted; it kept everything this process had read")
        if await state.marker_lost() and not reported:
            await state.lost("the namespace's keys are gone from Redis")
        if self._writer.own_until:  # own writes of unknown outcome may still be run
            loop = asyncio.get_running_loop()
            self._writer.own_until = max(self._writer.own_until, loop.time() + OWN_WINDOW)
        # Anything may have been missed while away: rebuild the mirror from Redis
        # (it was dropped), then read the stream on from where this reader was (the
        # catch-up's checked reads find, and count, what was trimmed or deleted).
        self._counters["resyncs"] += 1
        await state.load()
        self._counters["reconnects"] += 1
        self.connected = True
        self._shared.sink.mirror_ready(True)
        await self._connections.close_read_client()
        logger.info("reconnected to Redis")

    def check_gap(
        self,
        info: StreamInfo | None,
        *,
        restarted: bool = False,
        unread: int | None = None,
        at_position: bool = False,
    ) -> bool:
        """Whether records may have gone before this reader read them (see
        `Position.check`); if so, count it, log it and tell the sink. (The
        caller reloads the state.)"""
        gap, lost = self.position.check(info, unread=unread, at_position=at_position)
        if not gap:
            return False
        if restarted:
            self.position.added = None  # a restarted server's counts may have lost some
        self._counters["gaps"] += 1
        cause = LossCause.RESTART if restarted else LossCause.TRIMMED
        if lost is not None:
            count_loss(self._counters, cause, lost)
        logger.warning(
            "records may have been lost before this process read them from Redis "
            "(%s; %s): reloading the cache state",
            "the server restarted" if restarted else "trimmed or deleted from the stream",
            f"{lost} records" if lost is not None else "how many is unknown",
        )
        assert self._shared.sink is not None
        self._shared.sink.gap("redis", lost)
        return True

    async def _read_forever(self) -> None:
        """Subscribe, catch up from the stream, then deliver what Redis pushes.

        The subscription comes first, so every record stored after the catch-up
        read is pushed too: the catch-up reads (each a *checked* read, see
        `_checked_read`) bring this reader from its position to the end of the
        stream, and the pushes carry on from there. Both scripts store and
        publish in one atomic step, so pushes come in stream order, each with its
        stream id: one this reader already read while catching up is dropped.

        While subscribed nothing is lost, whatever happens to the stream: a
        reader too slow for Redis's output buffer limit is disconnected by Redis,
        which is a disconnect like any other (`_listen` reconnects, and the
        catch-up then finds what was trimmed meanwhile). After `ping_interval`
        seconds of silence the listener PINGs, and no answer within as long
        again counts as a lost connection.
        """
        connections = self._connections
        assert connections.reader is not None
        if not connections.subscribed:
            await connections.subscribe()
        connection = connections.reader.connection
        reader = FrameReader(self._settings.max_record_size, self._garbage)
        while await self._checked_read(reader):
            pass  # a full read: more to catch up on
        self._replayed = id_tuple(self.position.last_id)
        loop = asyncio.get_running_loop()
        # (often enough, too, to refresh the keys' expiry well within state_ttl)
        interval = min(self._settings.state_check_interval, self._settings.state_ttl / 3)
        ping = self._settings.ping_interval
        now = loop.time()
        silence = now + ping  # then PING (or, pinged, give up)
        check = now + interval  # when the namespace's keys are checked next
        pinged = False
        heard = now  # when Redis last said anything on this connection
        while not self.closing:
            if now >= check:
                await self._state.check()
                now = loop.time()
                check = now + interval
            # One time limit for every read until the next check or PING: a limit
            # per read (redis-py's `timeout=`) was a timer, made and cancelled, per
            # push. Reads never drop the connection themselves (the limit's
            # cancellation leaves it, and its buffer, whole); `_listen` does.
            limit = asyncio.timeout_at(max(min(check, silence), now + 0.001))
            try:
                async with limit:
                    while True:
                        response = await connection.read_response(
                            timeout=math.inf, disconnect_on_error=False, push_request=True
                        )
                        if connections.reader_reconnected:
                            raise _Reconnected(
                                "the listener's connection to Redis was re-established"
                            )
                        heard = loop.time()
                        pinged = False
                        if is_kind(response, "message"):
                            self._deliver_push(response[2], reader)
            except TimeoutError:
                if not limit.expired():
                    raise
            now = loop.time()
            silence = max(silence, heard + ping)
            if now < silence:
                continue  # (time for the check)
            if pinged:
                raise TimeoutError(f"Redis did not answer a PING in {ping:g}s")
            await connection.send_command("PING")
            pinged = True
            now = loop.time()
            silence = now + ping

    def _deliver_push(self, payload: Any, reader: FrameReader) -> None:
        """Deliver one pushed record (`<stream id> <frame>`), unless already read."""
        if not isinstance(payload, bytes) or not payload:
            return  # not ours (a stray PUBLISH), or the permission check at a start
        space = payload.find(b" ", 0, _ID_MAX + 1)
        entry_id = payload[:space]
        try:
            position = id_tuple(entry_id) if space > 0 else None
        except ValueError:
            position = None
        if position is None or not payload.startswith(MAGIC, space + 1):
            # Someone else's PUBLISH on the channel: it must not move the position.
            self._garbage(len(payload), "a message on the channel that is not a record")
            return
        if self._replayed is not None:  # the first pushes may repeat the catch-up's end
            if position <= self._replayed:
                return
            self._replayed = None  # pushes come in stream order: the rest are new
        self.delivery.deliver_push(entry_id, payload, space + 1, reader)

    async def _checked_read(self, reader: FrameReader) -> bool:
        """One catch-up read, checked: a `MULTI` of `XINFO STREAM` and `XREAD` that
        finds a restart, and entries gone before this reader read them (see
        `Position.check`); then deliver. True when it came back full (read again)."""
        assert self._shared.sink is not None
        stream_key, position = self._settings.stream_key, self.position
        pipe = self._connections.control.pipeline(transaction=True)
        pipe.xinfo_stream(stream_key)
        pipe.xread({stream_key: position.last_id}, count=READ_COUNT)
        pipe.xrange(stream_key, position.last_id, position.last_id)
        raw_info, response, at_position = await pipe.execute(raise_on_error=False)
        if isinstance(response, Exception):
            raise response
        if isinstance(raw_info, Exception) and not is_no_such_key(raw_info):
            raise raw_info
        info = None if isinstance(raw_info, Exception) else parse_info(raw_info)
        entries = stream_entries(response)
        full = len(entries) == READ_COUNT
        at_position = isinstance(at_position, list) and bool(at_position)  # (or an error)
        if self.check_gap(info, unread=None if full else len(entries), at_position=at_position):
            await self._state.reload()
            return True  # read on from the new position
        self.delivery.deliver(
            [(entry_id, field(fields, "r")) for entry_id, fields in entries], reader
        )
        if full:
            return True
        if info is not None and info.last >= id_tuple(position.last_id):
            # Read up to the end: everything up to last-generated-id is seen.
            position.last_id, position.added = info.last_raw, info.added
        return False
