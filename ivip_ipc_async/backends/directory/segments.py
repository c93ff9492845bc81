"""The writer: this process's own segments, written through a group commit.

`OwnSegments` owns the files this process writes (`log/<peer>-<n>.seg`, framed
as docs/format.md says): it appends one frame at a time, rotates, keeps its
share of the cap on the write path (the rule is `cap.py`'s) and deletes what
retention lets go. `GroupCommit` sits in front of it: the first appends of a
loop iteration are written at once, the rest join one batch written at the end
of the iteration; writes that find no room wait for a snapshot.

What it tells the others goes through callbacks `backend.py` injects:
`on_written` after each write and `on_flushed` at the end of an iteration (the
doorbell), `want_snapshot` when writes wait for room (snapshots), `on_capped`
when a segment is deleted under the cap (liveness notes it in the lock file).
What it leaves for them is passive: `OwnLog` (its segments, sequence number).

Depends on: `state`, `cap`, `layout`, `records`, `errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ...errors import BackendFullError, IPCClosedError
from ...records import HEADER_SIZE, Kind, Record, encode_frame
from .cap import ROOM_RETRY, Budget, NoRoom, check_state, covered, make_room
from .layout import same_file, segment_name, unlink
from .state import Config, Counters, Life, OwnLog, OwnSegment, Positions

# Appends a task writes at once in a row in one loop iteration before it yields
# (~0.3 ms of a tight `await notify()` loop, well under a 2 ms reading slice):
# measured 5.6 us per such `notify` with 16 and a batch, 5.0 with 64 and a yield.
# 0 (the tests' setting): every append joins the end-of-iteration batch.
_WRITE_THROUGH_PER_TICK: Final = 64
_MESSAGE: Final = Kind.MESSAGE  # a module global: `Kind.MESSAGE` is a class lookup of ~75 ns
GROUP_WRITE: Final = 1 << 20  # bytes of independent appends joined in one frame
# What the kernel says when the medium has no room: raised as `BackendFullError`.
_NO_ROOM: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class OwnSegments:
    """The segments this process writes, kept within its share of the cap.

    Example:
        >>> import tempfile
        >>> config = Config.of(tempfile.mkdtemp() + "/ns")
        >>> counters = Counters()
        >>> writer = OwnSegments(
        ...     config, {}, counters, Life(counters), OwnLog(), Budget(config), Positions(),
        ...     on_capped=print,
        ... )
        >>> writer.seg_fd is None
        True
    """

    def __init__(
        self,
        config: Config,
        fds: dict[str, int],
        counters: Counters,
        life: Life,
        own: OwnLog,
        budget: Budget,
        positions: Positions,
        *,
        on_capped: Callable[[int], object],
    ) -> None:
        self._config = config
        self._fds = fds  # the namespace's directory fds (`Dirs.fds`)
        self._counters = counters
        self._life = life
        self.own = own
        self._budget = budget
        self._positions = positions
        self._on_capped = on_capped
        self.seg_fd: int | None = None
        self.must_rotate = False  # a write failed part-way: continue in a new segment
        self._capped_through = 0  # last own segment deleted early, under the cap

    def open_segment(self, number: int) -> None:
        self.seg_fd = os.open(
            segment_name(self._config.peer, number),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=self._fds["log"],
        )
        self.own.segments.append(OwnSegment(number))

    def linked(self) -> bool:
        """Whether the segment being written is still at its name in log/ (not
        deleted or replaced by someone else: records written to it would reach
        no reader that has not opened it yet)."""
        fd, log_fd = self.seg_fd, self._fds.get("log")
        if fd is None or log_fd is None or not self.own.segments:
            return True
        return same_file(segment_name(self._config.peer, self.own.head.number), log_fd, fd)

    def start_again(self, moved: bool) -> int:
        """Continue in a new segment in log/ (the one at the namespace's path now);
        returns the number of the last segment written before. `moved`: log/ is
        a new directory, so the older segments are not in it (forgotten here).
        Sequence numbers go on: a reader that missed records sees the gap."""
        own = self.own
        last = own.head.number
        if self.seg_fd is not None:
            os.close(self.seg_fd)
            self.seg_fd = None
        own.head.closed_at = time.time()
        if moved:
            del own.segments[:-1]
            own.own_bytes = 0
        self.must_rotate = True  # until the open succeeds: the next write tries again
        self.open_segment(last + 1)
        self.must_rotate = False
        return last

    def close(self) -> None:
        if self.seg_fd is not None:
            os.close(self.seg_fd)
            self.seg_fd = None

    def drop_inherited(self) -> None:
        """In a forked child: close the parent's segment fd, touch nothing else."""
        fd, self.seg_fd = self.seg_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def write(self, records: Sequence[Record]) -> None:
        """Append records as one frame (several are wrapped in a BATCH frame).

        A write either delivers all of its records or none: readers only see
        whole frames. After a failed write, whatever part of it reached the file
        is left as a torn tail and the writer moves on to a new segment (readers
        drop a torn tail once its writer has moved on). Truncating instead would
        race with a reader that has already read the partial bytes.
        """
        if self.seg_fd is None or self.must_rotate:
            if self._life.closing:
                raise IPCClosedError("the IPC instance is closed")
            try:
                self.rotate()
            except OSError as exc:
                _raise_full_as_such(exc)
                raise
        own = self.own
        first_seq = own.seq
        count = len(records)
        if count == 1:
            data = encode_frame(records[0], first_seq + 1)
        else:
            inner = b"".join([encode_frame(r, first_seq + i + 1) for i, r in enumerate(records)])
            data = encode_frame(Record(Kind.BATCH, "", b"", inner), first_seq + 1)
        size = len(data)
        budget = self._budget
        if own.own_bytes + size > budget.share and not self._make_room(size):
            raise NoRoom
        seg = own.segments[-1]
        fd = self.seg_fd
        assert fd is not None
        counters = self._counters
        written = 0
        try:
            written = _write_to_segment(fd, data)
            while written < size:  # a short write: rare, but allowed
                written += _write_to_segment(fd, data[written:])
        except OSError as exc:
            counters.write_errors += 1
            # The file says what reached it (more than `written` if the failing
            # call wrote part of its buffer before failing).
            with contextlib.suppress(OSError):
                written = max(written, os.fstat(fd).st_size - seg.size)
            if written:
                seg.size += written
                own.own_bytes += written
                self.must_rotate = True
                with contextlib.suppress(OSError):
                    self.rotate()
            _raise_full_as_such(exc)
            raise
        own.seq = seg.last_seq = first_seq + count
        seg.size += size
        own.own_bytes += size
        budget.room_since = 0.0
        if count > 1 or records[0].kind is not _MESSAGE:  # a lone message skips this
            state = [r for r in records if r.kind is not _MESSAGE]
            if state:
                seg.has_cache = True
                sink = self._life.sink
                if sink is not None:
                    sink.written(state)  # stored: applies here, as in every peer
        counters.records_written += count
        counters.batches_written += 1
        counters.bytes_written += size
        if seg.size >= budget.segment_limit:
            self.rotate()

    def rotate(self) -> None:
        """Close the current segment and start the next (it may fail: disk full)."""
        seg = self.own.head
        if self.seg_fd is not None:
            os.close(self.seg_fd)
            self.seg_fd = None
            seg.closed_at = time.time()
        self.open_segment(seg.number + 1)
        self.must_rotate = False

    # -- the cap and retention, as cap.py rules --------------------------------------

    def _make_room(self, size: int) -> bool:
        return make_room(
            self.own, size, self._budget.share, self._covered, self.rotate, self._delete_capped
        )

    def _covered(self, seg: OwnSegment) -> bool:
        return covered(seg, self._positions, self._config.peer)

    def _delete_capped(self, seg: OwnSegment) -> None:
        self._delete(seg)
        if seg.number > self._capped_through:
            # Readers that lose records to this deletion read the cause in the
            # lock file (liveness notes it there).
            self._capped_through = seg.number
            self._counters.segments_capped += 1
            self._on_capped(seg.number)

    def _delete(self, seg: OwnSegment) -> None:
        unlink(segment_name(self._config.peer, seg.number), self._fds["log"])
        self._counters.segments_deleted += 1
        self.own.own_bytes -= seg.size
        self.own.segments.remove(seg)

    def enforce_retention(self) -> None:
        """Delete own closed segments past the retention window that no snapshot
        needs (the size cap is kept on the write path, see `cap.make_room`)."""
        now = time.time()
        for seg in self.own.segments[:-1]:
            if now - seg.closed_at <= self._config.retention or not self._covered(seg):
                break
            self._delete(seg)


@dataclass(slots=True)
class _Pending:
    """Appends waiting for the end-of-iteration group write: (records, waiter)."""

    calls: list[tuple[Sequence[Record], asyncio.Future[None]]] = field(default_factory=list)
    adds: int = 0  # bytes of cache sets among them (see `GroupCommit.check_state`)


class GroupCommit:
    """Appends, written at once or as one batch at the end of a loop iteration.

    Example:
        >>> import tempfile
        >>> config = Config.of(tempfile.mkdtemp() + "/ns")
        >>> counters = Counters()
        >>> life, budget = Life(counters), Budget(config)
        >>> writer = OwnSegments(
        ...     config, {}, counters, life, OwnLog(), budget, Positions(), on_capped=print
        ... )
        >>> commit = GroupCommit(
        ...     config, life, writer, budget,
        ...     on_written=print, on_flushed=print, want_snapshot=print,
        ... )
        >>> commit.pending is None
        True
    """

    def __init__(
        self,
        config: Config,
        life: Life,
        segments: OwnSegments,
        budget: Budget,
        *,
        on_written: Callable[[], object],
        on_flushed: Callable[[], object],
        want_snapshot: Callable[[], object],
    ) -> None:
        self._config = config
        self._life = life
        self._segments = segments
        self._budget = budget
        # Told after every write (the doorbell rings), at the end of each loop
        # iteration that wrote (rings what is unrung), and when writes wait for
        # room (a snapshot makes it).
        self._on_written = on_written
        self._on_flushed = on_flushed
        self._want_snapshot = want_snapshot
        self.pending: _Pending | None = None
        # The task that wrote last in this loop iteration, and how many appends
        # in a row it wrote at once (see `write_now`).
        self._tick_task: asyncio.Task[Any] | None = None
        self._task_writes = 0
        self._tick_scheduled = False

    async def append(self, records: Sequence[Record]) -> None:
        """Write records; when this returns they are in the segment file.

        Written at once (one `os.write` costs about 1 us; a wait for the next
        iteration costs more). A task that has just written
        `_WRITE_THROUGH_PER_TICK` times in a row in this loop iteration (see
        `write_now`) yields once after writing. While a batch is pending, the append
        joins it, written at the end of the iteration (group commit).
        """
        if self._life.closing:
            raise IPCClosedError("the IPC instance is closed")
        adds = 0
        if records[0].kind is not _MESSAGE or len(records) > 1:
            adds = self.check_state(records)
        if self.write_now(records):
            return
        # A task that has written its share of the iteration: written at once all
        # the same (so it keeps its place ahead of later calls), then it yields
        # once, so that the others run. Cheaper than joining the batch and
        # waiting on its future: one loop iteration, not two. (A cancellation
        # during the yield finds the record written, as one after a batch write
        # does: see docs/design.md.)
        if (
            self.pending is None
            and 0 < _WRITE_THROUGH_PER_TICK <= self._task_writes
            and self._write(records)
        ):
            await asyncio.sleep(0)
            return
        # Not now: join the batch of this iteration (which, if it finds no room
        # under the cap, waits for a snapshot, first in line).
        pending = self.pending
        if pending is None:
            pending = self.pending = _Pending()
            if not self._tick_scheduled:
                self._tick_scheduled = True
                asyncio.get_running_loop().call_soon(self._end_tick)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending.calls.append((records, fut))
        pending.adds += adds
        await fut

    def check_state(self, records: Sequence[Record]) -> int:
        """`cap.check_state` for `records`, counting the sets waiting in the batch
        (which the state does not hold yet); returns the bytes they may add."""
        pending = self.pending
        waiting = pending.adds if pending is not None else 0
        return check_state(records, self._life.sink, waiting, self._config.max_state_bytes)

    def write_now(self, records: Sequence[Record]) -> bool:
        """`append` without a coroutine, when it can be done at once: True when
        the records are in the segment file; False when the caller must `await
        append(records)` (a batch is pending, this task's direct writes in this
        iteration are used up, there is no room under the cap, or the instance
        is closing). `AsyncIPC.notify` calls this first, so that an awaited
        `notify` completes without suspending: a task that only notifies ends
        in its first step (under `gather`, no future and no second step).

        Not while a batch is pending (appends stay in call order). Otherwise
        yes, except for the task that has just written `_WRITE_THROUGH_PER_TICK`
        times in a row in this loop iteration: a tight `await notify()` loop,
        which must yield to the other tasks now and then. Many tasks notifying
        together (`gather`) each write at once, and end in their first step.
        """
        if self.pending is not None or self._life.closing:
            return False
        task = _current_task(self._life.loop)
        if task is not self._tick_task:
            self._tick_task = task
            self._task_writes = 0
        if self._task_writes >= _WRITE_THROUGH_PER_TICK:
            return False
        self._task_writes += 1
        return self._write(records)

    def _write(self, records: Sequence[Record]) -> bool:
        """Write records at once: True when they are in the segment file, False
        when there is no room under the cap (`append` then joins the batch,
        which waits for room, first in line)."""
        if not self._tick_scheduled:
            self._tick_scheduled = True
            self._life.loop.call_soon(self._end_tick)  # type: ignore[union-attr]
        try:
            self._segments.write(records)
        except NoRoom:
            return False
        self._on_written()
        return True

    def _end_tick(self) -> None:
        """End of a loop iteration: write the batch, ring the peers once."""
        self._tick_scheduled = False
        self._tick_task = None
        self._task_writes = 0
        self.flush()
        self._on_flushed()

    def flush(self) -> None:
        """Write the queued appends: one `os.write` per batch of up to
        `max_record_size` bytes (group commit), each batch all-or-nothing.

        An append whose caller was cancelled while it waited is not written: a
        cancelled `notify` or cache `set` then never happened anywhere, instead of
        reaching the peers while the caller (and its own cache mirror) believe
        it failed.
        """
        pending, self.pending = self.pending, None
        if pending is None:
            return
        calls = [call for call in pending.calls if not call[1].cancelled()]
        # A group write stays within a segment (the cap counts in segments) and
        # within 1 MiB (a reader checks and copies a frame in one go); one
        # append's records are one frame whatever its size.
        room = min(self._config.max_record_size, self._budget.segment_limit, GROUP_WRITE)
        room -= HEADER_SIZE
        start = 0
        while start < len(calls):
            # A batch: as many whole appends as fit in one frame.
            stop, size = start, 0
            while stop < len(calls):
                extra = sum(r.size for r in calls[stop][0])
                if stop > start and size + extra > room:
                    break
                size += extra
                stop += 1
            batch = calls[start:stop]
            try:
                self._segments.write([r for records, _ in batch for r in records])
            except NoRoom:
                # This batch and the later ones wait, in order, ahead of any new
                # append (the fast path is closed while some are pending).
                self.pending = _Pending(calls[start:])
                self._wait_for_room()
                return
            except OSError as exc:
                for _, fut in calls[start:]:  # this batch and every later one
                    if not fut.done():
                        fut.set_exception(exc)
                return
            self._on_written()
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            start = stop

    def _wait_for_room(self) -> None:
        """Writes are pending for room under the cap: ask for a snapshot, try
        again shortly; after `cap.ROOM_WAIT` seconds, fail them (never
        acknowledged, so nothing is lost) with `BackendFullError` (errno ENOSPC)."""
        exc = self._budget.room_wait()
        if exc is not None:
            pending, self.pending = self.pending, None
            for _, fut in pending.calls if pending is not None else ():
                if not fut.done():
                    fut.set_exception(exc)
            return
        self._want_snapshot()
        loop = self._life.loop
        if not self._tick_scheduled and loop is not None:
            self._tick_scheduled = True
            loop.call_later(ROOM_RETRY, self._end_tick)

    def drop_inherited(self) -> None:
        """In a forked child: forget the parent's waiting appends (never settled
        here: their futures are the parent's loop's)."""
        self.pending = None

    def abort(self) -> None:
        """Fail the appends still waiting: the instance is being released."""
        pending, self.pending = self.pending, None
        if pending is not None:
            for _, fut in pending.calls:
                if not fut.done() and not fut.get_loop().is_closed():
                    fut.set_exception(IPCClosedError("the IPC instance was closed"))


def _raise_full_as_such(exc: OSError) -> None:
    """Raise the kernel's "no room" as the documented `BackendFullError` (the
    same type Redis's `OOM` raises), its errno and text kept; return otherwise."""
    if exc.errno in _NO_ROOM and not isinstance(exc, BackendFullError):
        raise BackendFullError(
            exc.errno, f"{exc.strerror} (the shared directory): nothing was written"
        ) from exc


def _current_task_getter(
    tasks: object,
) -> Callable[[asyncio.AbstractEventLoop | None], asyncio.Task[Any] | None]:
    """How the group commit asks for the current task (once per write).

    `asyncio.current_task`, the public function, is in C from 3.12. On 3.11 it
    is a Python function around a dict lookup (measured 0.11-0.28 us against
    0.03-0.07 us, on an awaited notify of ~7 us): there the dict itself is read,
    `asyncio.tasks._current_tasks` (a private name, the only one used here), and
    the public function is the fallback when it is not there.
    """
    if sys.version_info >= (3, 12):
        return asyncio.current_task
    get = getattr(getattr(tasks, "_current_tasks", None), "get", None)
    return get if callable(get) else asyncio.current_task


_current_task = _current_task_getter(asyncio.tasks)


# The one place records are written; tests replace it to inject disk faults.
_write_to_segment = os.write
