"""Recovery: when a writer's bytes are not whole, or not there at all.

`FrameRecovery` deals with an incomplete frame: a torn tail at a segment's final
end (dropped whole), a frame stuck behind a forged length while its writer
lives (given up, the records it hid handed on), a segment truncated under the
reader (read again). `Gaps` deals with records never read: a jump in a writer's
sequence numbers; it names the cause (the size cap, the retention window,
corruption, truncation), counts and reports it, and rebuilds the cache state:
the snapshot, then every writer's retained log up to where this process has
read it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from ...logs import logger, rate_limited
from ...records import HEADER_SIZE, FrameReader, Kind
from ..base import RecordSink
from .layout import READ_CHUNK, SEGMENT_RE, Namespace, breathe, open_regular, sliced

if TYPE_CHECKING:
    from .peers import Peers
    from .reader import LogReader, WriterState
    from .snapshots import Snapshots


class FrameRecovery:
    """What becomes of a frame that is not whole.

    Example:
        >>> import tempfile
        >>> recovery = FrameRecovery(Namespace(tempfile.mkdtemp() + "/ns"))
    """

    def __init__(self, ns: Namespace) -> None:
        self._ns = ns

    def connect(self, reader: LogReader, peers: Peers) -> None:
        self._reader = reader
        self._peers = peers

    def drop_tail(self, w: WriterState, why: str) -> None:
        """The end of a segment is final: hand on the records still held, drop the
        incomplete frame at the end (a torn write: never acknowledged, and its
        sequence numbers are used again by the writer's next records).

        Whole frames inside a torn BATCH must not be salvaged here: the batch
        is all or nothing. Records hidden behind a forged length are recovered
        earlier, while the writer is live (`unstick`)."""
        while w.reader.backlog:
            self._reader.take(w, w.reader.feed())
        dropped = w.reader.discard_pending()
        if dropped:
            self._ns.counters["torn_tails"] += 1
            rate_limited(
                logging.WARNING,
                ("torn", w.peer),
                "skipped a torn record of %d bytes at the end of segment %s-%08d (%s)",
                dropped,
                w.peer,
                w.segment,
                why,
            )

    def truncated(self, w: WriterState) -> None:
        """A segment shrank under this reader (someone truncated it): read it
        again from the start; what was delivered is skipped by sequence number."""
        logger.warning("segment %s-%08d was truncated: reading it again", w.peer, w.segment)
        w.cause = "truncation (its segment was cut short before this process read it)"
        w.reader.discard_pending()
        w.offset = 0
        w.stuck_at = -1

    def unstick(self, w: WriterState) -> None:
        """An incomplete frame of a live writer that stays incomplete from one
        safety re-scan to the next, with bytes behind its header, has a corrupted
        or forged length (a real write lands whole within microseconds): give it
        up and hand on the records it hid, instead of losing them at rotation.

        (A writer whose disk filled mid-batch, and that could not even start a
        new segment, leaves a torn batch that looks the same: its whole inner
        records are then delivered although the caller got the error.)"""
        reader = w.reader
        if reader.pending <= HEADER_SIZE or reader.backlog or w.dead:
            w.stuck_at = -1
            return
        at = w.offset - reader.pending
        if at != w.stuck_at:
            w.stuck_at = at
            return
        if not self._peers.holds_lock(w.peer):
            return  # a dead writer's torn tail: dropped by `drop_tail` once it is collected
        w.stuck_at = -1
        self._reader.take(w, reader.salvage())


class Gaps:
    """Reports gaps in other writers' records and resynchronises the cache.

    Example:
        >>> import tempfile
        >>> gaps = Gaps(Namespace(tempfile.mkdtemp() + "/ns"))
    """

    def __init__(self, ns: Namespace) -> None:
        self._ns = ns

    def connect(self, reader: LogReader, peers: Peers, snapshots: Snapshots) -> None:
        self._reader = reader
        self._peers = peers
        self._snapshots = snapshots

    def report(self, w: WriterState, lost: int) -> None:
        """`lost` records of `w` were never read: count, warn, resync the cache."""
        counters = self._ns.counters
        counters["gaps"] += 1
        counters["records_lost"] += lost
        cause = w.cause or self.cause(w.peer, w.segment - 1)
        w.cause = ""
        key = cause.split(" ", 1)[0]
        counters[f"records_lost_{key}"] = counters.get(f"records_lost_{key}", 0) + lost
        rate_limited(
            logging.WARNING,
            ("gap", w.peer),
            "gap in the records of peer %s: %d records were lost to this process: %s",
            w.peer,
            lost,
            cause,
        )
        if w.live and self._ns.sink is not None:
            self._ns.sink.gap(w.peer, lost)
            self._ns.spawn(self._resync_state)

    def cause(self, peer: str, segment: int) -> str:
        """Why a segment of `peer` is gone: written in a namespace directory that
        was removed or moved, or deleted under the size cap (its writer says
        either in its lock file); else the retention window."""
        if segment <= self._peers.noted(peer, "displaced_through"):
            return (
                "displaced (its writer wrote them in the namespace directory after it "
                "was removed or moved, where this process could not read them)"
            )
        if segment <= self._peers.capped_through(peer):
            return (
                "cap (its writer deleted them to keep the namespace under max_footprint "
                "before this process read them)"
            )
        return (
            "retention (they were deleted before this process read them: it fell more "
            "than the retention window behind)"
        )

    async def _resync_state(self) -> None:
        """Rebuild the cache state after a gap: the snapshot, then the retained log
        of every writer up to where this process has read it."""
        await self._snapshots.load(positions=False)
        sink, log_fd = self._ns.sink, self._ns.fds.get("log")
        if sink is None or log_fd is None:
            return
        for w in list(self._reader.writers.values()):
            for name in sorted(self._ns.segments_of(w.peer)):
                m = SEGMENT_RE.match(name)
                if m is None or int(m.group(2)) > w.segment:
                    continue
                stop = w.offset if int(m.group(2)) == w.segment else None
                await self._replay_segment(name, stop, sink)

    async def _replay_segment(self, name: str, stop: int | None, sink: RecordSink) -> None:
        """Feed the cache records of one segment (up to `stop`) to `sink.restore`."""
        try:
            fd = open_regular(name, os.O_RDONLY, self._ns.fds["log"])
        except OSError:
            return  # deleted meanwhile: the snapshot covers it
        try:
            reader = FrameReader(self._ns.max_record_size)
            offset = 0
            while stop is None or offset < stop:
                size = READ_CHUNK if stop is None else min(READ_CHUNK, stop - offset)
                data = os.pread(fd, size, offset)
                if not data:
                    break
                offset += len(data)
                await _restore_sliced(reader, data, sink)
        finally:
            os.close(fd)


async def _restore_sliced(reader: FrameReader, data: bytes, sink: RecordSink) -> None:
    """Feed `data` to `sink.restore` a slice at a time, yielding to the loop between."""
    async for records in sliced(reader, data):
        sink.restore([r for r in records if r.kind is not Kind.MESSAGE])
    await breathe()
