"""The passive state the parts of one directory backend share: data, never a part.

Each part receives in its constructor only the pieces it reads or writes, and
the parts cooperate through them (and through callbacks `backend.py` injects),
never by holding one another:

- `Config`: the options and who this peer is (frozen);
- `Counters`: the counters of `stats()`, typed;
- `Life`: the sink, the event loop, `closing`, the background tasks;
- `Writers`: the writer table, what this process knows of every other writer
  (`WriterState`; written by the reader, read by snapshots, liveness, gaps);
- `OwnLog`: this process's own segments as the writer left them (written by the
  writer, read by snapshots, the doorbell, the cap and rejoin);
- `Positions`: what the newest snapshot covers (written by snapshots, read by the
  reader at start and by the cap);
- `Loss`: why a writer's records may be missing next (a `LossCause` and words);
- `Changes`: the cache keys changed since the last snapshot file (what the
  snapshot holder's next delta holds), noted by `TrackingSink`, the sink every
  part delivers to (the application's, with each cache key that reaches it noted).

Depends on: `records` (FrameReader, Record, Kind), `backends.base` (LossCause,
RecordSink), `logs`. Nothing here does I/O on the directory.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

from ...logs import logger
from ...records import FrameReader, Kind, Record
from ..base import LossCause, RecordSink

__all__ = [
    "COUNTERS",
    "Changes",
    "Config",
    "Counters",
    "Life",
    "Loss",
    "OwnLog",
    "OwnSegment",
    "Positions",
    "TrackingSink",
    "WriterState",
    "Writers",
]


COUNTERS: Final = (
    "records_written",
    "batches_written",
    "bytes_written",
    "records_read",
    "bytes_read",
    "doorbells_sent",
    "doorbells_received",
    "watch_events",
    "rescans",
    "gaps",
    "records_lost",
    "garbage_bytes",
    "torn_tails",
    "peers_collected",
    "segments_deleted",
    "snapshots_written",
    "snapshot_bytes_written",
    "snapshots_damaged",
    "segments_capped",
    "write_errors",
    "task_failures",
    "watcher_restarts",
    "layout_repairs",
    "records_stranded",
)
"""The counters of `stats()`, in their order there."""


@dataclass(frozen=True, slots=True)
class Config:
    """The options of one directory backend, and who this peer is (see
    `DirectoryBackend` for each option).

    Example:
        >>> config = Config.of("/tmp/ipc/ns", node=1)
        >>> config.peer, config.max_footprint
        ('0000000000000001', 67108864)
    """

    path: Path
    node: int
    peer: str  # the node id as 16 hex digits: the name of this peer's files
    max_record_size: int = 16 << 20
    segment_bytes: int = 2 << 20
    retention: float = 15.0
    max_footprint: int = 64 << 20
    max_state_bytes: int = 512 << 20
    rescan_interval: float = 2.0
    snapshot_interval: float = 1.0
    watch_step: int = 150
    use_doorbell: bool = True

    @classmethod
    def of(cls, path: Path | str, *, node: int | None = None, **options: Any) -> Config:
        """The config of the namespace at `path`: the path made absolute (it is
        looked at again while running, and a relative one would follow the
        working directory), a random node id unless one is given.

        Example:
            >>> Config.of("ns", node=255).path.is_absolute()
            True
        """
        node = node if node is not None else (secrets.randbits(63) or 1)
        return cls(Path(os.path.abspath(path)), node, f"{node:016x}", **options)


class Counters:
    """The counters of `stats()`: one attribute each, and the records lost per
    cause (`records_lost_<cause>`, present once records were lost to it).

    Example:
        >>> counters = Counters()
        >>> counters.gaps += 1
        >>> counters.lost(LossCause.CAP, 3)
        >>> counters.as_dict()["records_lost_cap"], counters.as_dict()["records_lost"]
        (3, 3)
    """

    __slots__ = (*COUNTERS, "_lost_by_cause")

    def __init__(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        self._lost_by_cause: dict[LossCause, int] = {}

    # (Declared for the type checker; set in __init__.)
    records_written: int
    batches_written: int
    bytes_written: int
    records_read: int
    bytes_read: int
    doorbells_sent: int
    doorbells_received: int
    watch_events: int
    rescans: int
    gaps: int
    records_lost: int
    garbage_bytes: int
    torn_tails: int
    peers_collected: int
    segments_deleted: int
    snapshots_written: int
    snapshot_bytes_written: int
    snapshots_damaged: int
    segments_capped: int
    write_errors: int
    task_failures: int
    watcher_restarts: int
    layout_repairs: int
    records_stranded: int

    def lost(self, cause: LossCause, count: int) -> None:
        """Count `count` records lost to `cause` (and in `records_lost`).

        Example:
            >>> counters = Counters(); counters.lost(LossCause.RETENTION, 2)
            >>> counters.records_lost
            2
        """
        self.records_lost += count
        self._lost_by_cause[cause] = self._lost_by_cause.get(cause, 0) + count

    def as_dict(self) -> dict[str, int]:
        """Every counter by its `stats()` name, in a stable order.

        Example:
            >>> list(Counters().as_dict())[:2]
            ['records_written', 'batches_written']
        """
        out = {name: getattr(self, name) for name in COUNTERS}
        for cause, count in self._lost_by_cause.items():
            out[cause.counter] = count
        return out


class Life:
    """Where one started backend runs: its sink, its event loop, whether it is
    closing, and its background tasks (counted in `counters` when one dies).

    Example:
        >>> life = Life(Counters())
        >>> life.sink is None, life.closing
        (True, False)
    """

    def __init__(self, counters: Counters) -> None:
        self.sink: RecordSink | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self._counters = counters

    def spawn(
        self, factory: Callable[[], Coroutine[Any, Any, None]], restart: bool = False
    ) -> None:
        """Run a background task (named `ivip-ipc<factory's name>`); one that dies
        is logged loudly (and restarted)."""
        name = factory.__name__
        task = asyncio.get_running_loop().create_task(factory(), name=f"ivip-ipc{name}")
        self.tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self.tasks.discard(t)
            if t.cancelled() or self.closing:
                return
            exc = t.exception()
            if exc is None:
                return
            self._counters.task_failures += 1
            again = ", restarting it" if restart else ""
            logger.error("background task %s died%s", name, again, exc_info=exc)
            if restart:
                self.spawn(factory, restart=True)

        task.add_done_callback(done)

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep `task` among the background tasks until it is done."""
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class Loss(NamedTuple):
    """Why a writer's records may be missing next, for the gap report: the cause
    (which counter) and what happened, in words (for the warning).

    Example:
        >>> str(Loss(LossCause.TRUNCATION, "its segment was cut short"))
        'truncation (its segment was cut short)'
    """

    cause: LossCause
    detail: str

    def __str__(self) -> str:
        return f"{self.cause.value} ({self.detail})"


