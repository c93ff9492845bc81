"""How a late joiner loads state: the snapshot, then the retained log from there.

A process that joins a namespace learns the present in three steps
(`DirectoryBackend.start` runs them in this order):

1. `Joining.load_at_start`: `snapshot.bin` (if any) is read into the sink a
   slice at a time (`load_snapshot`), and its header's positions (per writer:
   segment, offset, last sequence number) become `Positions`;
2. `LogReader.scan` and `LogReader.restore_log`: every writer found at the first
   listing of log/ is read from the position the snapshot covers (from its
   oldest retained segment if the snapshot has none) to its end, as state only
   (cache records apply, messages are not dispatched);
3. then every record is live.

A damaged snapshot (truncated, no header, garbage) is loaded as far as it is
readable, together with the whole retained log, and the next one its holder
writes is loaded again (`maybe_reload`). The same reader of `snapshot.bin`
serves the resync after a gap (`gaps.py`) and the peers that do not write
snapshots, to learn what the newest one covers (`read_positions`).

Depends on: `state`, `layout`, `pacing`, `recovery` (garbage counting),
`records`. No part of the backend.
"""

from __future__ import annotations

import asyncio
import os

from ...logs import logger
from ...records import HEADER_SIZE, FrameReader, Kind
from ..base import RecordSink
from .layout import READ_CHUNK, SNAPSHOT, json_object, open_regular
from .pacing import sliced
from .recovery import garbage_reporter
from .state import Config, Counters, Life, Positions, Writers

__all__ = ["Joining", "load_snapshot", "read_positions", "snapshot_identity"]

Identity = tuple[int, int, int]  # (inode, size, mtime_ns) of snapshot.bin


def snapshot_identity(root_fd: int) -> Identity | None:
    """Which snapshot.bin is there now (each is a new file, renamed into place)."""
    try:
        st = os.stat(SNAPSHOT, dir_fd=root_fd, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


async def load_snapshot(
    config: Config, root_fd: int, counters: Counters, writers: Writers, sink: RecordSink
) -> tuple[bool, dict[str, tuple[int, int, int]] | None]:
    """Load snapshot.bin (if any) into `sink`, a slice at a time. Returns whether
    it was whole (False: damaged; what it held that was readable is loaded all
    the same) and the positions its header names (None: no snapshot, or no
    header)."""
    reader = FrameReader(config.max_record_size, garbage_reporter("snapshot", writers, counters))
    meta: dict[str, tuple[int, int, int]] | None = None
    count, end = 0, -1
    try:
        fd = open_regular(SNAPSHOT, os.O_RDONLY, root_fd)
    except FileNotFoundError:
        return True, None
    except OSError as exc:
        logger.warning("could not read the cache snapshot, replaying the log only: %s", exc)
        return False, None
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
        return False, None
    finally:
        os.close(fd)
    if meta is None or end != count or reader.pending or reader.skipped_bytes:
        counters.snapshots_damaged += 1
        logger.warning(
            "snapshot.bin is damaged (%s): loaded the %d records it still holds, and "
            "the whole retained log; its holder writes it again",
            "no header" if meta is None else f"{count} records of {end} readable",
            count,
        )
        return False, None
    return True, meta


def read_positions(fd: int, max_record_size: int) -> dict[str, tuple[int, int, int]] | None:
    """The positions in the header frame of the snapshot open at `fd` (read whole,
    however many peers it names); None when it has no header."""
    head = os.pread(fd, HEADER_SIZE, 0)
    if len(head) < HEADER_SIZE:
        return None
    size = HEADER_SIZE + int.from_bytes(head[4:8], "little")  # body_len
    head += os.pread(fd, min(size, max_record_size) - HEADER_SIZE, HEADER_SIZE)
    recs = FrameReader(max_record_size).feed(head)
    if recs and recs[0].kind is Kind.SNAPSHOT_META:
        return _positions(recs[0].data)
    return None


class Joining:
    """This process's join: the snapshot loaded at start, and loaded again when
    the one at start was damaged.

    Example:
        >>> import tempfile
        >>> config, counters = Config.of(tempfile.mkdtemp() + "/ns"), Counters()
        >>> Joining(config, {}, counters, Life(counters), {}, Positions()).suspect
        False
    """

    def __init__(
        self,
        config: Config,
        fds: dict[str, int],
        counters: Counters,
        life: Life,
        writers: Writers,
        positions: Positions,
    ) -> None:
        self._config = config
        self._fds = fds
        self._counters = counters
        self._life = life
        self._writers = writers
        self._positions = positions
        self.suspect = False  # the snapshot loaded at start was damaged
        self._seen: Identity | None = None  # the snapshot.bin last looked at

    async def load(self) -> bool:
        """Load snapshot.bin into the sink; False when it is damaged."""
        sink = self._life.sink
        assert sink is not None
        ok, _ = await load_snapshot(
            self._config, self._fds["root"], self._counters, self._writers, sink
        )
        return ok

    async def load_at_start(self) -> None:
        """Load the snapshot into the sink and learn its positions; a damaged one
        is replaced by the next (`maybe_reload`)."""
        sink = self._life.sink
        assert sink is not None
        ok, meta = await load_snapshot(
            self._config, self._fds["root"], self._counters, self._writers, sink
        )
        if ok and meta is not None:
            self._positions.by_peer = meta
        self.suspect = not ok
        self._seen = snapshot_identity(self._fds["root"])

    def moved(self) -> None:
        """The namespace directory was replaced: its snapshot.bin is another."""
        self._seen = None

    def maybe_reload(self, holder: bool) -> None:
        """A process that started from a damaged snapshot loads the next one its
        holder writes (last-writer-wins makes loading it again harmless); the
        `holder` of snapshot.lock writes it itself."""
        if not self.suspect or holder:
            return
        seen = snapshot_identity(self._fds["root"])
        if seen is None or seen == self._seen:
            return
        self._seen = seen

        async def reload() -> None:
            if await self.load():
                self.suspect = False

        self._life.spawn(reload)


def _snapshot_end(data: bytes) -> int:
    """The record count of a snapshot's closing frame (-1: not one)."""
    records = json_object(data).get("records")
    return records if type(records) is int and records >= 0 else -1


def _positions(data: bytes) -> dict[str, tuple[int, int, int]]:
    try:
        raw = json_object(data)["positions"]
        return {str(k): (int(v[0]), int(v[1]), int(v[2])) for k, v in raw.items()}
    except Exception:  # missing, not a mapping of triples, an infinite number...
        logger.warning("the cache snapshot has an unreadable header; ignoring its positions")
        return {}
