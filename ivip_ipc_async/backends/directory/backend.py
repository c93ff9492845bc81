"""The shared-directory backend: its life, composed of one part per concern.

Every process writes only its own segments. A write is one `os.write` of a
whole batch (group commit), then a one-byte-ish datagram to every peer's
doorbell. Readers keep an offset per segment and a sequence number per writer;
doorbells, the directory watcher and a periodic re-scan only say "look", so a lost
wake-up costs latency, never a record.

`DirectoryBackend` implements `backends.base.Backend`: it wires the parts
(layout, segments, reader, recovery, wake-ups, peers, snapshots), starts and stops
them, runs the maintenance round, and reports stats. Each part keeps its own
state; see docs/design.md for the map.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from ... import forks
from ...conditions import Conditional, Outcome
from ...logs import logger
from ...records import Record
from ..base import RecordSink
from .conditional import ConditionalWrites
from .layout import Namespace
from .locks import DirectoryLocks
from .peers import Peers
from .reader import LogReader
from .recovery import FrameRecovery, Gaps
from .rejoin import Rejoin
from .segments import GroupCommit, OwnSegments
from .snapshots import Snapshots
from .wakeups import Wakeups

T = TypeVar("T")


class _Shared(Generic[T]):
    """An attribute of `DirectoryBackend` kept in its `Namespace`."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: DirectoryBackend, owner: type | None = None) -> T:
        value: T = getattr(obj._ns, self._name)
        return value

    def __set__(self, obj: DirectoryBackend, value: T) -> None:
        setattr(obj._ns, self._name, value)