@dataclass(slots=True)
class WriterState:
    """What this process knows of one other writer's segments.

    Example:
        >>> WriterState("00000000000000aa", 1, FrameReader(1 << 20)).last_seq
        0
    """

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


Writers = dict[str, WriterState]
"""The writer table: every other writer this process reads, by peer name."""


@dataclass(slots=True)
class OwnSegment:
    """One of this process's own segments, as written so far.

    Example:
        >>> OwnSegment(1).size
        0
    """

    number: int
    size: int = 0
    has_cache: bool = False
    closed_at: float = 0.0
    last_seq: int = 0


@dataclass(slots=True)
class OwnLog:
    """This process's own segments (oldest first; the last is being written),
    the bytes they hold and the sequence number of the last record written.

    Example:
        >>> own = OwnLog(); own.segments.append(OwnSegment(1))
        >>> own.head.number, own.seq
        (1, 0)
    """

    segments: list[OwnSegment] = field(default_factory=list)
    own_bytes: int = 0
    seq: int = 0

    @property
    def head(self) -> OwnSegment:
        """The segment being written."""
        return self.segments[-1]


@dataclass(slots=True)
class Positions:
    """What the newest snapshot covers: per writer (this one included), the
    segment, offset and last sequence number its state reaches.

    Example:
        >>> Positions().of("00000000000000aa")
        (0, 0, 0)
    """

    by_peer: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def of(self, peer: str) -> tuple[int, int, int]:
        """`peer`'s position, (0, 0, 0) when the snapshot covers nothing of it."""
        return self.by_peer.get(peer, (0, 0, 0))


