"""How a late joiner loads state: the snapshot files, then the retained log from there.

The snapshot is a chain of files (format in docs/format.md): a base,
`snapshot.bin`, the whole cache state at some point, then the deltas written
since, `snapshot.<base>.<n>.delta` for n = 1, 2, ..., each holding the current
record of every key that changed since the file before it, and the positions
it covers. Loaded in order, last-writer-wins makes the overlaps harmless: the
chain holds every key's state at least as new as the last file's positions.

A process that joins a namespace learns the present in three steps
(`DirectoryBackend.start` runs them in this order):

1. `Joining.load_at_start`: the chain (if any) is read into the sink a slice
   at a time (`load_snapshot`), and the last file's positions (per writer:
   segment, offset, last sequence number) become `Positions`;
2. `LogReader.scan` and `LogReader.restore_log`: every writer found at the first
   listing of log/ is read from the position the snapshot covers (from its
   oldest retained segment if the snapshot has none) to its end, as state only
   (cache records apply, messages are not dispatched);
3. then every record is live.

A damaged chain (a file truncated, without header, garbage; a delta missing
or planted after the last one) is loaded as far as it is readable, together
with the whole retained log, and the next base its holder writes is loaded
again (`maybe_reload`). The same reader serves the resync after a gap
(`gaps.py`) and the peers that do not write snapshots, to learn what the
newest file covers (`read_header`, `chain_names`).

Depends on: `state`, `layout`, `pacing`, `recovery` (garbage counting),
`records`. No part of the backend.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any, Final

from ...logs import logger
from ...records import HEADER_SIZE, FrameReader, Kind
from ..base import RecordSink
from .layout import READ_CHUNK, SNAPSHOT, json_object, open_regular
from .pacing import sliced
from .recovery import garbage_reporter
from .state import Config, Counters, Life, Positions, Writers

__all__ = [
    "FORMAT",
    "Joining",
    "base_id",
    "chain_names",
    "delta_name",
    "load_snapshot",
    "parse_delta",
    "positions_of",
    "read_header",
    "read_positions",
    "snapshot_identity",
]

Identity = tuple[int, int, int]  # (inode, size, mtime_ns) of a snapshot file
PositionMap = dict[str, tuple[int, int, int]]

FORMAT: Final = 2  # of snapshot files: 2 = a base and its deltas (1: snapshot.bin alone)
_DELTA: Final = re.compile(r"snapshot\.([0-9a-f]{16})\.([0-9]{8})\.delta", re.ASCII)
_TRIES: Final = 3  # chains opened while a new base replaces the old one, then damaged


def delta_name(base: str, number: int) -> str:
    """The name of delta `number` (from 1) of base `base`.

    Example:
        >>> delta_name("00000000000000ab", 3)
        'snapshot.00000000000000ab.00000003.delta'
    """
    return f"snapshot.{base}.{number:08d}.delta"


def parse_delta(name: str) -> tuple[str, int] | None:
    """(base, number) of a delta's name; None when `name` is not one.

    Example:
        >>> parse_delta("snapshot.00000000000000ab.00000003.delta"), parse_delta("x")
        (('00000000000000ab', 3), None)
    """
    m = _DELTA.fullmatch(name)
    return None if m is None else (m[1], int(m[2]))


def chain_names(names: list[str], base: str) -> tuple[list[str], bool]:
    """The deltas of `base` among `names` (a listing of the namespace), in order,
    and whether they are a whole chain: numbered 1, 2, ... with none missing
    (False: one was deleted, or one was planted past a hole).

    Example:
        >>> chain_names([delta_name("ab" * 8, 2), "x", delta_name("ab" * 8, 1)], "ab" * 8)[1]
        True
    """
    numbers = sorted(n for b, n in filter(None, map(parse_delta, names)) if b == base)
    return [delta_name(base, n) for n in numbers], numbers == list(range(1, len(numbers) + 1))


def snapshot_identity(root_fd: int, name: str = SNAPSHOT) -> Identity | None:
    """Which file is at `name` now (each is a new file, renamed into place)."""
    try:
        st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _fd_identity(fd: int) -> Identity:
    st = os.fstat(fd)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_header(fd: int, max_record_size: int) -> dict[str, Any] | None:
    """The JSON object of the header frame of the snapshot file open at `fd`
    (read whole, however many peers it names); None when it has none."""
    head = os.pread(fd, HEADER_SIZE, 0)
    if len(head) < HEADER_SIZE:
        return None
    size = HEADER_SIZE + int.from_bytes(head[4:8], "little")  # body_len
    head += os.pread(fd, min(size, max_record_size) - HEADER_SIZE, HEADER_SIZE)
    recs = FrameReader(max_record_size).feed(head)
    if recs and recs[0].kind is Kind.SNAPSHOT_META:
        return json_object(recs[0].data)
    return None


def read_positions(fd: int, max_record_size: int) -> PositionMap | None:
    """The positions in the header of the snapshot file open at `fd`; None when
    it has no header."""
    header = read_header(fd, max_record_size)
    return None if header is None else positions_of(header)


def base_id(header: dict[str, Any]) -> str | None:
    """The id of a base (format 2), None for a format-1 snapshot.bin (no deltas).

    Example:
        >>> base_id({"format": 2, "base": "ab" * 8}), base_id({"positions": {}})
        ('abababababababab', None)
    """
    base = header.get("base")
    if type(base) is str and len(base) == 16 and all(c in "0123456789abcdef" for c in base):
        return base
    return None


def _open_chain(root_fd: int, max_record_size: int) -> tuple[list[tuple[str, int]], bool]:
    """Open the base and its deltas (then a new base replacing them cannot take
    them away mid-load); whether they are a whole chain. Tried again when the
    base was replaced meanwhile (its holder deletes the old deltas after)."""
    files: list[tuple[str, int]] = []
    for _ in range(_TRIES):
        for _, fd in files:
            os.close(fd)
        files = []
        try:
            fd = open_regular(SNAPSHOT, os.O_RDONLY, root_fd)
        except FileNotFoundError:
            return [], True
        files.append((SNAPSHOT, fd))
        header = read_header(fd, max_record_size)
        base = None if header is None else base_id(header)
        whole = True
        if base is not None:
            names, whole = chain_names(os.listdir(root_fd), base)
            for name in names:
                try:
                    files.append((name, open_regular(name, os.O_RDONLY, root_fd)))
                except OSError as exc:
                    logger.warning("could not open the snapshot delta %s: %s", name, exc)
                    whole = False
                    break
        if snapshot_identity(root_fd) == _fd_identity(fd):
            return files, whole
    return files, False


async def load_snapshot(
    config: Config, root_fd: int, counters: Counters, writers: Writers, sink: RecordSink
) -> tuple[bool, PositionMap | None]:
    """Load the snapshot (the base, then each delta in order; if any) into `sink`,
    a slice at a time. Returns whether it was whole (False: damaged; what it held
    that was readable is loaded all the same) and the positions its last file
    names (None: no snapshot, or damaged)."""
    try:
        files, whole = _open_chain(root_fd, config.max_record_size)
    except OSError as exc:
        logger.warning("could not read the cache snapshot, replaying the log only: %s", exc)
        return False, None
    if not files:
        return True, None
    positions: PositionMap | None = None
    problem = "" if whole else "a delta is missing"
    base: str | None = None
    try:
        for number, (name, fd) in enumerate(files):
            header, count, end, clean = await _load_file(config, fd, counters, writers, sink)
            if header is not None and number == 0:
                base = base_id(header)
            if header is None:
                problem = problem or f"{name} has no header"
            elif number and (base_id(header) != base or header.get("delta") != number):
                problem = problem or f"{name} belongs to another base"
            elif end != count or not clean:
                problem = problem or f"{name} holds {count} readable records of {end}"
            else:
                positions = positions_of(header)
    except OSError as exc:
        logger.warning("could not read the cache snapshot, replaying the log only: %s", exc)
        return False, None
    finally:
        for _, fd in files:
            os.close(fd)
    if problem:
        counters.snapshots_damaged += 1
        logger.warning(
            "the cache snapshot is damaged (%s): loaded what it still holds, and the "
            "whole retained log; its holder writes a new one",
            problem,
        )
        return False, None
    return True, positions


async def _load_file(
    config: Config, fd: int, counters: Counters, writers: Writers, sink: RecordSink
) -> tuple[dict[str, Any] | None, int, int, bool]:
    """Load one snapshot file into `sink`: its header, the count of records it
    held, the count its end frame names (-1: none) and whether it had no garbage."""
    reader = FrameReader(config.max_record_size, garbage_reporter("snapshot", writers, counters))
    header: dict[str, Any] | None = None
    count, end = 0, -1
    loop = asyncio.get_running_loop()
    offset = 0
    while data := await loop.run_in_executor(None, os.pread, fd, READ_CHUNK, offset):
        offset += len(data)
        async for records in sliced(reader, data):
            state = []
            for rec in records:
                if rec.kind is not Kind.SNAPSHOT_META:
                    state.append(rec)
                elif header is None and count == 0:
                    header = json_object(rec.data)
                else:
                    end = _snapshot_end(rec.data)
            count += len(state)
            sink.restore(state)
    return header, count, end, not (reader.pending or reader.skipped_bytes)


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
    """The record count of a snapshot file's closing frame (-1: not one): `count`
    (format 2), `records` (format 1)."""
    end = json_object(data)
    records = end.get("count", end.get("records"))
    return records if type(records) is int and records >= 0 else -1


def _positions(data: bytes) -> PositionMap:
    return positions_of(json_object(data))


def positions_of(header: dict[str, Any]) -> PositionMap:
    """The positions a snapshot file's header names (untrusted: {} when they are
    not a mapping of integer triples).

    Example:
        >>> positions_of({"positions": {"p": [1, 2, 3]}}), positions_of({"positions": 7})
        ({'p': (1, 2, 3)}, {})
    """
    try:
        raw = header["positions"]
        return {str(k): (int(v[0]), int(v[1]), int(v[2])) for k, v in raw.items()}
    except Exception:  # missing, not a mapping of triples, an infinite number...
        logger.warning("the cache snapshot has an unreadable header; ignoring its positions")
        return {}
