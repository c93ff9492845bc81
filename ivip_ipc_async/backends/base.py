"""The protocol between `AsyncIPC` and a backend.

A backend moves records between processes. It knows bytes and records, never
events or caches: `AsyncIPC` hands it records to append, and receives records
through a `RecordSink`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Any, Final, NamedTuple, Protocol

from ..conditions import Conditional, Outcome
from ..records import Record

__all__ = [
    "MAX_LOCK_NOTE",
    "Backend",
    "Conditional",
    "Contender",
    "LockProvider",
    "LossCause",
    "Outcome",
    "Problem",
    "RecordSink",
    "check_lock_name",
    "check_lock_note",
    "count_loss",
]

LOCK_NAME: Final = re.compile(r"^[a-z]\.[A-Za-z0-9_][A-Za-z0-9._-]{0,159}$")
MAX_LOCK_NOTE: Final = 512  # characters of a lock holder's note


class LossCause(StrEnum):
    """Why records were lost to a process (a gap), on either backend.

    Each names a counter of `stats()`, `records_lost_<cause>` (present once
    records were lost to it), and the `cause` label of the `records_lost`
    metric. The values are stable: dashboards and alerts use them. Records lost
    for a reason not known (Redis cannot always tell) are counted in
    `records_lost` only.

    Example:
        >>> LossCause.RETENTION.counter, LossCause("cap") is LossCause.CAP
        ('records_lost_retention', True)
    """

    RETENTION = "retention"
    """Directory: deleted before this process read them (it fell more than the
    retention window behind)."""
    CAP = "cap"
    """Directory: deleted by their writer to keep the namespace under `max_footprint`."""
    DISPLACED = "displaced"
    """Directory: written where this process could not read them (the namespace
    directory was removed or moved)."""
    CORRUPTION = "corruption"
    """Directory: unreadable bytes, or a segment replaced by something unsafe."""
    TRUNCATION = "truncation"
    """Directory: a segment was cut short before this process read it."""
    TRIMMED = "trimmed"
    """Redis: trimmed or deleted from the stream before this process read them."""
    RESTART = "restart"
    """Redis: the server restarted without them."""

    @property
    def counter(self) -> str:
        """The `stats()` key that counts the records lost for this cause.

        Example:
            >>> LossCause.CAP.counter
            'records_lost_cap'
        """
        return f"records_lost_{self.value}"


def count_loss(counters: dict[str, int], cause: LossCause, lost: int) -> None:
    """Count `lost` records in `records_lost` and in `cause`'s counter.

    Example:
        >>> counters = {"records_lost": 0}
        >>> count_loss(counters, LossCause.CAP, 3)
        >>> counters
        {'records_lost': 3, 'records_lost_cap': 3}
    """
    counters["records_lost"] += lost
    counters[cause.counter] = counters.get(cause.counter, 0) + lost


def check_lock_name(name: str) -> str:
    """Refuse a lock name that is not `<kind>.<name>` (see `LockProvider`).

    Example:
        >>> check_lock_name("u.reports")
        'u.reports'
    """
    if not isinstance(name, str) or not LOCK_NAME.match(name):
        raise ValueError(f"invalid lock name {name!r}")
    return name


def check_lock_note(note: str) -> str:
    """Refuse a lock holder's note longer than `MAX_LOCK_NOTE` characters.

    Example:
        >>> check_lock_note("pid 42")
        'pid 42'
        >>> check_lock_note("x" * 513)
        Traceback (most recent call last):
        ...
        ValueError: a lock note is at most 512 characters
    """
    if len(note) > MAX_LOCK_NOTE:
        raise ValueError(f"a lock note is at most {MAX_LOCK_NOTE} characters")
    return note


class RecordSink(Protocol):
    """What a backend delivers to (implemented by `AsyncIPC`)."""

    def deliver(self, records: Sequence[Record]) -> None:
        """Live records from peers, each sender's in the order it sent them."""

    def restore(self, records: Sequence[Record]) -> None:
        """Records written before this process started (snapshot, retained log).

        Only their state matters: cache records are applied, messages ignored.
        """

    def written(self, records: Sequence[Record]) -> None:
        """Records of this process's own that are now stored: their state applies
        here as it does in every peer (cache records; messages are ignored).

        Called by the backend for every stored write, even one whose caller was
        cancelled meanwhile, so this process's mirror never lacks what its peers
        have.
        """

    def state(self) -> Iterable[Record]:
        """The current cache state, as records, for a snapshot."""

    def state_version(self) -> int:
        """A number that changes whenever `state()` would."""

    def state_bytes(self) -> int:
        """About the bytes a snapshot of `state()` takes (what a size cap must
        keep room for, before the snapshot is even written)."""

    def mirror_ready(self, ready: bool) -> None:
        """Whether the mirror is current. While False (say, the connection to Redis
        is being re-established and records may have been missed), cache reads go
        to `Backend.fetch` instead of the mirror."""

    def current(self, topic: str, key: bytes) -> Record | None:
        """The winning record of one cache key in this process's mirror (a
        tombstone or an expired entry included; None: never seen). What a
        conditional write decides on, once the backend has delivered every
        record written before it (`Backend.write_if`)."""

    def gap(self, peer: str, lost: int | None) -> None:
        """`lost` records of `peer` were gone before they could be read (None: an
        unknown number, maybe none).

        The backend reloads the cache state (snapshot, then retained log) right
        after telling the sink; the sink tells the application.
        """


