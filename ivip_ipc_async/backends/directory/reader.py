"""Reading the other writers' segments, in order, a slice at a time.

`LogReader` keeps one `WriterState` per other writer (segment, offset, last
sequence number), reads what is new when told to look (`schedule_read`, by a
doorbell, the directory watcher or the safety re-scan), and hands records on in order to
the sink (`take`). What is not whole or not there goes to `recovery`: torn
tails, frames stuck behind a forged length, truncation (`FrameRecovery`), and
segments deleted before they were read (`Gaps`). At start it restores the
retained log as state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ... import fault_points
from ...logs import logger, rate_limited
from ...records import FrameReader, Kind, Record
from ..base import LossCause
from .layout import (
    READ_CHUNK,
    SEGMENT_RE,
    SLICE,
    STEP,
    Loss,
    Namespace,
    after_timers_due,
    breathe,
    open_regular,
    segment_name,
)

if TYPE_CHECKING:
    from .recovery import FrameRecovery, Gaps
    from .snapshots import Snapshots
    from .wakeups import Wakeups

_SEQ: Final = operator.itemgetter(7)  # Record.seq, by index: the faster getter
_RESYNC_TASK: Final = "ivip-ipc_resync_state"  # Gaps._resync_state, as Namespace.spawn names it
_MAX_OPEN_SEGMENTS: Final = 128  # reader fds kept open; the idlest are closed past this
_NOTHING: Final[frozenset[bytes]] = frozenset()  # the events wanted from a writer being restored


@dataclass(slots=True)
class WriterState:
    """What this process knows of one other writer's segments."""

    peer: str
    segment: int  # the segment being read
    reader: FrameReader
    fd: int | None = None
    offset: int = 0
    last_seq: int = 0  # last record sequence number delivered
    newest_segment: int = 0  # highest segment number seen for this writer
    live: bool = False  # False while restoring state at start
    dead: bool = False
    refused: bool = False  # a segment could not be opened safely (warned once)
    last_read: float = 0.0  # monotonic time of the last bytes read
    cause: Loss | None = None  # why records may be missing next: named in the gap report
    stuck_at: int = -1  # offset of an incomplete frame seen at the last safety re-scan


