"""Recovery: what becomes of a writer's bytes that are not whole.

Helpers of the reader, each on one `WriterState`: a torn tail at a segment's
final end is dropped whole (`drop_tail`); a frame stuck behind a forged length
while its writer lives is given up and the records it hid handed on
(`unstick`); a segment truncated under the reader is read again (`truncated`);
unreadable bytes are counted and named as the cause of a later gap
(`garbage_reporter`). Records never read at all are `gaps.py`'s.

Depends on: `state`, `peerfiles`, `records`, `logs`. No part of the backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ...logs import logger, rate_limited
from ...records import HEADER_SIZE, Record
from ..base import LossCause
from .peerfiles import holds_lock
from .state import Counters, Loss, Writers, WriterState

__all__ = ["drop_tail", "garbage_reporter", "truncated", "unstick"]


def garbage_reporter(peer: str, writers: Writers, counters: Counters) -> Callable[[int, str], None]:
    """What a `FrameReader` of `peer`'s bytes calls when it skips garbage: count
    it, name it as the cause of the next gap of that writer, warn (rate-limited).

    Example:
        >>> counters = Counters()
        >>> garbage_reporter("snapshot", {}, counters)(12, "bad checksum")
        >>> counters.garbage_bytes
        12
    """

    def report(skipped: int, why: str) -> None:
        counters.garbage_bytes += skipped
        w = writers.get(peer)
        if w is not None:
            w.cause = Loss(
                LossCause.CORRUPTION, f"{why}: {skipped} unreadable bytes in its segment"
            )
        rate_limited(
            logging.WARNING,
            ("garbage", peer),
            "skipped %d unreadable bytes (%s) in segments of peer %s",
            skipped,
            why,
            peer,
        )

    return report


def drop_tail(
    w: WriterState, why: str, counters: Counters, take: Callable[[WriterState, list[Record]], None]
) -> None:
    """The end of a segment is final: hand on (`take`) the records still held,
    drop the incomplete frame at the end (a torn write: never acknowledged, and
    its sequence numbers are used again by the writer's next records).

    Whole frames inside a torn BATCH must not be salvaged here: the batch is
    all or nothing. Records hidden behind a forged length are recovered
    earlier, while the writer is live (`unstick`)."""
    while w.reader.backlog:
        take(w, w.reader.feed())
    dropped = w.reader.discard_pending()
    if dropped:
        counters.torn_tails += 1
        rate_limited(
            logging.WARNING,
            ("torn", w.peer),
            "skipped a torn record of %d bytes at the end of segment %s-%08d (%s)",
            dropped,
            w.peer,
            w.segment,
            why,
        )


def truncated(w: WriterState) -> None:
    """A segment shrank under this reader (someone truncated it): read it again
    from the start; what was delivered is skipped by sequence number."""
    logger.warning("segment %s-%08d was truncated: reading it again", w.peer, w.segment)
    w.cause = Loss(LossCause.TRUNCATION, "its segment was cut short before this process read it")
    w.reader.discard_pending()
    w.offset = 0
    w.stuck_at = -1


def unstick(w: WriterState, peers_fd: int) -> list[Record]:
    """The records to hand on when an incomplete frame of a live writer stays
    incomplete from one safety re-scan to the next, with bytes behind its
    header: it has a corrupted or forged length (a real write lands whole
    within microseconds), so it is given up, instead of losing what it hid at
    rotation. [] otherwise (and the frame is remembered for the next look).

    (A writer whose disk filled mid-batch, and that could not even start a new
    segment, leaves a torn batch that looks the same: its whole inner records
    are then delivered although the caller got the error.)"""
    reader = w.reader
    if reader.pending <= HEADER_SIZE or reader.backlog or w.dead:
        w.stuck_at = -1
        return []
    at = w.offset - reader.pending
    if at != w.stuck_at:
        w.stuck_at = at
        return []
    if not holds_lock(peers_fd, w.peer):
        return []  # a dead writer's torn tail: dropped by `drop_tail` once it is collected
    w.stuck_at = -1
    return reader.salvage()