class DirectoryBackend:
    """Records through a shared directory on the local machine.

    Args:
        path: The namespace directory (created 0700 when missing).
        max_record_size: Largest record accepted, in bytes (`ValueError` above).
        segment_bytes: A segment is closed and a new one started past this size.
        retention: Seconds a closed segment is kept for slow readers and joiners.
        max_footprint: Bytes of history (log segments) the namespace may hold on
            disk, all peers together; the snapshot is bounded by `max_state_bytes`.
        max_state_bytes: Bytes the cache's live state may take (encoded, as in a
            snapshot); a `set` past it raises `BackendFullError`.
        rescan_interval: Seconds between full re-scans (the safety net).
        snapshot_interval: Seconds between snapshots of a changing cache.
        watch_step: The watchfiles thread's polling step in ms, where it is the
            watcher (inotify is not to be had, or `IVIP_IPC_WATCHER=watchfiles`).
        doorbell: Ring peers' sockets after each write (off: rely on the watcher).

    Example:
        >>> import tempfile
        >>> backend = DirectoryBackend(tempfile.mkdtemp() + "/ns")
        >>> backend.max_record_size
        16777216
    """

    # The options and names, kept (and shared with the parts) in the `Namespace`.
    path: _Shared[Path] = _Shared()
    max_record_size: _Shared[int] = _Shared()
    segment_bytes: _Shared[int] = _Shared()
    retention: _Shared[float] = _Shared()
    max_footprint: _Shared[int] = _Shared()
    max_state_bytes: _Shared[int] = _Shared()
    rescan_interval: _Shared[float] = _Shared()
    snapshot_interval: _Shared[float] = _Shared()
    watch_step: _Shared[int] = _Shared()
    use_doorbell: _Shared[bool] = _Shared()
    node: _Shared[int] = _Shared()
    peer: _Shared[str] = _Shared()
    counters: _Shared[dict[str, int]] = _Shared()

    def __init__(
        self,
        path: Path | str,
        *,
        max_record_size: int = 16 << 20,
        segment_bytes: int = 2 << 20,
        retention: float = 15.0,
        max_footprint: int = 64 << 20,
        max_state_bytes: int = 512 << 20,
        rescan_interval: float = 2.0,
        snapshot_interval: float = 1.0,
        watch_step: int = 150,
        doorbell: bool = True,
        node: int | None = None,
    ) -> None:
        ns = self._ns = Namespace(
            path,
            max_record_size=max_record_size,
            segment_bytes=segment_bytes,
            retention=retention,
            max_footprint=max_footprint,
            max_state_bytes=max_state_bytes,
            rescan_interval=rescan_interval,
            snapshot_interval=snapshot_interval,
            watch_step=watch_step,
            doorbell=doorbell,
            node=node,
        )
        # The parts, each with its own state, wired to the ones it talks to.
        self._segments = OwnSegments(ns)
        self._writer = GroupCommit(ns)
        self._reader = LogReader(ns)
        self._recovery = FrameRecovery(ns)
        self._gaps = Gaps(ns)
        self._wakeups = Wakeups(ns)
        self._peers = Peers(ns)
        self._snapshots = Snapshots(ns)
        self._rejoin = Rejoin(ns)
        self._segments.connect(self._peers, self._snapshots)
        self._writer.connect(self._segments, self._wakeups, self._snapshots)
        self._reader.connect(self._wakeups, self._snapshots, self._recovery, self._gaps)
        self._recovery.connect(self._reader, self._peers)
        self._gaps.connect(self._reader, self._peers, self._snapshots)
        self._wakeups.connect(self._reader, self._segments)
        self._peers.connect(self._reader, self._segments, self._wakeups)
        self._snapshots.connect(self._reader, self._segments)
        self._rejoin.connect(
            self._peers, self._segments, self._wakeups, self._reader, self._snapshots
        )
        self._wakeups.on_displaced = self._rejoin.soon
        self._rejoin.on_moved = self._namespace_moved
        self._locks: DirectoryLocks | None = None  # made by locks() on first use
        self._conditional = ConditionalWrites(ns, self._reader, self._writer.append, self.locks)
        # The hot path: `append` is the group commit's own, one coroutine per
        # call instead of two (the method below says what it does).
        self.append = self._writer.append  # type: ignore[method-assign]
        self.write_now = self._writer.write_now  # type: ignore[method-assign]

    # -- life -------------------------------------------------------------------

    async def start(self, sink: RecordSink) -> None:
        """Open the directory, announce this peer, load the present, start watching."""
        ns = self._ns
        ns.sink = sink
        ns.loop = asyncio.get_running_loop()
        forks.forget_in_child(self, DirectoryBackend._drop_inherited)  # (a forked child)
        try:
            ns.open_directories()
            self._peers.announce()
            self._segments.open_segment(1)
            await self._snapshots.load_at_start()
            self._reader.scan()
            await self._reader.restore_log()
            self._wakeups.start_watcher()
            ns.spawn(self._maintain, restart=True)
            self._wakeups.refresh_peers(ring_new=True)
        except BaseException:
            self.abandon()
            raise

    async def append(self, records: Sequence[Record]) -> None:
        """Write records; when this returns they are in the segment file.

        Written at once (a task that has just written 64 times in a row in this
        loop iteration then yields once), except while a batch is pending: then
        it joins the batch written at the end of the iteration (group commit).
        """
        await self._writer.append(records)

    def write_now(self, records: Sequence[Record]) -> bool:
        """Write records at once if this loop iteration still may: True when they
        are in the segment file (as `append` would have them), False when the
        caller must `await append(records)` instead. Optional for a backend:
        `AsyncIPC.notify` uses it when present, to complete without suspending.
        """
        return self._writer.write_now(records)

    async def close(self) -> None:
        """Flush what was accepted, stop every task and thread, release files."""
        ns = self._ns
        if ns.closing:
            return
        self._writer.flush()
        self._wakeups.ring_if_unrung()
        ns.closing = True
        self._wakeups.stop_watcher()
        snapshot = self._snapshots.task
        if snapshot is not None and not snapshot.done():
            # Let a snapshot being written finish: cancelling aiofiles mid-call
            # can leave its file open in the worker thread.
            await asyncio.wait([snapshot], timeout=5)
        for task in list(ns.tasks):
            task.cancel()
        if ns.tasks:
            await asyncio.gather(*ns.tasks, return_exceptions=True)
        await self._wakeups.wait_watcher()
        self._release()

    def abandon(self) -> None:
        """Release everything without the event loop (it may be closed already)."""
        ns = self._ns
        ns.closing = True
        self._wakeups.stop_watcher()
        for task in list(ns.tasks):
            if not task.get_loop().is_closed():
                task.cancel()
        ns.tasks.clear()
        self._release()

    def _release(self) -> None:
        """Close every file and socket, let go of the locks, fail waiting appends."""
        if self._locks is not None:
            self._locks.abandon()  # closing their files releases the locks held here
        self._rejoin.close()
        self._wakeups.close()
        self._reader.close()
        self._segments.close()
        self._snapshots.close()
        self._peers.close()  # closing releases the flock: we are now "dead" to peers
        for fd in self._ns.fds.values():
            os.close(fd)
        self._ns.fds.clear()
        self._ns.close_retired()
        self._writer.abort()

    def _drop_inherited(self) -> None:
        """In a forked child: close the parent's descriptors, touch nothing else.

        The child must hold none of the parent's locks (a plain helper forked by
        `multiprocessing` would otherwise keep a killed parent "alive" to its
        peers), and must not unlink the parent's files or settle its futures.
        """
        ns = self._ns
        ns.closing = True
        ns.tasks.clear()
        self._writer.pending = None
        ns.loop = None
        self._wakeups.drop_inherited()
        self._reader.drop_inherited()
        fds = [self._segments.seg_fd, self._snapshots.lock_fd, self._peers.lock_fd]
        fds += [*ns.fds.values(), *ns.retired]
        ns.retired = []
        self._segments.seg_fd = self._snapshots.lock_fd = self._peers.lock_fd = None
        ns.fds.clear()
        for fd in fds:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- maintenance: re-scan, liveness, collection, retention, snapshots ----------

    async def _maintain(self) -> None:
        ns = self._ns
        rounds = 0
        try:
            while not ns.closing:
                await asyncio.sleep(ns.rescan_interval)
                rounds += 1
                # First: is the namespace still where this process opened it?
                # (If not, and it cannot be re-created, nobody is judged dead
                # and nothing is collected or snapshotted in the old place.)
                in_place = self._rejoin.check()
                self._reader.safety_rescan(full=rounds % 10 == 0)
                self._wakeups.supervise_watcher()
                if not in_place:
                    continue
                if rounds % 3 == 0:
                    self._wakeups.peers_wanted = True
                    self._peers.check()
                    self._segments.enforce_retention()
                self._snapshots.maybe_write()
                self._snapshots.maybe_reload()
        except asyncio.CancelledError:
            if not ns.closing:
                # Not cancelled by close(): the event loop is ending (asyncio.run
                # cancels every task before it closes the loop). Let go of the
                # locks now; once the loop is gone nothing would, and peers would
                # wait forever on a process that is alive but no longer serving.
                logger.info("the event loop of peer %s ended without destroy()", ns.peer)
                self._writer.flush()
                self.abandon()
            raise

    # -- locks -------------------------------------------------------------------------------

    def _namespace_moved(self) -> None:
        if self._locks is not None:
            self._locks.moved()

    def locks(self) -> DirectoryLocks:
        """The lock capability: `flock`s on files in `locks/` (locks.py)."""
        if self._locks is None:
            self._locks = DirectoryLocks(self._ns.path)
        return self._locks

    async def write_if(self, op: Conditional) -> Outcome:
        """A conditional cache write: under the key's bucket lock, after reading
        every writer to its end (conditional.py)."""
        return await self._conditional.write_if(op)

    # -- cache reads -----------------------------------------------------------------------

    async def fetch(self, topic: str, key: bytes) -> Record | None:
        """Never needed: the directory is read in order, with gaps detected and
        repaired, so the mirror always answers."""
        return None

    async def catch_up(self) -> None:
        """Read now what peers have written so far (`LogReader.barrier`: log/
        listed afresh, every writer read to its end a slice at a time, a gap's
        resync awaited), for a decision that must see a peer's write made before
        something this process has just observed (`run_once`, memoize: a record
        stored before the lock this process now holds was let go)."""
        if not self._ns.closing:
            await self._reader.barrier()

    # -- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters, peers, segments and lag of this backend."""
        ns = self._ns
        footprint = ns.footprint()
        segments = 0
        log_fd = ns.fds.get("log")
        if log_fd is not None:
            segments = len(os.listdir(log_fd))
        writers = self._reader.writers
        lag = 0
        for w in writers.values():
            if w.fd is not None and not w.dead:
                with contextlib.suppress(OSError):
                    lag += max(0, os.fstat(w.fd).st_size - w.offset)
        return {
            "backend": "directory",
            "path": str(ns.path),
            "peer": ns.peer,
            "peers": self._wakeups.peers if ns.use_doorbell else sorted(writers),
            "writers": len(writers),
            "segments": segments,
            "footprint_bytes": footprint,
            "lag_bytes": lag,
            "snapshot_holder": self._snapshots.lock_fd is not None,
            "watcher": self._wakeups.watcher,
            "watcher_alive": self._wakeups.watcher_alive,
            "layout_problem": self._rejoin.problem,
            "maintenance_alive": any(
                t.get_name() == "ivip-ipc_maintain" and not t.done() for t in ns.tasks
            ),
            **ns.counters,
        }

    # -- health ----------------------------------------------------------------------------

    gap_cause = "this process fell behind the retention window"

    def problems(self) -> list[str]:
        """What is wrong now, for `AsyncIPC.health()` (see `Backend.problems`)."""
        stats = self.stats()
        problems = []
        if not stats["maintenance_alive"]:
            problems.append("maintenance task is not running")
        if stats["layout_problem"]:
            problems.append(str(stats["layout_problem"]))
        if not stats["watcher_alive"]:
            problems.append("watcher is not running (re-scans still deliver)")
        return problems
