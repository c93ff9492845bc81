"""Where the cap is enforced: `max_footprint` on the history, `max_state_bytes` on
the live state. The whole rule is here; the writer (`segments.py`) applies it
on its write path, liveness sets the peer count it splits the cap by, and the
snapshot writer asks it whether a snapshot is due to make room.

- The history (the segments readers catch up on) is capped at `max_footprint`,
  all peers together: each writer keeps its own segments within its share,
  `max_footprint` split among every peer with a lock file (the dead ones'
  segments count until they are collected; `Budget.set_peers`, by liveness).
  Segments shrink so that a share always holds several of them.
- A write that would pass the share first deletes its writer's oldest segments
  (`make_room`), but only those a snapshot covers (`covered`): a segment with
  cache writes no snapshot holds yet must stay, or a joiner would miss them.
  Then the write waits for a snapshot (`history_filling` asks for one early),
  and fails with `BackendFullError` (ENOSPC) after `ROOM_WAIT` seconds
  (`Budget.room_wait`): never acknowledged, so nothing is lost.
- The snapshot is not charged to the share: it is the live state, bounded by
  `max_state_bytes` (`check_state`: a cache set that would pass it is refused
  before anything is written).

Depends on: `state` (Config, OwnLog, Writers, Positions), `records`, `errors`,
`logs`. No part of the backend.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Sequence
from typing import Final

from ...errors import BackendFullError
from ...logs import rate_limited
from ...records import Kind, Record
from ..base import RecordSink
from .state import Config, OwnLog, OwnSegment, Positions, Writers

__all__ = [
    "ROOM_RETRY",
    "ROOM_WAIT",
    "Budget",
    "NoRoom",
    "check_state",
    "covered",
    "history_filling",
    "make_room",
]

_MIN_SEGMENT: Final = 64 << 10  # segments shrink to this when many writers share the cap
ROOM_RETRY: Final = 0.01  # seconds between tries of a write waiting for room under the cap
ROOM_WAIT: Final = 10.0  # seconds a write waits for a snapshot to make room, then fails
_CACHE_SET: Final = Kind.CACHE_SET


class NoRoom(Exception):
    """The write would put this writer over its share of `max_footprint`, and its
    oldest segment holds cache writes no snapshot covers yet."""


class Budget:
    """This writer's share of `max_footprint`, and since when writes wait for room.

    Example:
        >>> budget = Budget(Config.of("ns", max_footprint=8 << 20, segment_bytes=1 << 20))
        >>> budget.set_peers(4)
        >>> budget.share, budget.segment_limit
        (2097152, 524288)
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self.peers = 1  # peers with a lock file, dead or alive: they share the cap
        self.share = config.max_footprint  # own share of the cap; see set_peers
        self.segment_limit = config.segment_bytes  # a segment is closed past this
        self.room_since = 0.0  # monotonic time writes started waiting for room

    def set_peers(self, count: int) -> None:
        """`count` peers have a lock file (dead or alive): they share the cap.
        Called by liveness only, whenever peers/ is listed."""
        self.peers = count
        config = self._config
        share = config.max_footprint // max(1, count)
        self.segment_limit = min(config.segment_bytes, max(_MIN_SEGMENT, share // 4))
        self.share = max(2 * self.segment_limit, share)

    def room_wait(self) -> BackendFullError | None:
        """Writes wait for room under the cap: warn at the first wait; after
        `ROOM_WAIT` seconds, the error to fail them with (None: wait on)."""
        now = time.monotonic()
        if not self.room_since:
            self.room_since = now
            rate_limited(
                logging.WARNING,
                "room",
                "writes wait for a snapshot: this writer's share of max_footprint (%d of "
                "%d bytes) is full of cache writes no snapshot covers yet",
                self.share,
                self._config.max_footprint,
            )
        elif now - self.room_since > ROOM_WAIT:
            self.room_since = 0.0
            return BackendFullError(
                errno.ENOSPC,
                f"the namespace is at its max_footprint ({self._config.max_footprint} bytes) "
                f"and no snapshot made room within {ROOM_WAIT:.0f}s: nothing was written",
            )
        return None


def covered(seg: OwnSegment, positions: Positions, peer: str) -> bool:
    """Whether a closed own segment may go: no cache writes in it, or the
    snapshot was taken after its last byte was read.

    Example:
        >>> covered(OwnSegment(1, 100, has_cache=True), Positions({"p": (2, 0, 9)}), "p")
        True
    """
    if not seg.has_cache:
        return True
    number, offset, _ = positions.of(peer)
    return seg.number < number or (seg.number == number and offset >= seg.size)


def make_room(
    own: OwnLog,
    size: int,
    share: int,
    may_go: Callable[[OwnSegment], bool],
    rotate: Callable[[], None],
    delete: Callable[[OwnSegment], None],
) -> bool:
    """Delete own oldest segments until `size` more bytes fit in the share;
    False when the oldest holds cache writes no snapshot covers yet (`may_go`).

    Example:
        >>> own = OwnLog([OwnSegment(1, 60), OwnSegment(2, 30)], own_bytes=90)
        >>> def delete(seg):
        ...     own.segments.remove(seg); own.own_bytes -= seg.size
        >>> make_room(own, 20, 100, lambda seg: True, lambda: None, delete), own.own_bytes
        (True, 30)
    """
    while own.own_bytes + size > share:
        if len(own.segments) == 1:
            if own.segments[0].size == 0:
                return True  # one record larger than the share: the slack
            rotate()
            continue
        seg = own.segments[0]
        if not may_go(seg):
            return False
        delete(seg)
    return True


def check_state(
    records: Sequence[Record], sink: RecordSink | None, waiting: int, limit: int
) -> int:
    """Raise `BackendFullError` when the cache sets among `records` would take the
    live state (the shared cache, as this process's mirror measures it: every
    process's writes count, and `waiting` bytes of sets queued here) past
    `limit` (`max_state_bytes`). Checked before anything is written, so a
    refused call wrote nothing. Deletes always pass (they are how room is made).
    Returns the bytes the call may add.

    Example:
        >>> check_state([Record(Kind.CACHE_DELETE, "c", b"k", b"")], None, 0, 10)
        0
    """
    if sink is None:
        return 0
    adds = sum(r.size for r in records if r.kind is _CACHE_SET)
    if not adds:
        return 0
    state = sink.state_bytes() + waiting
    if state + adds > limit:
        raise BackendFullError(
            f"the cache is full: its live state takes {state} bytes and this write "
            f"adds {adds}, past max_state_bytes ({limit} bytes); nothing was written. "
            "Delete keys or give them a TTL, or raise the directory backend's "
            "max_state_bytes option"
        )
    return adds


def history_filling(
    budget: Budget, own: OwnLog, writers: Writers, positions: Positions, peer: str
) -> bool:
    """Whether some writer (this one, `peer`, included) has written half a share
    since the positions the last snapshot covers (segments count as full: an
    estimate, on the safe side, of the bytes a snapshot would let it delete):
    then a snapshot is due, before its next writes must wait for one.

    Example:
        >>> budget = Budget(Config.of("ns", max_footprint=1 << 20, segment_bytes=1 << 16))
        >>> own = OwnLog([OwnSegment(9, 100)])
        >>> history_filling(budget, own, {}, Positions(), "p")
        True
    """
    limit = budget.segment_limit
    half = budget.share // 2
    head = own.head
    heads = [(peer, head.number, head.size)]
    heads += [(w.peer, w.segment, w.offset) for w in writers.values()]
    for who, segment, offset in heads:
        at_segment, at, _ = positions.of(who)
        if (segment - at_segment) * limit + offset - at >= half:
            return True
    return False