_SET: Final = Kind.CACHE_SET
_DELETE: Final = Kind.CACHE_DELETE


class Changes:
    """The cache keys changed since the last snapshot file: (cache name, encoded
    key), noted while `tracking` (only the holder of snapshot.lock tracks: its
    next delta holds the current record of each).

    Example:
        >>> changes = Changes(); changes.tracking = True
        >>> message = Record(Kind.MESSAGE, "e", b"", b"")
        >>> changes.note([Record(Kind.CACHE_SET, "c", b"sk", b"1"), message])
        >>> changes.take(), changes.keys
        ({('c', b'sk')}, set())
    """

    __slots__ = ("keys", "tracking")

    def __init__(self) -> None:
        self.keys: set[tuple[str, bytes]] = set()
        self.tracking = False

    def note(self, records: Sequence[Record]) -> None:
        """Note the keys of the cache records among `records` (while tracking)."""
        if self.tracking:
            self.keys.update(
                [(r.topic, r.key) for r in records if r.kind is _SET or r.kind is _DELETE]
            )

    def take(self) -> set[tuple[str, bytes]]:
        """The keys noted so far; noting starts afresh."""
        keys, self.keys = self.keys, set()
        return keys

    def stop(self) -> None:
        """No longer the snapshot holder: forget and stop noting."""
        self.tracking = False
        self.keys = set()


class TrackingSink:
    """The sink the parts deliver to: `sink`, with the key of every cache record
    that reaches it (from a peer, from the log, from this process's own writes,
    from a snapshot) noted in `changes` on its way.

    Example:
        >>> changes = Changes(); changes.tracking = True
        >>> class Sink:
        ...     def restore(self, records): print(len(records), "restored")
        >>> TrackingSink(Sink(), changes).restore([Record(Kind.CACHE_DELETE, "c", b"sk", b"")])
        1 restored
        >>> changes.keys
        {('c', b'sk')}
    """

    def __init__(self, sink: RecordSink, changes: Changes) -> None:
        self.inner = sink
        self._changes = changes
        wanted = getattr(sink, "wanted", None)
        if wanted is not None:
            self.wanted = wanted  # optional for a sink: the reader asks for it

    def deliver(self, records: Sequence[Record]) -> None:
        """See `RecordSink.deliver`."""
        self._changes.note(records)
        self.inner.deliver(records)

    def restore(self, records: Sequence[Record]) -> None:
        """See `RecordSink.restore`."""
        self._changes.note(records)
        self.inner.restore(records)

    def written(self, records: Sequence[Record]) -> None:
        """See `RecordSink.written`."""
        self._changes.note(records)
        self.inner.written(records)

    def state(self) -> Iterable[Record]:
        """See `RecordSink.state`."""
        return self.inner.state()

    def state_version(self) -> int:
        """See `RecordSink.state_version`."""
        return self.inner.state_version()

    def state_bytes(self) -> int:
        """See `RecordSink.state_bytes`."""
        return self.inner.state_bytes()

    def mirror_ready(self, ready: bool) -> None:
        """See `RecordSink.mirror_ready`."""
        self.inner.mirror_ready(ready)

    def current(self, topic: str, key: bytes) -> Record | None:
        """See `RecordSink.current`."""
        return self.inner.current(topic, key)

    def gap(self, peer: str, lost: int | None) -> None:
        """See `RecordSink.gap`."""
        self.inner.gap(peer, lost)