class Problem(NamedTuple):
    """One thing wrong with a backend now, as `health()` reports it.

    Example:
        >>> Problem("watcher is not running", unhealthy=False).unhealthy
        False
    """

    text: str
    """A sentence: what is wrong and what still works."""
    unhealthy: bool
    """True when it makes the instance unhealthy (a readiness probe answers 503);
    False when only slower (a stopped watcher: the re-scans still deliver)."""


class Backend(Protocol):
    """A transport for records. One instance serves one `AsyncIPC` start."""

    node: int
    """This process's id for the last-writer-wins tie-break (unique per start)."""

    max_record_size: int

    async def start(self, sink: RecordSink) -> None:
        """Join: load the present state into `sink`, then deliver live records."""

    async def append(self, records: Sequence[Record]) -> None:
        """Write records; when this returns every live peer will receive them, and
        the cache records among them were passed to `RecordSink.written`."""

    async def close(self) -> None:
        """Leave: stop reading, release every file, thread and task."""

    def abandon(self) -> None:
        """Release resources synchronously when the event loop is already gone."""

    async def fetch(self, topic: str, key: bytes) -> Record | None:
        """The current state record of one cache key, from the shared medium
        (None where the medium is read in order into the mirror: see `catch_up`)."""

    async def catch_up(self) -> None:
        """Read now what peers have written so far: afterwards the sink has every
        record acknowledged before this call (a no-op where `fetch` answers)."""

    async def write_if(self, op: Conditional) -> Outcome:
        """Store `op.record` only if the key's current state allows it
        (`conditions.decide`), atomically with respect to every other
        `write_if` of the same key from any process.

        When this returns, the outcome is final: an applied write is stored
        (every live peer will receive it, and it is applied here); a refused
        one stored nothing, and the current record it was refused by has been
        given to this process's mirror (`RecordSink.written`). Raising, it may
        or may not have been stored (a lost connection to Redis); see
        docs/api.md.
        """

    def stats(self) -> dict[str, Any]:
        """Counters and health for `AsyncIPC.stats()`."""

    def locks(self) -> LockProvider:
        """The lock capability of this medium (made on first use, closed with the backend)."""

    def problems(self) -> list[Problem]:
        """What is wrong with this backend now, for `AsyncIPC.health()` (empty:
        nothing); a problem marked `unhealthy` makes the instance unhealthy."""

    gap_cause: str
    """How records are lost to a gap on this medium, in words (`health()`
    names it while a recent gap makes the instance unhealthy)."""


class LockProvider(Protocol):
    """Locks shared by every process of a namespace (and every host, on Redis).

    A lock name is 3-160 characters: a one-letter kind, a dot, then letters,
    digits, `.`, `_` or `-` (the kinds keep users' locks, leaderships,
    memoize's locks and conditional cache writes' apart: `u.`, `l.`, `m.`, `c.`).
    """

    leased: bool
    """True when a holder can lose the lock while it lives (a Redis lease that
    was not renewed in time); False for kernel locks, held until released or death."""

    def contender(self, name: str, *, lease: float) -> Contender:
        """One attempt to hold `name`: try, wait for a release, hold, release.

        `lease` (seconds) is how long a leased lock outlives a holder that stopped
        renewing it (killed, paused, cut off); kernel locks ignore it.
        """

    async def close(self) -> None:
        """Release every lock held through this provider and stop its waiters."""

    def abandon(self) -> None:
        """As `close`, without the event loop (it may be closed already)."""


class Contender(Protocol):
    """One process's attempt at a lock, from waiting through holding to release.

    Not inherited by a forked child: there it holds nothing and waits for nothing.
    """

    fence: int
    """The fencing token of the current holding: larger for every later holder of
    the lock (0 until held). Hand it to a store that refuses smaller tokens."""

    @property
    def held(self) -> bool:
        """True while this contender holds the lock, as far as it knows locally
        (a lease that could not be renewed in time reads False at once)."""

    async def try_acquire(self, note: str = "") -> bool:
        """Take the lock if it is free, without waiting; `note` is shown to others."""

    async def wait(self, timeout: float) -> None:
        """Return when the lock may have been released (or its note changed),
        or after `timeout` seconds: then `try_acquire` again."""

    async def holder_note(self) -> str | None:
        """The note of the lock's current holder; None when free or unknown."""

    async def set_note(self, note: str) -> None:
        """Replace the note others see while this contender holds the lock."""

    async def verify(self) -> bool:
        """Ask the medium whether this contender still holds the lock."""

    async def release(self, *, discard: bool = False) -> None:
        """Let go of the lock if held, and stop waiting. Safe to repeat.

        `discard`: the lock's name will likely not be used again (a memoized key):
        drop what the medium keeps for it.
        """
