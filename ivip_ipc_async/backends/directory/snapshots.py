"""Snapshots: the cache state in a base and its deltas, written by one peer for all.

The peer holding `snapshot.lock` writes the snapshot files (atomically, a slice
at a time, through aiofiles; the format is in docs/format.md): a base,
`snapshot.bin`, the whole state, then deltas, each the current record of every
key that changed since the file before it (the keys `Changes` noted on their
way to the sink since then), so a snapshot costs what changed, not the whole
state. When the deltas' bytes pass half the base's (or their count
`MAX_DELTAS`), the next snapshot is a new base, and the old deltas go: each
base is paid for by the deltas before it (a base of B bytes follows deltas
that would pass B/2 bytes, so it is at most three times their bytes), so the
bytes written to snapshots grow with the cache records written, not with
their square; a joiner reads at most 1.5 times the base. The holder checks that nobody damaged its
files (then it writes a new base) and deletes what killed snapshot writers left
behind. The others only learn what the newest file covers (`Positions`: which
own segments the cap lets go). Loading the files is `joining.py`'s.

Why a delta is exact: the positions of a file and the start of the keys noted
for the next are taken together, synchronously; every record a reader has
consumed (up to those positions) has reached the sink by then, and every
record past them reaches it after, its key noted. So each key changed after a
file's positions is in the next delta, with its current record (newer than or
equal to what those positions reach), and a key the mirror no longer holds
(a tombstone forgotten) makes the next file a base.

Depends on: `state` (the writer table, `OwnLog`, `Positions`, `Changes`),
`cap` (when a snapshot is due to make room), `joining` (reading snapshot
files, their names), `layout`, `pacing`, `records`.
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
from .joining import (
    FORMAT,
    Identity,
    base_id,
    chain_names,
    delta_name,
    parse_delta,
    positions_of,
    read_header,
    snapshot_identity,
)
from .layout import SNAPSHOT, open_regular, unlink
from .pacing import SLICE, STEP, breathe
from .state import Changes, Config, Counters, Life, OwnLog, Positions, Writers

__all__ = ["MAX_DELTAS", "MERGE_AT", "Snapshots"]

_COST_RATIO: Final = 4.0  # snapshots start at least this many times their cost apart
MERGE_AT: Final = 0.5  # a new base once the deltas' bytes would pass this much of the base's
MAX_DELTAS: Final = 256  # ... or once there are this many deltas


class Snapshots:
    """Writing and checking the snapshot files, and the positions they cover.

    Example:
        >>> import tempfile
        >>> config, counters = Config.of(tempfile.mkdtemp() + "/ns"), Counters()
        >>> snapshots = Snapshots(
        ...     config, {}, counters, Life(counters), {}, OwnLog(), Budget(config), Positions(),
        ...     Changes(),
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
        changes: Changes,
    ) -> None:
        self._config = config
        self._fds = fds
        self._counters = counters
        self._life = life
        self._writers = writers  # whose positions a snapshot records
        self._own = own
        self._budget = budget
        self._changes = changes  # the keys changed since the last file (the holder's)
        self.lock_fd: int | None = None  # snapshot.lock, held by the one writer of snapshots
        self.positions = positions  # what the newest snapshot file covers
        self.last_version = -1  # the sink's state version in the last snapshot written
        self.task: asyncio.Task[None] | None = None  # the snapshot being written
        self._last_at = 0.0
        self.took = 0.0  # seconds the last snapshot took to write
        # The holder's chain: its base's id and size, the bytes and count of its
        # deltas, the identity of each file it wrote (to notice damage), and
        # whether the next snapshot must be a base.
        self._base: str | None = None
        self._base_bytes = 0
        self._delta_bytes = 0
        self._deltas = 0
        self._written: dict[str, Identity] = {}
        self._base_due = True
        # What a peer that does not write snapshots read last: the base's
        # identity, its id and positions, the newest delta's name and identity.
        self._seen_base: Identity | None = None
        self._seen_id: str | None = None
        self._seen_delta: tuple[str, Identity | None] | None = None

    @property
    def holder(self) -> bool:
        """Whether this peer holds snapshot.lock (and writes the snapshots)."""
        return self.lock_fd is not None

    def moved(self) -> None:
        """The namespace directory was replaced (rejoin.py): let go of the old
        snapshot.lock, forget what was known of the old snapshot files, and take
        the new snapshot.lock if nobody holds it: then write a base at once
        (the cache state must not wait for a maintenance round to be where
        joiners look)."""
        self.close()
        self._written = {}
        self._seen_base = self._seen_id = self._seen_delta = None
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
            self.last_version = -1  # a new holder writes a base at once
            self._base_due = True  # (what changed since the last file is unknown here)
            self._collect_leftovers()
        sink = self._life.sink
        if sink is None or (self.task is not None and not self.task.done()):
            return
        damaged = self._damaged()
        if damaged:
            self.last_version = -1  # written again at once
        version = sink.state_version()
        # Spaced to take at most a fifth of the holder's time (a base rewrites the
        # whole state: at a million keys, seconds of CPU), unless some writer's
        # history since the last one fills half a share (its next writes would
        # wait for one, see segments.py).
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
        """Whether a file this holder wrote is no longer the one it wrote
        (truncated, emptied, replaced or deleted by someone else), or a delta of
        its base appeared that it did not write: then a new base is written at
        once, even while the cache is idle."""
        if not self._written:
            return False
        root = self._fds["root"]
        what = ""
        for name, written in self._written.items():
            now = snapshot_identity(root, name)
            if now != written:
                what = f"{name} " + (
                    "deleted" if now is None else f"{now[1]} bytes, {written[1]} written"
                )
                break
        else:
            try:
                names = os.listdir(root)
            except OSError:
                return False
            for name in names:
                parsed = parse_delta(name)
                if parsed is not None and parsed[0] == self._base and name not in self._written:
                    what = f"{name} planted"
                    break
        if not what:
            return False
        self._counters.snapshots_damaged += 1
        logger.warning("a snapshot file was changed by someone else (%s): writing a new base", what)
        self._written = {}
        self._base_due = True
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

    def _collect_deltas(self, base: str) -> None:
        """Delete the deltas of every base but `base` (the one now in place)."""
        root = self._fds["root"]
        with contextlib.suppress(OSError):
            for name in os.listdir(root):
                parsed = parse_delta(name)
                if parsed is not None and parsed[0] != base:
                    unlink(name, root)

    async def _changed_records(self, keys: set[tuple[str, bytes]]) -> list[Record] | None:
        """The current record of each of `keys`, a slice at a time; None when a
        delta would not do: one is no longer held (a tombstone forgotten: the
        delete it was must not be lost), or the deltas would pass `MERGE_AT` of
        the base."""
        sink = self._life.sink
        assert sink is not None
        limit = MERGE_AT * self._base_bytes - self._delta_bytes
        out: list[Record] = []
        size = 0
        deadline = time.perf_counter() + SLICE
        for count, (topic, key) in enumerate(keys, 1):
            rec = sink.current(topic, key)
            if rec is None:
                return None
            out.append(rec)
            size += rec.size
            if size > limit:
                return None
            if count % STEP == 0 and time.perf_counter() > deadline:
                await breathe()
                deadline = time.perf_counter() + SLICE
        return out

    async def _write(self, version: int) -> None:
        """Write a snapshot file: a delta when the chain allows, else a new base.

        The temporary file has a fresh random name and is created with
        `O_EXCL`, so nothing planted under it (a link to an outside file) is
        ever written through. The last frame says how many records came before
        it, so a truncated file is recognised.
        """
        sink = self._life.sink
        assert sink is not None
        peer = self._config.peer
        began = time.monotonic()
        # Positions and the start of the next delta's keys: together, no await.
        positions = {
            w.peer: (w.segment, w.offset - w.reader.pending, w.last_seq)
            for w in self._writers.values()
        }
        head = self._own.head
        positions[peer] = (head.number, head.size, self._own.seq)
        changes = self._changes
        keys = changes.take()
        tracked, changes.tracking = changes.tracking, True
        base, number = self._base, self._deltas + 1
        records: list[Record] | None = None
        if tracked and base is not None and not self._base_due and number <= MAX_DELTAS:
            records = await self._changed_records(keys)
        if records is None or base is None:
            base, number = secrets.token_hex(8), 0
        elif not records and positions == self.positions.by_peer:
            self.last_version = version  # nothing to say (an expiry, say)
            return
        header: dict[str, object] = {
            "format": FORMAT,
            "base": base,
            "taken": time.time(),
            "by": peer,
        }
        name = SNAPSHOT
        if number:
            header["delta"] = number
            name = delta_name(base, number)
        header["positions"] = positions
        meta = Record(Kind.SNAPSHOT_META, "", b"", json.dumps(header).encode())
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
                # A base notes the clock it wrote for each key changed since its
                # positions (`noted`, filled meanwhile): one it wrote as it is
                # now need not be in the next delta too.
                noted = changes.keys
                clocks: dict[tuple[str, bytes], tuple[int, int]] = {}
                for rec in sink.state() if records is None else records:
                    chunk.append(encode_frame(rec, rec.seq))
                    count += 1
                    if noted and records is None and (rec.topic, rec.key) in noted:
                        clocks[rec.topic, rec.key] = (rec.hlc, rec.node)
                    if count % STEP == 0 and time.perf_counter() > deadline:
                        await f.write(b"".join(chunk))  # yields the loop
                        chunk.clear()
                        deadline = time.perf_counter() + SLICE
                # "count", not format 1's "records": a format-1 reader finds
                # no end, so it refuses the file as damaged (docs/format.md).
                end = json.dumps({"count": count}).encode()
                chunk.append(encode_frame(Record(Kind.SNAPSHOT_META, "", b"", end), 0))
                await f.write(b"".join(chunk))
                if fault_points.ACTIVE:
                    await fault_points.pause("snapshot_write")
            os.replace(tmp, name, src_dir_fd=root, dst_dir_fd=root)
            st = os.stat(name, dir_fd=root, follow_symlinks=False)
        except OSError as exc:
            unlink(tmp, root)
            logger.error("could not write the cache snapshot: %s", exc)
            self._base_due = True  # the keys noted since the last file are gone
            return
        except BaseException:
            self._base_due = True
            raise
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if number:
            self._written[name] = identity
            self._delta_bytes += st.st_size
            self._deltas = number
        else:
            self._written = {SNAPSHOT: identity}
            self._base, self._base_bytes, self._delta_bytes, self._deltas = base, st.st_size, 0, 0
            self._base_due = False
            self._collect_deltas(base)
            for (topic, key), clock in clocks.items():
                now = sink.current(topic, key)  # a change after this: noted again
                if now is not None and (now.hlc, now.node) == clock:
                    noted.discard((topic, key))
        self.took = time.monotonic() - began
        self.last_version = version
        self.positions.by_peer = positions
        self._counters.snapshots_written += 1
        self._counters.snapshot_bytes_written += st.st_size

    # -- what the newest snapshot file covers ----------------------------------------

    def _read_positions(self) -> None:
        """Learn what the newest snapshot file covers (to know what may be
        deleted): the last delta of the base in place, else the base."""
        root = self._fds["root"]
        try:
            # Unchanged since we last read it: one stat and one listing say so
            # (the common case, every maintenance round of a peer that does not
            # hold snapshot.lock).
            if snapshot_identity(root) != self._seen_base:
                fd = open_regular(SNAPSHOT, os.O_RDONLY, root)
                try:
                    st = os.fstat(fd)
                    header = read_header(fd, self._config.max_record_size)
                finally:
                    os.close(fd)
                self._seen_base = (st.st_ino, st.st_size, st.st_mtime_ns)
                self._seen_id = None if header is None else base_id(header)
                self._seen_delta = None
                if header is not None:
                    self._learn(header, 0)
            if self._seen_id is None:
                return
            names, whole = chain_names(os.listdir(root), self._seen_id)
            if not names or not whole:  # (a hole: its holder writes a new base)
                return
            newest = (names[-1], snapshot_identity(root, names[-1]))
            if newest == self._seen_delta:
                return
            self._seen_delta = newest
            fd = open_regular(names[-1], os.O_RDONLY, root)
            try:
                header = read_header(fd, self._config.max_record_size)
            finally:
                os.close(fd)
        except OSError:
            return
        if header is not None and base_id(header) == self._seen_id:
            self._learn(header, len(names))

    def _learn(self, header: dict[str, object], number: int) -> None:
        """Take the positions of a header that is the file it says it is."""
        if number and header.get("delta") != number:
            return
        self.positions.by_peer = positions_of(header)

    def close(self) -> None:
        """Let go of snapshot.lock: another peer takes over the snapshots."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing releases the flock
        self.lock_fd = None
        self._changes.stop()

    def drop_inherited(self) -> None:
        """In a forked child: close the parent's snapshot.lock (a copy: the
        parent keeps its flock)."""
        fd, self.lock_fd = self.lock_fd, None
        self._changes.stop()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
