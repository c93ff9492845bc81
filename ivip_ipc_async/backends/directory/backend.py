"""The shared-directory backend: `DirectoryBackend` composes the parts and wires them.

Every process writes only its own segments. A write is one `os.write` of a
whole batch (group commit), then a one-byte-ish datagram to every peer's
doorbell. Readers keep an offset per segment and a sequence number per writer;
doorbells, the directory watcher and a periodic re-scan only say "look", so a lost
wake-up costs latency, never a record.

This is the only module that knows every part. It makes the passive state
(`state.py`: config, counters, life, the writer table, own log, positions;
`cap.Budget`; `layout.Dirs`), hands each part the pieces it needs and the
callbacks it calls, then runs their life: start (the join), the maintenance
round, close, fork, stats. The parts, one concern each, never hold one another:

    segments.py (the writer) + cap.py     reader.py + recovery.py + gaps.py
    snapshots.py    joining.py            liveness.py
    doorbell.py     watcher.py            rejoin.py
    conditional.py  locks.py + lock_handover.py

Depends on: every part, and `forks`, `logs`, `records`, `conditions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from ... import forks
from ...conditions import Conditional, Outcome
from ...logs import logger
from ...records import Record
from ..base import Problem, RecordSink
from .cap import Budget
from .conditional import ConditionalWrites
from .doorbell import Doorbell
from .gaps import Gaps
from .joining import Joining
from .layout import Dirs
from .liveness import Liveness
from .locks import DirectoryLocks
from .peerfiles import DISPLACED
from .reader import LogReader
from .rejoin import Rejoin, RejoinSteps
from .segments import GroupCommit, OwnSegments
from .snapshots import Snapshots
from .state import Changes, Config, Counters, Life, OwnLog, Positions, TrackingSink, Writers
from .watcher import Watcher


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

    append: Callable[[Sequence[Record]], Coroutine[Any, Any, None]]
    """Write records; when this returns they are in the segment file.

    Written at once (a task that has just written 64 times in a row in this
    loop iteration then yields once), except while a batch is pending: then
    it joins the batch written at the end of the iteration (group commit).
    It is the group commit's own `GroupCommit.append` (one coroutine per call,
    not two)."""

    write_now: Callable[[Sequence[Record]], bool]
    """Write records at once if this loop iteration still may: True when they
    are in the segment file (as `append` would have them), False when the
    caller must `await append(records)` instead. Optional for a backend:
    `AsyncIPC.notify` uses it when present, to complete without suspending.
    It is the group commit's own `GroupCommit.write_now`."""

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
        config = self._config = Config.of(
            path,
            node=node,
            max_record_size=max_record_size,
            segment_bytes=segment_bytes,
            retention=retention,
            max_footprint=max_footprint,
            max_state_bytes=max_state_bytes,
            rescan_interval=rescan_interval,
            snapshot_interval=snapshot_interval,
            watch_step=watch_step,
            use_doorbell=doorbell,
        )
        # The options, as given (the config is frozen: these never change).
        self.path = config.path
        self.max_record_size = config.max_record_size
        self.segment_bytes = config.segment_bytes
        self.retention = config.retention
        self.max_footprint = config.max_footprint
        self.max_state_bytes = config.max_state_bytes
        self.rescan_interval = config.rescan_interval
        self.snapshot_interval = config.snapshot_interval
        self.watch_step = config.watch_step
        self.use_doorbell = config.use_doorbell
        self.node = config.node
        self.peer = config.peer

        # The passive state the parts share.
        self._counters = counters = Counters()
        self._life = life = Life(counters)
        self._dirs = dirs = Dirs(config.path)
        writers: Writers = {}
        own = OwnLog()
        positions = Positions()
        budget = Budget(config)

        # The parts, each given the state it reads or writes and the callbacks
        # it calls; none holds another. Callbacks that name a part made later
        # are lambdas, resolved when called.
        self._gaps = Gaps(config, dirs, counters, life, writers)
        self._reader = reader = LogReader(
            config, dirs, counters, life, writers, positions, self._gaps
        )
        self._segments = OwnSegments(
            config,
            dirs.fds,
            counters,
            life,
            own,
            budget,
            positions,
            on_capped=lambda segment: self._liveness.note_capped(segment),
        )
        self._doorbell = Doorbell(
            config,
            dirs,
            counters,
            life,
            own,
            on_news=reader.news,
            on_look=reader.look_everywhere,
            on_read=reader.read_now,
            on_listed=lambda names: self._liveness.count_peers(names),
        )
        self._watcher = Watcher(
            config,
            dirs,
            counters,
            life,
            watch_log=lambda: self._doorbell.bell is None,
            on_news=reader.news,
            on_look=reader.look_everywhere,
            on_peers=self._doorbell.peers_changed,
            on_displaced=lambda: self._rejoin.soon(),
            on_read=reader.schedule_read,
        )
        self._liveness = Liveness(
            config,
            dirs,
            counters,
            writers,
            budget,
            on_dead=reader.mark_dead,
            on_back=reader.revive,
            on_gone=reader.forget,
            on_announce=self._doorbell.bind,
            on_withdraw=self._doorbell.unbind,
        )
        self._changes = Changes()  # noted on their way to the sink, for the next delta
        self._snapshots = Snapshots(
            config, dirs.fds, counters, life, writers, own, budget, positions, self._changes
        )
        self._joining = Joining(config, dirs.fds, counters, life, writers, positions)
        self._writer = GroupCommit(
            config,
            life,
            self._segments,
            budget,
            on_written=self._doorbell.written,
            on_flushed=self._doorbell.ring_if_unrung,
            want_snapshot=self._snapshots.request,
        )
        self._rejoin = Rejoin(
            config,
            dirs,
            counters,
            life,
            own,
            RejoinSteps(
                snapshot_busy=self._snapshot_busy,
                announced=self._liveness.announced,
                doorbell_bound=self._doorbell.bound,
                segment_linked=self._segments.linked,
                root_replaced=self._root_replaced,
                note_displaced=lambda segment: self._liveness.note(DISPLACED, segment),
                start_again=self._segments.start_again,
                announce_again=self._liveness.announce_again,
                settle=self._settle,
                rewatch=self._rewatch,
            ),
        )
        self._locks: DirectoryLocks | None = None  # made by locks() on first use
        self._conditional = ConditionalWrites(life, reader.barrier, self._writer.append, self.locks)
        # The hot path: the group commit's own methods (see `append`, `write_now`).
        self.append = self._writer.append
        self.write_now = self._writer.write_now

    # -- life -------------------------------------------------------------------

    async def start(self, sink: RecordSink) -> None:
        """Open the directory, announce this peer, load the present, start watching.

        The join (see joining.py): the snapshot, then the log of every writer
        present from the position it covers, then live."""
        life = self._life
        life.sink = TrackingSink(sink, self._changes)
        life.loop = asyncio.get_running_loop()
        forks.forget_in_child(self, DirectoryBackend._drop_inherited)  # (a forked child)
        try:
            self._dirs.open()
            self._liveness.announce()  # and the doorbell, bound beside the lock file
            self._segments.open_segment(1)
            await self._joining.load_at_start()
            self._reader.scan()
            await self._reader.restore_log()
            self._watcher.start()
            life.spawn(self._maintain, restart=True)
            self._doorbell.refresh_peers(ring_new=True)
        except BaseException:
            self.abandon()
            raise

    async def close(self) -> None:
        """Flush what was accepted, stop every task and thread, release files."""
        life = self._life
        if life.closing:
            return
        self._writer.flush()
        self._doorbell.ring_if_unrung()
        life.closing = True
        self._watcher.stop()
        snapshot = self._snapshots.task
        if snapshot is not None and not snapshot.done():
            # Let a snapshot being written finish: cancelling aiofiles mid-call
            # can leave its file open in the worker thread.
            await asyncio.wait([snapshot], timeout=5)
        for task in list(life.tasks):
            task.cancel()
        if life.tasks:
            await asyncio.gather(*life.tasks, return_exceptions=True)
        await self._watcher.wait()
        self._release()

    def abandon(self) -> None:
        """Release everything without the event loop (it may be closed already)."""
        life = self._life
        life.closing = True
        self._watcher.stop()
        for task in list(life.tasks):
            if not task.get_loop().is_closed():
                task.cancel()
        life.tasks.clear()
        self._release()

    def _release(self) -> None:
        """Close every file and socket, let go of the locks, fail waiting appends."""
        if self._locks is not None:
            self._locks.abandon()  # closing their files releases the locks held here
        self._rejoin.close()
        self._watcher.close()
        self._doorbell.close()
        self._reader.close()
        self._segments.close()
        self._snapshots.close()
        self._liveness.close()  # closing releases the flock: we are now "dead" to peers
        self._dirs.close()
        self._writer.abort()

    def _drop_inherited(self) -> None:
        """In a forked child: close the parent's descriptors, touch nothing else.

        The child must hold none of the parent's locks (a plain helper forked by
        `multiprocessing` would otherwise keep a killed parent "alive" to its
        peers), and must not unlink the parent's files or settle its futures.
        """
        life = self._life
        life.closing = True
        life.tasks.clear()
        self._writer.drop_inherited()
        life.loop = None
        self._watcher.drop_inherited()
        self._doorbell.drop_inherited()
        self._reader.drop_inherited()
        self._segments.drop_inherited()
        self._snapshots.drop_inherited()
        self._liveness.drop_inherited()
        self._dirs.drop_inherited()

    # -- maintenance: re-scan, liveness, collection, retention, snapshots ----------

    async def _maintain(self) -> None:
        life, config = self._life, self._config
        rounds = 0
        try:
            while not life.closing:
                await asyncio.sleep(config.rescan_interval)
                rounds += 1
                # First: is the namespace still where this process opened it?
                # (If not, and it cannot be re-created, nobody is judged dead
                # and nothing is collected or snapshotted in the old place.)
                in_place = self._rejoin.check()
                self._reader.safety_rescan(full=rounds % 10 == 0)
                self._watcher.supervise()
                if not in_place:
                    continue
                if rounds % 3 == 0:
                    self._doorbell.peers_changed()
                    self._liveness.check()
                    self._segments.enforce_retention()
                self._snapshots.maybe_write()
                self._joining.maybe_reload(holder=self._snapshots.holder)
        except asyncio.CancelledError:
            if not life.closing:
                # Not cancelled by close(): the event loop is ending (asyncio.run
                # cancels every task before it closes the loop). Let go of the
                # locks now; once the loop is gone nothing would, and peers would
                # wait forever on a process that is alive but no longer serving.
                logger.info("the event loop of peer %s ended without destroy()", config.peer)
                self._writer.flush()
                self.abandon()
            raise

    # -- the steps of a rejoin (rejoin.py), across parts --------------------------------

    def _snapshot_busy(self) -> bool:
        task = self._snapshots.task
        return task is not None and not task.done()

    def _root_replaced(self) -> None:
        """The namespace directory is a new one: snapshot.lock and snapshot.bin
        are others, and later lock attempts open its new locks/."""
        self._snapshots.moved()
        self._joining.moved()
        if self._locks is not None:
            self._locks.moved()

    def _settle(self, until: float) -> None:
        self._liveness.settle_until = until

    def _rewatch(self) -> None:
        """Ring, watch and read the directories now at the path."""
        self._doorbell.forget_peers()
        self._watcher.restart()
        self._doorbell.refresh_peers(ring_new=True)
        self._reader.schedule_read(full=True)

    # -- locks -------------------------------------------------------------------------------

    def locks(self) -> DirectoryLocks:
        """The lock capability: `flock`s on files in `locks/` (locks.py)."""
        if self._locks is None:
            self._locks = DirectoryLocks(self._config.path)
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
        if not self._life.closing:
            await self._reader.barrier()

    # -- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters, peers, segments and lag of this backend."""
        config, life, dirs = self._config, self._life, self._dirs
        footprint = dirs.footprint()
        segments = 0
        log_fd = dirs.fds.get("log")
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
            "path": str(config.path),
            "peer": config.peer,
            "peers": self._doorbell.peers if config.use_doorbell else sorted(writers),
            "writers": len(writers),
            "segments": segments,
            "footprint_bytes": footprint,
            "lag_bytes": lag,
            "snapshot_holder": self._snapshots.holder,
            "watcher": self._watcher.kind,
            "watcher_alive": self._watcher.alive,
            "layout_problem": self._rejoin.problem,
            "maintenance_alive": any(
                t.get_name() == "ivip-ipc_maintain" and not t.done() for t in life.tasks
            ),
            **self._counters.as_dict(),
        }

    # -- health ----------------------------------------------------------------------------

    gap_cause = "this process fell behind the retention window"

    def problems(self) -> list[Problem]:
        """What is wrong now, for `AsyncIPC.health()` (see `Backend.problems`)."""
        stats = self.stats()
        problems = []
        if not stats["maintenance_alive"]:
            problems.append(Problem("maintenance task is not running", unhealthy=True))
        if stats["layout_problem"]:
            problems.append(Problem(str(stats["layout_problem"]), unhealthy=True))
        if not stats["watcher_alive"]:
            text = "watcher is not running (re-scans still deliver)"
            problems.append(Problem(text, unhealthy=False))
        return problems
