"""Handing what the listener read to the sink: each sender's records once and
in order (a retried write is stored twice, delivered once), this process's own
writes skipped (or applied, after a write of unknown outcome), and the
position moved past every entry."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any, Final

from ...records import NODE_OFFSET, FrameReader, Kind, Record
from .position import Position
from .settings import Shared
from .writer import Writer

__all__ = ["Delivery"]

_SEEN_PEERS: Final = 4096  # senders whose last sequence number is remembered (LRU)


class Delivery:
    """The last sequence number delivered of each sender (the most recent 4,096
    senders), and what to do with this process's own writes.

    Args:
        shared: What the backend's parts share (settings, counters, sink).
        position: The listener's position (moved past each entry delivered).
        writer: The writes (own pushes are applied after an unknown outcome).
    """

    def __init__(self, shared: Shared, position: Position, writer: Writer) -> None:
        self._shared = shared
        self._settings = shared.settings
        self._position = position
        self._writer = writer
        self._counters = shared.counters
        self._garbage = shared.garbage
        self._node_bytes = shared.settings.node.to_bytes(8, "little")  # as in a frame's header
        self._seen: OrderedDict[int, int] = OrderedDict()  # sender -> last seq delivered

    def deliver(self, entries: list[tuple[Any, bytes | None]], reader: FrameReader) -> None:
        """Hand the records of `entries` (`(stream id, frame)`, read on from the
        position) to the sink, and move the position, and the count of entries
        read, past them."""
        assert self._shared.sink is not None
        position = self._position
        if position.added is not None:
            position.added += len(entries)
        fresh: list[Record] = []
        seen = self._seen
        for entry_id, frame in entries:
            position.last_id = entry_id
            if not frame:
                continue
            if frame[NODE_OFFSET : NODE_OFFSET + 8] == self._node_bytes:
                # This process's own write (Redis pushes it here too): not parsed,
                # unless a write of unknown outcome may be in it (then applied).
                if self._writer.own_until and not self._own_write(frame):
                    self._writer.own_until = 0.0
                continue
            records = reader.feed(frame)
            self._counters["garbage_bytes"] += reader.discard_pending()
            for record in records:
                last = seen.get(record.node)
                if last is not None and record.seq <= last:
                    self._counters["duplicates_dropped"] += 1  # a retried write
                    continue
                seen[record.node] = record.seq
                seen.move_to_end(record.node)
                if len(seen) > _SEEN_PEERS:
                    seen.popitem(last=False)
                fresh.append(record)
        if fresh:
            self._counters["records_read"] += len(fresh)
            self._shared.sink.deliver(fresh)

    def deliver_push(self, entry_id: bytes, payload: bytes, at: int, reader: FrameReader) -> None:
        """`deliver` of one pushed entry, its frame at `payload[at:]`: this
        process's own writes (every push it sends comes back to it) are told
        apart by the node id in the frame's header, before anything is copied
        or parsed, and only move the position."""
        node = at + NODE_OFFSET
        if payload[node : node + 8] == self._node_bytes and not self._writer.own_until:
            position = self._position
            position.last_id = entry_id
            if position.added is not None:
                position.added += 1
            return
        self.deliver([(entry_id, payload[at:])], reader)

    def _own_write(self, frame: bytes) -> bool:
        """Apply the cache records of an own write pushed back by Redis, while a
        write of unknown outcome may be run late; False once that window is over."""
        if asyncio.get_running_loop().time() > self._writer.own_until:
            return False
        state = FrameReader(self._settings.max_record_size, self._garbage).feed(frame)
        state = [record for record in state if record.kind is not Kind.MESSAGE]
        if state and self._shared.sink is not None:
            self._shared.sink.written(state)
        return True
