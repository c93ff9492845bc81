"""Snapshots: the cache state in `snapshot.bin`, written by one peer, read by all.

The peer holding `snapshot.lock` writes the snapshot (atomically, a slice at a
time, through aiofiles), checks that nobody damaged it, and deletes what killed
writers left behind. Every peer loads it at start, learns the positions it
covers (which of its own segments may go), and a peer that started from a
damaged one loads the next.
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
from typing import TYPE_CHECKING, Final

import aiofiles

from ... import fault_points
from ...logs import logger, rate_limited
from ...records import HEADER_SIZE, FrameReader, Kind, Record, encode_frame
from .layout import (
    READ_CHUNK,
    SLICE,
    SNAPSHOT,
    STEP,
    Namespace,
    json_object,
    open_regular,
    size_of,
    sliced,
    unlink,
)

if TYPE_CHECKING:
    from .reader import LogReader
    from .segments import OwnSegments

Positions = dict[str, tuple[int, int, int]]  # peer: (segment, offset, last seq)

_COST_RATIO: Final = 4.0  # snapshots start at least this many times their cost apart


class Snapshots:
    """Writing, checking and loading snapshot.bin, and the positions it covers.

    Example:
        >>> import tempfile
        >>> Snapshots(Namespace(tempfile.mkdtemp() + "/ns")).positions
        {}
    """

    def __init__(self, ns: Namespace) -> None:
        self._ns = ns
        self.lock_fd: int | None = None  # snapshot.lock, held by the one writer of snapshots
        self.positions: Positions = {}  # what the newest snapshot covers
        self.bytes = 0  # size of snapshot.bin
        self.last_version = -1  # the sink's state version in the last snapshot written
        self.task: asyncio.Task[None] | None = None  # the snapshot being written
        self._last_at = 0.0
        self.took = 0.0  # seconds the last snapshot took to write
        # (ino, size, mtime) of snapshot.bin when its positions were read: each
        # snapshot is a new file (renamed into place), whatever its timestamp.
        self._positions_of: tuple[int, int, int] | None = None
        self._written: tuple[int, int, int] | None = None  # (ino, size, mtime)
        self._suspect = False  # the snapshot loaded at start was damaged
        self._seen: tuple[int, int, int] | None = None

    def connect(self, reader: LogReader, segments: OwnSegments) -> None:
        self._reader = reader
        self._segments = segments

    async def load_at_start(self) -> None:
        """Load the snapshot into the sink; a damaged one is replaced by the next."""
        self._suspect = not await self.load()
        self._seen = self._identity()

    def measure(self) -> None:
        self.bytes = size_of(SNAPSHOT, self._ns.fds["root"])

    def moved(self) -> None:
        """The namespace directory was replaced (rejoin.py): let go of the old
        snapshot.lock, forget what was known of the old snapshot.bin, and take
        the new snapshot.lock if nobody holds it: then write a snapshot at once
        (the cache state must not wait for a maintenance round to be where
        joiners look)."""
        self.close()
        self._written = self._positions_of = self._seen = None
        self.bytes = 0
        self._last_at = 0.0
        self.maybe_write()

    # -- writing -----------------------------------------------------------------------

    def maybe_write(self) -> None:
        ns = self._ns
        if self.lock_fd is None:
            try:
                fd = open_regular("snapshot.lock", os.O_RDWR | os.O_CREAT, ns.fds["root"])
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
        sink = ns.sink
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
        spacing = max(ns.snapshot_interval, _COST_RATIO * self.took)
        due = damaged or time.monotonic() - self._last_at >= spacing or self._history_filling()
        own_pos = self.positions.get(ns.peer, (0, 0, 0))
        segments = self._segments
        moved = own_pos[2] != segments.seq and any(s.has_cache for s in segments.segments)
        if due and (version != self.last_version or moved):
            self._last_at = time.monotonic()
            self.task = asyncio.get_running_loop().create_task(self._write(version))
            ns.track(self.task)

    def _history_filling(self) -> bool:
        """Whether some writer (this one included) has written half a share of
        the cap since the positions the last snapshot covers (segments count
        as full: an estimate, on the safe side, of the bytes a snapshot would
        let it delete)."""
        limit = self._segments.segment_limit
        half = self._segments.budget // 2
        own = self._segments.segments[-1]
        heads = [(self._ns.peer, own.number, own.size)]
        heads += [(w.peer, w.segment, w.offset) for w in self._reader.writers.values()]
        for peer, segment, offset in heads:
            covered, at, _ = self.positions.get(peer, (0, 0, 0))
            if (segment - covered) * limit + offset - at >= half:
                return True
        return False

    def request(self) -> None:
        """Get a snapshot that covers own segments: write one now as the holder,
        else learn the newest one's positions."""
        if self.lock_fd is None:
            self._read_positions()
            return
        task = self.task
        sink = self._ns.sink
        if sink is not None and (task is None or task.done()):
            self._last_at = time.monotonic()
            version = sink.state_version()
            self.task = task = asyncio.get_running_loop().create_task(self._write(version))
            self._ns.track(task)

    def _damaged(self) -> bool:
        """Whether snapshot.bin is no longer the file this holder wrote (truncated,
        emptied, replaced or deleted by someone else): then it is written again
        at once, even while the cache is idle."""
        if self._written is None:
            return False
        now = self._identity()
        if now == self._written:
            return False
        self._ns.counters["snapshots_damaged"] += 1
        logger.warning(
            "snapshot.bin was changed by someone else (%s): writing it again",
            "deleted" if now is None else f"{now[1]} bytes, {self._written[1]} written",
        )
        self._written = None
        return True

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(SNAPSHOT, dir_fd=self._ns.fds["root"], follow_symlinks=False)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _collect_leftovers(self) -> None:
        """Delete the temporary files of snapshot writers killed mid-write (only
        the holder of snapshot.lock writes one, and that is now this process)."""
        root = self._ns.fds["root"]
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
        ns = self._ns
        assert ns.sink is not None
        began = time.monotonic()
        positions = {
            w.peer: (w.segment, w.offset - w.reader.pending, w.last_seq)
            for w in self._reader.writers.values()
        }
        own = self._segments.segments[-1]
        positions[ns.peer] = (own.number, own.size, self._segments.seq)
        meta = Record(
            Kind.SNAPSHOT_META,
            "",
            b"",
            json.dumps({"taken": time.time(), "by": ns.peer, "positions": positions}).encode(),
        )
        root = ns.fds["root"]
        tmp = f".snapshot.{ns.peer}.{secrets.token_hex(4)}.tmp"

        def opener(path: str, flags: int) -> int:
            return os.open(
                path, flags | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=root
            )

        try:
            async with aiofiles.open(tmp, "wb", opener=opener) as f:
                chunk: list[bytes] = [encode_frame(meta, 0)]
                count = 0
                deadline = time.perf_counter() + SLICE
                for rec in ns.sink.state():
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
        self.bytes = st.st_size
        self.took = time.monotonic() - began
        self.last_version = version
        self.positions = positions
        ns.counters["snapshots_written"] += 1

    # -- reading -----------------------------------------------------------------------

    def _read_positions(self) -> None:
        """Learn what the current snapshot covers (to know what may be deleted)."""
        max_record_size = self._ns.max_record_size
        root = self._ns.fds["root"]
        try:
            # Unchanged since we last read it: one stat says so (the common case,
            # every maintenance round of a peer that does not hold snapshot.lock).
            if self._identity() == self._positions_of:
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
            head = os.pread(fd, HEADER_SIZE, 0)
            if len(head) < HEADER_SIZE:
                return
            # The header frame is read whole, however many peers it names.
            size = HEADER_SIZE + int.from_bytes(head[4:8], "little")  # body_len
            head += os.pread(fd, min(size, max_record_size) - HEADER_SIZE, HEADER_SIZE)
        finally:
            os.close(fd)
        recs = FrameReader(max_record_size).feed(head)
        if recs and recs[0].kind is Kind.SNAPSHOT_META:
            self.positions = _positions(recs[0].data)

    def maybe_reload(self) -> None:
        """A process that started from a damaged snapshot loads the next one its
        holder writes (last-writer-wins makes loading it again harmless)."""
        if not self._suspect or self.lock_fd is not None:
            return
        seen = self._identity()
        if seen is None or seen == self._seen:
            return
        self._seen = seen

        async def reload() -> None:
            if await self.load(positions=False):
                self._suspect = False

        self._ns.spawn(reload)

    async def load(self, positions: bool = True) -> bool:
        """Load snapshot.bin (if any) into the sink, a slice at a time; False when
        it is damaged (what it held that was readable is loaded all the same)."""
        ns = self._ns
        sink = ns.sink
        assert sink is not None
        reader = FrameReader(ns.max_record_size, self._reader.garbage_reporter("snapshot"))
        meta: Positions | None = None
        count, end = 0, -1
        try:
            fd = open_regular(SNAPSHOT, os.O_RDONLY, ns.fds["root"])
        except FileNotFoundError:
            return True
        except OSError as exc:
            logger.warning("could not read the cache snapshot, replaying the log only: %s", exc)
            return False
        loop = asyncio.get_running_loop()
        offset = 0
        try:
            while data := await loop.run_in_executor(None, os.pread, fd, READ_CHUNK, offset):
                offset += len(data)
                async for records in sliced(reader, data):
                    state = []
                    for rec in records:
                        if rec.kind is not Kind.SNAPSHOT_META:
                            state.append(rec)
                        elif meta is None and count == 0:
                            meta = _positions(rec.data)
                        else:
                            end = _snapshot_end(rec.data)
                    count += len(state)
                    sink.restore(state)
        except OSError as exc:
            logger.warning("could not read the cache snapshot, replaying the log only: %s", exc)
            return False
        finally:
            os.close(fd)
        if meta is None or end != count or reader.pending or reader.skipped_bytes:
            ns.counters["snapshots_damaged"] += 1
            logger.warning(
                "snapshot.bin is damaged (%s): loaded the %d records it still holds, and "
                "the whole retained log; its holder writes it again",
                "no header" if meta is None else f"{count} records of {end} readable",
                count,
            )
            return False
        if positions:
            self.positions = meta
        return True

    def close(self) -> None:
        """Let go of snapshot.lock: another peer takes over the snapshots."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing releases the flock
        self.lock_fd = None


def _snapshot_end(data: bytes) -> int:
    """The record count of a snapshot's closing frame (-1: not one)."""
    records = json_object(data).get("records")
    return records if type(records) is int and records >= 0 else -1


def _positions(data: bytes) -> Positions:
    try:
        raw = json_object(data)["positions"]
        return {str(k): (int(v[0]), int(v[1]), int(v[2])) for k, v in raw.items()}
    except Exception:  # missing, not a mapping of triples, an infinite number...
        logger.warning("the cache snapshot has an unreadable header; ignoring its positions")
        return {}
