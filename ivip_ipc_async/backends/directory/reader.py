"""The reader: every other writer's segments, read in order, a slice at a time.

`LogReader` keeps the writer table (`Writers`: one `WriterState` per other
writer: segment, offset, last sequence number), reads what is new when told to
look (`news`, `look_everywhere`, `schedule_read`, `read_now`: wired by
`backend.py` to the doorbell, the watcher and the safety re-scan), and hands
records on in order to the sink (`take`). A frame that is not whole goes to
`recovery.py`; a jump in sequence numbers to `gaps.py` (part of the reader:
its `Gaps` is handed in). At start it restores the retained log as state
(`restore_log`, see `joining.py`); for a conditional write it reads every
writer to its end (`barrier`); liveness tells it which writers died
(`mark_dead`, `revive`, `forget`).

Depends on: `state`, `layout`, `pacing`, `recovery`, `gaps`, `records`.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import os
import time
from typing import Final

from ... import fault_points
from ...logs import logger
from ...records import FrameReader, Kind, Record
from ..base import LossCause
from .gaps import RESYNC_TASK, Gaps
from .layout import READ_CHUNK, SEGMENT_RE, Dirs, open_regular, segment_name
from .pacing import SLICE, STEP, after_timers_due, breathe
from .recovery import drop_tail, garbage_reporter, truncated, unstick
from .state import Config, Counters, Life, Loss, Positions, Writers, WriterState

_SEQ: Final = operator.itemgetter(7)  # Record.seq, by index: the faster getter
_MAX_OPEN_SEGMENTS: Final = 128  # reader fds kept open; the idlest are closed past this
_NOTHING: Final[frozenset[bytes]] = frozenset()  # the events wanted from a writer being restored


class LogReader:
    """Every other writer's records, read in order and handed to the sink.

    Example:
        >>> import tempfile
        >>> config, counters = Config.of(tempfile.mkdtemp() + "/ns"), Counters()
        >>> dirs, life, writers = Dirs(config.path), Life(counters), {}
        >>> gaps = Gaps(config, dirs, counters, life, writers)
        >>> LogReader(config, dirs, counters, life, writers, Positions(), gaps).writers
        {}
    """

    def __init__(
        self,
        config: Config,
        dirs: Dirs,
        counters: Counters,
        life: Life,
        writers: Writers,
        positions: Positions,
        gaps: Gaps,
    ) -> None:
        self._config = config
        self._dirs = dirs
        self._counters = counters
        self._life = life
        self.writers = writers
        self._positions = positions  # what the snapshot loaded at start covers
        self._gaps = gaps
        self.dirty: set[str] = set()  # writers with news to read
        self.full_scan_wanted = False
        self.live = False  # True once the log present at start has been restored
        self.listed = False  # log/ has been listed once: the writers present at start are known
        self._read_scheduled = False
        self._log_mtime = 0  # st_mtime_ns of log/ at the last full scan

    # -- when to read ----------------------------------------------------------------

    def schedule_read(self, full: bool = False) -> None:
        """Read at the next loop turn (`full`: list log/ first)."""
        if full:
            self.full_scan_wanted = True
        life = self._life
        if not self._read_scheduled and not life.closing and life.loop is not None:
            self._read_scheduled = True
            life.loop.call_soon(self.read_pass)

    def look_everywhere(self) -> None:
        """List log/ at the next read pass: a writer may have appeared."""
        self.full_scan_wanted = True

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
        if self._life.closing:
            return
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
        self._counters.rescans += 1
        try:
            names = os.listdir(self._dirs.fds["log"])
        except OSError as exc:
            logger.error("cannot list %s: %s", self._dirs.path / "log", exc)
            return
        lowest: dict[str, int] = {}
        highest: dict[str, int] = {}
        for name in names:
            m = SEGMENT_RE.match(name)
            if m is None:
                continue
            peer, number = m.group(1), int(m.group(2))
            if peer == self._config.peer:
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
                known = self._positions.by_peer.get(peer) if not live else None
                start, offset, last_seq = known or (0, 0, 0)
                if start < lowest[peer]:
                    start, offset, last_seq = lowest[peer], 0, 0
                w = self.writers[peer] = WriterState(
                    peer,
                    start,
                    FrameReader(
                        self._config.max_record_size,
                        garbage_reporter(peer, self.writers, self._counters),
                    ),
                    offset=offset,
                    last_seq=last_seq,
                    live=live,
                )
            w.newest_segment = max(w.newest_segment, top)
            self.dirty.add(peer)

    # -- reading one writer --------------------------------------------------------

    def _read_writer(self, w: WriterState, deadline: float) -> bool:
        """Read and hand on what is new from one writer, in order, until
        `deadline` (`time.perf_counter()`); True once everything is read."""
        log_fd = self._dirs.fds.get("log")
        if log_fd is None:
            return True
        reader = w.reader
        wanted = getattr(self._life.sink, "wanted", None)
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
                self._counters.bytes_read += len(data)
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
                drop_tail(w, "its writer moved on", self._counters, self.take)
                os.close(w.fd)
                w.fd = None
                w.segment += 1
                w.offset = 0
                continue
            if w.dead:
                # Its writer is gone and everything is read: give the fd back
                # (hundreds of short-lived peers must not exhaust our fds).
                drop_tail(w, "its writer died", self._counters, self.take)
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
        sink = self._life.sink
        if sink is None:
            return
        self._counters.records_read += len(records)
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
        resyncs = [t for t in self._life.tasks if t.get_name() == RESYNC_TASK and not t.done()]
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
        mtime = os.fstat(self._dirs.fds["log"]).st_mtime_ns
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
                    truncated(w)
                if size != w.offset:
                    self.dirty.add(w.peer)
            salvaged = unstick(w, self._dirs.fds["peers"])
            if salvaged:
                self.take(w, salvaged)
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

    def revive(self, peer: str) -> None:
        """`peer`, taken for dead while its lock file was missing (peers/ removed
        under it), has announced itself again: read it on."""
        w = self.writers.get(peer)
        if w is not None and w.dead:
            w.dead = False
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