class LogReader:
    """Every other writer's records, read in order and handed to the sink.

    Example:
        >>> import tempfile
        >>> LogReader(Namespace(tempfile.mkdtemp() + "/ns")).writers
        {}
    """

    def __init__(self, ns: Namespace) -> None:
        self._ns = ns
        self.writers: dict[str, WriterState] = {}
        self.dirty: set[str] = set()  # writers with news to read
        self.full_scan_wanted = False
        self.live = False  # True once the log present at start has been restored
        self.listed = False  # log/ has been listed once: the writers present at start are known
        self._read_scheduled = False
        self._log_mtime = 0  # st_mtime_ns of log/ at the last full scan

    def connect(
        self, wakeups: Wakeups, snapshots: Snapshots, recovery: FrameRecovery, gaps: Gaps
    ) -> None:
        self._wakeups = wakeups
        self._snapshots = snapshots
        self._recovery = recovery
        self._gaps = gaps

    # -- when to read ----------------------------------------------------------------

    def schedule_read(self, full: bool = False) -> None:
        if full:
            self.full_scan_wanted = True
        if not self._read_scheduled and not self._ns.closing and self._ns.loop is not None:
            self._read_scheduled = True
            self._ns.loop.call_soon(self.read_pass)

    def read_now(self) -> None:
        """Read at once, unless a read pass is scheduled already."""
        if not self._read_scheduled:
            self._read_scheduled = True
            self.read_pass()  # read now: a call_soon would cost one more loop turn

    def news(self, peer: str, segment: bytes) -> None:
        """`peer` says it wrote to `segment` (8 ASCII digits): read it at the next
        pass. What says so is a doorbell datagram or a file name, which anyone of
        this user can forge: anything else says nothing."""
        if len(segment) != 8 or not segment.isdigit():
            return
        w = self.writers.get(peer)
        if w is None:
            self.full_scan_wanted = True
        else:
            w.newest_segment = max(w.newest_segment, int(segment))
            self.dirty.add(peer)

    def read_pass(self) -> None:
        self._read_scheduled = False
        if self._ns.closing:
            return
        self._wakeups.refresh_peers_if_wanted()
        if self.full_scan_wanted:
            self.full_scan_wanted = False
            self.scan()
            self.dirty.update(self.writers)
        deadline = time.perf_counter() + SLICE
        dirty, self.dirty = self.dirty, set()
        for peer in dirty:
            w = self.writers.get(peer)
            if w is None:
                continue
            if time.perf_counter() > deadline or not self._read_writer(w, deadline):
                self.dirty.add(peer)  # the rest in a later callback: the loop breathes
        if self.dirty and not self._read_scheduled:
            after_timers_due(self.read_pass)  # the rest in a later slice
            self._read_scheduled = True

    def scan(self) -> None:
        """List log/ and learn every writer's segments (the safety net)."""
        self._ns.counters["rescans"] += 1
        try:
            names = os.listdir(self._ns.fds["log"])
        except OSError as exc:
            logger.error("cannot list %s: %s", self._ns.path / "log", exc)
            return
        lowest: dict[str, int] = {}
        highest: dict[str, int] = {}
        for name in names:
            m = SEGMENT_RE.match(name)
            if m is None:
                continue
            peer, number = m.group(1), int(m.group(2))
            if peer == self._ns.peer:
                continue
            lowest[peer] = min(number, lowest.get(peer, number))
            highest[peer] = max(number, highest.get(peer, number))
        # Only the writers of the first listing are restored as history: one
        # found later began to write after this process began to start (a peer
        # started meanwhile, maybe during the restore), so it is live from its
        # first record. Were it restored instead, nothing would ever make it live.
        live = self.listed
        self.listed = True
        for peer, top in highest.items():
            w = self.writers.get(peer)
            if w is None:
                # At start, the snapshot already holds this writer's state up to a
                # position; a writer found later is read from its beginning.
                known = self._snapshots.positions.get(peer) if not live else None
                start, offset, last_seq = known or (0, 0, 0)
                if start < lowest[peer]:
                    start, offset, last_seq = lowest[peer], 0, 0
                w = self.writers[peer] = WriterState(
                    peer,
                    start,
                    FrameReader(self._ns.max_record_size, self.garbage_reporter(peer)),
                    offset=offset,
                    last_seq=last_seq,
                    live=live,
                )
            w.newest_segment = max(w.newest_segment, top)
            self.dirty.add(peer)

    def garbage_reporter(self, peer: str) -> Callable[[int, str], None]:
        def report(skipped: int, why: str) -> None:
            self._ns.counters["garbage_bytes"] += skipped
            w = self.writers.get(peer)
            if w is not None:
                w.cause = Loss(
                    LossCause.CORRUPTION, f"{why}: {skipped} unreadable bytes in its segment"
                )
            rate_limited(
                logging.WARNING,
                ("garbage", peer),
                "skipped %d unreadable bytes (%s) in segments of peer %s",
                skipped,
                why,
                peer,
            )

        return report

    # -- reading one writer --------------------------------------------------------

    def _read_writer(self, w: WriterState, deadline: float) -> bool:
        """Read and hand on what is new from one writer, in order, until
        `deadline` (`time.perf_counter()`); True once everything is read."""
        log_fd = self._ns.fds.get("log")
        if log_fd is None:
            return True
        reader = w.reader
        wanted = getattr(self._ns.sink, "wanted", None)
        # Messages of events nobody here listens to are skipped unread (their
        # sequence numbers still count). Asked again at each read: a listener
        # added by a handler hears the messages read after it was added. While
        # a writer is history, no message is dispatched, so none is decoded: a
        # joiner restores a long log of messages at the cost of its headers.
        if not w.live:
            reader.wanted = _NOTHING
        else:
            reader.wanted = wanted() if wanted is not None else None
        while True:
            if reader.backlog:
                self.take(w, reader.feed(limit=STEP))
                if time.perf_counter() > deadline:
                    return False
                continue
            if time.perf_counter() > deadline:
                return False
            if w.fd is None:
                self._limit_open_segments()
                try:
                    w.fd = open_regular(segment_name(w.peer, w.segment), os.O_RDONLY, log_fd)
                except FileNotFoundError:
                    if w.segment < w.newest_segment:
                        # Deleted before we got to it: the gap shows in seq.
                        w.cause = w.cause or self._gaps.cause(w.peer, w.segment)
                        w.segment += 1
                        w.offset = 0
                        continue
                    return True
                except OSError as exc:
                    # A symlink, FIFO or other planted thing where a segment should
                    # be: never followed nor waited on.
                    if not w.refused:
                        w.refused = True
                        logger.warning("refusing to read %s-%08d.seg: %s", w.peer, w.segment, exc)
                    if w.segment < w.newest_segment:
                        w.cause = Loss(
                            LossCause.CORRUPTION, "a segment was replaced by something unsafe"
                        )
                        w.segment += 1
                        w.offset = 0
                        continue
                    return True
            try:
                data = os.pread(w.fd, READ_CHUNK, w.offset)
            except OSError as exc:
                logger.error("cannot read segment of peer %s: %s", w.peer, exc)
                return True
            if data:
                w.last_read = time.monotonic()
                w.offset += len(data)
                self._ns.counters["bytes_read"] += len(data)
                records = reader.feed(data, STEP)
                self.take(w, records)
                if len(records) == STEP:
                    continue  # maybe more held back: given out at the top of the loop
                if len(data) < READ_CHUNK and w.segment >= w.newest_segment and not w.dead:
                    return True  # a short read is the end for now: skip the empty pread
                continue
            if w.segment < w.newest_segment:
                # The writer made a newer segment after finishing this one: this
                # end is final. What is left unparsed is a torn write.
                self._recovery.drop_tail(w, "its writer moved on")
                os.close(w.fd)
                w.fd = None
                w.segment += 1
                w.offset = 0
                continue
            if w.dead:
                # Its writer is gone and everything is read: give the fd back
                # (hundreds of short-lived peers must not exhaust our fds).
                self._recovery.drop_tail(w, "its writer died")
                os.close(w.fd)
                w.fd = None
            return True

    def _limit_open_segments(self) -> None:
        """Close the readers idle the longest when too many segments are open."""
        open_readers = [w for w in self.writers.values() if w.fd is not None]
        excess = len(open_readers) - _MAX_OPEN_SEGMENTS
        if excess <= 0:
            return
        open_readers.sort(key=lambda w: w.last_read)
        for w in open_readers[:excess]:
            if w.reader.pending:
                continue  # mid-record: keep reading from this offset on the same fd
            assert w.fd is not None
            os.close(w.fd)
            w.fd = None  # reopened by name, at the same offset, when it has news

    def take(self, w: WriterState, records: list[Record]) -> None:
        """Hand on `records` of `w` in order; a jump in sequence numbers is a gap."""
        if not records:
            return
        first = records[0].seq
        count = len(records)
        if first == w.last_seq + 1 and records[-1].seq == first + count - 1:
            # The common case, checked at C speed rather than record by record:
            # exactly the next sequence numbers, in order, none missing.
            seqs = list(map(_SEQ, records))
            if seqs == list(range(first, first + count)):
                w.last_seq = seqs[-1]
                self._hand_on(w, records)
                return
        fresh: list[Record] = []
        for rec in records:
            if rec.seq <= w.last_seq:
                continue  # already delivered (a re-read after a resync)
            if w.last_seq and rec.seq != w.last_seq + 1:
                self._gaps.report(w, rec.seq - w.last_seq - 1)
            w.last_seq = rec.seq
            if rec.kind is not Kind.SNAPSHOT_META:
                fresh.append(rec)
        if fresh:
            self._hand_on(w, fresh)

    def _hand_on(self, w: WriterState, records: list[Record]) -> None:
        # A snapshot's meta record (seq 0) never passes the sequence checks, and
        # the sink ignores any record kind it does not handle.
        sink = self._ns.sink
        if sink is None:
            return
        self._ns.counters["records_read"] += len(records)
        if w.live:
            sink.deliver(records)
        else:
            sink.restore(records)

    async def restore_log(self) -> None:
        """At start: read the log of the writers present at start as state only
        (cache writes apply, messages were sent before this process was a peer),
        each to its end, then go live: every record read from then on is
        dispatched. A writer found meanwhile is live already (see `scan`), and
        what the read passes of the restore left to read is read next."""
        for w in [w for w in self.writers.values() if not w.live]:
            done = False
            while not done:
                done = self._read_writer(w, time.perf_counter() + SLICE)
                await breathe()  # a slice at a time: the loop breathes
                if fault_points.ACTIVE:
                    await fault_points.pause("restore_slice")
            w.live = True
        self.live = True
        if self.dirty:
            self.schedule_read()

    async def barrier(self) -> None:
        """Deliver every record that was in the log when this was called: list
        `log/`, then read every writer to the end of its newest segment, a
        slice at a time. (What a conditional write decides on: whatever another
        process stored before it released a lock is delivered here by the time
        this returns.)"""
        if not self.live:
            return  # (never: conditional writes start after the restore)
        self.scan()
        for w in list(self.writers.values()):
            while not self._read_writer(w, time.perf_counter() + SLICE):
                await breathe()
        # Records lost to a gap (deleted before they were read) are in the state
        # the resync loads: decide on it only once it is loaded.
        resyncs = [t for t in self._ns.tasks if t.get_name() == _RESYNC_TASK and not t.done()]
        if resyncs:
            await asyncio.wait(resyncs)

    # -- the safety re-scan ----------------------------------------------------------------

    def safety_rescan(self, full: bool) -> None:
        """Look for records whose wake-up was lost, as cheaply as possible.

        New bytes in an open segment show in its size (one fstat per writer);
        a new segment shows in the log directory's timestamp, which is coarse,
        so a recent timestamp is looked at again, and every tenth round lists
        the directory whatever it says.
        """
        mtime = os.fstat(self._ns.fds["log"]).st_mtime_ns
        if full or mtime != self._log_mtime or time.time_ns() - mtime < 50_000_000:
            self._log_mtime = mtime
            self.full_scan_wanted = True
        for w in self.writers.values():
            if w.segment < w.newest_segment or (w.fd is None and not w.dead):
                self.dirty.add(w.peer)
                continue
            if w.fd is None:
                continue  # a dead writer read to its end
            with contextlib.suppress(OSError):
                size = os.fstat(w.fd).st_size
                if size < w.offset:
                    self._recovery.truncated(w)
                if size != w.offset:
                    self.dirty.add(w.peer)
            self._recovery.unstick(w)
        if self.dirty or self.full_scan_wanted:
            self.schedule_read()

    # -- writers that are gone ---------------------------------------------------------

    def mark_dead(self, peer: str) -> None:
        """`peer` holds its lock no more: read it to its end, then give its fd back."""
        w = self.writers.get(peer)
        if w is not None and not w.dead:
            w.dead = True
            self.dirty.add(peer)
            self.schedule_read()

    def forget(self, peer: str) -> None:
        """Nothing more can come from `peer`: drop what this process kept of it."""
        w = self.writers.pop(peer, None)
        if w is not None and w.fd is not None:
            os.close(w.fd)

    def close(self) -> None:
        """Close every segment fd."""
        for w in self.writers.values():
            if w.fd is not None:
                os.close(w.fd)
                w.fd = None

    def drop_inherited(self) -> None:
        """In a forked child: close the parent's segment fds, touch nothing else."""
        fds = [w.fd for w in self.writers.values()]
        for w in self.writers.values():
            w.fd = None
        for fd in fds:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
