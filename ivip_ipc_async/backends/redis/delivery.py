"""Handing what the listener read to the sink: each sender's records once and
in order (a retried write is stored twice, delivered once), this process's own
writes skipped (or applied, after a write of unknown outcome), and the
position moved past every entry."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from ...records import NODE_OFFSET, FrameReader, Kind, Record
from ..base import RecordSink
from .connections import Settings
from .position import Position
from .writer import Writer

__all__ = ["Delivery"]

_SEEN_PEERS: Final = 4096  # senders whose last sequence number is remembered (LRU)


class Delivery:
    """The last sequence number delivered of each sender (the most recent 4,096
    senders), and what to do with this process's own writes.

    Args:
        settings: The backend's settings.
        position: The listener's position (moved past each entry delivered).
        writer: The writes (own pushes are applied after an unknown outcome).
        counters: The backend's counters.
        garbage: Called with the size of, and the reason for, bytes skipped.
    """

    def __init__(
        self,
        settings: Settings,
        position: Position,
        writer: Writer,
        counters: dict[str, int],
        garbage: Callable[[int, str], None],
    ) -> None:
        self._settings = settings
        self._position = position
        self._writer = writer
        self._counters = counters
        self._garbage = garbage
        self._node_bytes = settings.node.to_bytes(8, "little")  # as in a frame's header
        self.sink: RecordSink | None = None
        self._seen: OrderedDict[int, int] = OrderedDict()  # sender -> last seq delivered

    def deliver(self, entries: list[tuple[Any, bytes | None]], reader: FrameReader) -> None:
        """Hand the records of `entries` (`(stream id, frame)`, read on from the
        position) to the sink, and move the position, and the count of entries
        read, past them."""
        assert self.sink is not None
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
            self.sink.deliver(fresh)

    def _own_write(self, frame: bytes) -> bool:
        """Apply the cache records of an own write pushed back by Redis, while a
        write of unknown outcome may be run late; False once that window is over."""
        if asyncio.get_running_loop().time() > self._writer.own_until:
            return False
        state = FrameReader(self._settings.max_record_size, self._garbage).feed(frame)
        state = [record for record in state if record.kind is not Kind.MESSAGE]
        if state and self.sink is not None:
            self.sink.written(state)
        return True
