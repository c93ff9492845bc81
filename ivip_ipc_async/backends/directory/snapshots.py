"""Snapshots: the cache state in `snapshot.bin`, written by one peer for all.

The peer holding `snapshot.lock` writes the snapshot (atomically, a slice at a
time, through aiofiles; the format is in docs/format.md), checks that nobody
damaged it, and deletes what killed snapshot writers left behind. The others
only learn what the newest one covers (`Positions`: which own segments the cap
lets go). Loading a snapshot is `joining.py`'s.

Depends on: `state` (the writer table, `OwnLog`, `Positions`), `cap` (when a
snapshot is due to make room), `joining` (reading snapshot.bin), `layout`,
`pacing`, `records`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from typing import Final

import aiofiles

from ... import fault_points
from ...logs import logger, rate_limited
from ...records import Kind, Record, encode_frame
from .cap import Budget, history_filling
from .joining import Identity, read_positions, snapshot_identity
from .layout import SNAPSHOT, open_regular, unlink
from .pacing import SLICE, STEP
from .state import Config, Counters, Life, OwnLog, Positions, Writers

_COST_RATIO: Final = 4.0  # snapshots start at least this many times their cost apart


class Snapshots:
    """Writing, checking and loading snapshot.bin, and the positions it covers.

    Example:
        >>> import tempfile
        >>> config, counters = Config.of(tempfile.mkdtemp() + "/ns"), Counters()
        >>> snapshots = Snapshots(
        ...     config, {}, counters, Life(counters), {}, OwnLog(), Budget(config), Positions()
        ... )
        >>> snapshots.holder, snapshots.positions
        (False, Positions(by_peer={}))
    """

    def __init__(
        self,
        config: Config,
        fds: dict[str, int],
        counters: Counters,
        life: Life,
        writers: Writers,
        own: OwnLog,
        budget: Budget,
        positions: Positions,
    ) -> None:
        self._config = config
        self._fds = fds
        self._counters = counters
        self._life = life
        self._writers = writers  # whose positions a snapshot records
        self._own = own
        self._budget = budget
        self.lock_fd: int | None = None  # snapshot.lock, held by the one writer of snapshots
        self.positions = positions  # what the newest snapshot covers
        self.last_version = -1  # the sink's state version in the last snapshot written
        self.task: asyncio.Task[None] | None = None  # the snapshot being written
        self._last_at = 0.0
        self.took = 0.0  # seconds the last snapshot took to write
        # (ino, size, mtime) of snapshot.bin when its positions were read: each
        # snapshot is a new file (renamed into place), whatever its timestamp.
        self._positions_of: Identity | None = None
        self._written: Identity | None = None

    @property
    def holder(self) -> bool:
        """Whether this peer holds snapshot.lock (and writes the snapshots)."""
        return self.lock_fd is not None

    def moved(self) -> None:
        """The namespace directory was replaced (rejoin.py): let go of the old
        snapshot.lock, forget what was known of the old snapshot.bin, and take
        the new snapshot.lock if nobody holds it: then write a snapshot at once
        (the cache state must not wait for a maintenance round to be where
        joiners look)."""
        self.close()
        self._written = self._positions_of = None
        self._last_at = 0.0
        self.maybe_write()

    # -- writing -----------------------------------------------------------------------

    def maybe_write(self) -> None:
        """Write a snapshot if one is due: as the holder of snapshot.lock (taken
        here when nobody holds it); the others learn the newest one's positions."""
        if self.lock_fd is None:
            try:
                fd = open_regular("snapshot.lock", os.O_RDWR | os.O_CREAT, self._fds["root"])
            except OSError as exc:
                rate_limited(logging.ERROR, "snapshot.lock", "cannot open snapshot.lock: %s", exc)
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._read_positions()
                return
            self.lock_fd = fd
            self.last_version = -1  # a new holder writes one at once
            self._collect_leftovers()
        sink = self._life.sink
        if sink is None or (self.task is not None and not self.task.done()):
            return
        damaged = self._damaged()
        if damaged:
            self.last_version = -1  # written again at once
        version = sink.state_version()
        # A snapshot rewrites the whole state: at a million keys, seconds of CPU.
        # Spaced to take at most a fifth of the holder's time, unless some
        # writer's history since the last one fills half a share (its next
        # writes would wait for one, see segments.py).
        config, own = self._config, self._own
        spacing = max(config.snapshot_interval, _COST_RATIO * self.took)
        filling = history_filling(self._budget, own, self._writers, self.positions, config.peer)
        due = damaged or time.monotonic() - self._last_at >= spacing or filling
        own_pos = self.positions.of(config.peer)
        moved = own_pos[2] != own.seq and any(s.has_cache for s in own.segments)
        if due and (version != self.last_version or moved):
            self._last_at = time.monotonic()
            self.task = asyncio.get_running_loop().create_task(self._write(version))
            self._life.track(self.task)

    def request(self) -> None:
        """Get a snapshot that covers own segments: write one now as the holder,
        else learn the newest one's positions."""
        if self.lock_fd is None:
            self._read_positions()
            return
        task = self.task
        sink = self._life.sink
        if sink is not None and (task is None or task.done()):
            self._last_at = time.monotonic()
            version = sink.state_version()
            self.task = task = asyncio.get_running_loop().create_task(self._write(version))
            self._life.track(task)

    def _damaged(self) -> bool:
        """Whether snapshot.bin is no longer the file this holder wrote (truncated,
        emptied, replaced or deleted by someone else): then it is written again
        at once, even while the cache is idle."""
        if self._written is None:
            return False
        now = snapshot_identity(self._fds["root"])
        if now == self._written:
            return False
        self._counters.snapshots_damaged += 1
        logger.warning(
            "snapshot.bin was changed by someone else (%s): writing it again",
            "deleted" if now is None else f"{now[1]} bytes, {self._written[1]} written",
        )
        self._written = None
        return True

    def _collect_leftovers(self) -> None:
        """Delete the temporary files of snapshot writers killed mid-write (only
        the holder of snapshot.lock writes one, and that is now this process)."""
        root = self._fds["root"]
        with contextlib.suppress(OSError):
            for name in os.listdir(root):
                leftover = name.startswith(".snapshot.") and name.endswith(".tmp")
                if leftover and unlink(name, root):
                    logger.info("deleted %s, left by a snapshot writer that died", name)

    async def _write(self, version: int) -> None:
        """Write the whole cache state to snapshot.bin, atomically, a slice at a time.

        The temporary file has a fresh random name and is created with
        `O_EXCL`, so nothing planted under it (a link to an outside file) is
        ever written through. The last frame says how many records came before
        it, so a truncated snapshot is recognised.
        """
        sink = self._life.sink
        assert sink is not None
        peer = self._config.peer
        began = time.monotonic()
        positions = {
            w.peer: (w.segment, w.offset - w.reader.pending, w.last_seq)
            for w in self._writers.values()
        }
        head = self._own.head
        positions[peer] = (head.number, head.size, self._own.seq)
        meta = Record(
            Kind.SNAPSHOT_META,
            "",
            b"",
            json.dumps({"taken": time.time(), "by": peer, "positions": positions}).encode(),
        )
        root = self._fds["root"]
        tmp = f".snapshot.{peer}.{secrets.token_hex(4)}.tmp"

        def opener(path: str, flags: int) -> int:
            return os.open(
                path, flags | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=root
            )

        try:
            async with aiofiles.open(tmp, "wb", opener=opener) as f:
                chunk: list[bytes] = [encode_frame(meta, 0)]
                count = 0
                deadline = time.perf_counter() + SLICE
                for rec in sink.state():
                    chunk.append(encode_frame(rec, rec.seq))
                    count += 1
                    if count % STEP == 0 and time.perf_counter() > deadline:
                        await f.write(b"".join(chunk))  # yields the loop
                        chunk.clear()
                        deadline = time.perf_counter() + SLICE
                end = json.dumps({"records": count}).encode()
                chunk.append(encode_frame(Record(Kind.SNAPSHOT_META, "", b"", end), 0))
                await f.write(b"".join(chunk))
                if fault_points.ACTIVE:
                    await fault_points.pause("snapshot_write")
            os.replace(tmp, SNAPSHOT, src_dir_fd=root, dst_dir_fd=root)
            st = os.stat(SNAPSHOT, dir_fd=root, follow_symlinks=False)
        except OSError as exc:
            unlink(tmp, root)
            logger.error("could not write the cache snapshot: %s", exc)
            return
        self._written = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.took = time.monotonic() - began
        self.last_version = version
        self.positions.by_peer = positions
        self._counters.snapshots_written += 1

    # -- what the newest snapshot covers ---------------------------------------------

    def _read_positions(self) -> None:
        """Learn what the current snapshot covers (to know what may be deleted)."""
        root = self._fds["root"]
        try:
            # Unchanged since we last read it: one stat says so (the common case,
            # every maintenance round of a peer that does not hold snapshot.lock).
            if snapshot_identity(root) == self._positions_of:
                return
            fd = open_regular(SNAPSHOT, os.O_RDONLY, root)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            identity = (st.st_ino, st.st_size, st.st_mtime_ns)
            if identity == self._positions_of:
                return  # unchanged since we last read it
            self._positions_of = identity
            positions = read_positions(fd, self._config.max_record_size)
        finally:
            os.close(fd)
        if positions is not None:
            self.positions.by_peer = positions

    def close(self) -> None:
        """Let go of snapshot.lock: another peer takes over the snapshots."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing releases the flock
        self.lock_fd = None

    def drop_inherited(self) -> None:
        """In a forked child: close the parent's snapshot.lock (a copy: the
        parent keeps its flock)."""
        fd, self.lock_fd = self.lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
