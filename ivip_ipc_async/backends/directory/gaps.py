"""How a gap is reported: records of another writer that this process never read.

The reader sees a gap as a jump in a writer's sequence numbers and hands it
here (`Gaps.report`): its cause is named (`cause`: a `LossCause` and words: the
writer's segments written in a namespace directory that was removed or moved,
or deleted under the size cap, as its lock file notes; corruption or
truncation, as the reader saw; else the retention window), counted in `gaps`,
`records_lost` and `records_lost_<cause>`, warned about (rate-limited) and
told to the sink (`RecordSink.gap`: the `ivip:gap` event). Then the cache
state is rebuilt in the background (`_resync_state`): the snapshot, then every
writer's retained log up to where this process has read it.

Depends on: `state`, `layout`, `pacing`, `peerfiles`, `joining` (the snapshot's
reader), `records`, `logs`. No part of the backend.
"""

from __future__ import annotations

import logging
import os
from typing import Final

from ...logs import rate_limited
from ...records import FrameReader, Kind
from ..base import LossCause, RecordSink
from .joining import load_snapshot
from .layout import READ_CHUNK, SEGMENT_RE, Dirs, open_regular
from .pacing import breathe, sliced
from .peerfiles import CAPPED, DISPLACED, read_note
from .state import Config, Counters, Life, Loss, Writers, WriterState

__all__ = ["RESYNC_TASK", "Gaps"]

RESYNC_TASK: Final = "ivip-ipc_resync_state"  # `Gaps._resync_state`, as `Life.spawn` names it


class Gaps:
    """Reports gaps in other writers' records and resynchronises the cache.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> config, counters = Config.of(tempfile.mkdtemp() + "/ns"), Counters()
        >>> gaps = Gaps(config, Dirs(config.path), counters, Life(counters), {})
        >>> gaps.cause("00000000000000aa", 3).cause
        <LossCause.RETENTION: 'retention'>
    """

    def __init__(
        self, config: Config, dirs: Dirs, counters: Counters, life: Life, writers: Writers
    ) -> None:
        self._config = config
        self._dirs = dirs
        self._counters = counters
        self._life = life
        self._writers = writers

    def report(self, w: WriterState, lost: int) -> None:
        """`lost` records of `w` were never read: count, warn, resync the cache."""
        counters = self._counters
        counters.gaps += 1
        cause = w.cause or self.cause(w.peer, w.segment - 1)
        w.cause = None
        counters.lost(cause.cause, lost)
        rate_limited(
            logging.WARNING,
            ("gap", w.peer),
            "gap in the records of peer %s: %d records were lost to this process: %s",
            w.peer,
            lost,
            cause,
        )
        sink = self._life.sink
        if w.live and sink is not None:
            sink.gap(w.peer, lost)
            self._life.spawn(self._resync_state)

    def cause(self, peer: str, segment: int) -> Loss:
        """Why a segment of `peer` is gone: written in a namespace directory that
        was removed or moved, or deleted under the size cap (its writer says
        either in its lock file); else the retention window."""
        peers_fd = self._dirs.fds.get("peers")
        if segment <= read_note(peers_fd, peer, DISPLACED):
            return Loss(
                LossCause.DISPLACED,
                "its writer wrote them in the namespace directory after it "
                "was removed or moved, where this process could not read them",
            )
        if segment <= read_note(peers_fd, peer, CAPPED):
            return Loss(
                LossCause.CAP,
                "its writer deleted them to keep the namespace under max_footprint "
                "before this process read them",
            )
        return Loss(
            LossCause.RETENTION,
            "they were deleted before this process read them: it fell more "
            "than the retention window behind",
        )

    async def _resync_state(self) -> None:
        """Rebuild the cache state after a gap: the snapshot, then the retained log
        of every writer up to where this process has read it."""
        sink, fds = self._life.sink, self._dirs.fds
        if sink is None or "root" not in fds:
            return
        await load_snapshot(self._config, fds["root"], self._counters, self._writers, sink)
        if self._life.sink is None or fds.get("log") is None:
            return
        for w in list(self._writers.values()):
            for name in sorted(self._dirs.segments_of(w.peer)):
                m = SEGMENT_RE.match(name)
                if m is None or int(m.group(2)) > w.segment:
                    continue
                stop = w.offset if int(m.group(2)) == w.segment else None
                await self._replay_segment(name, stop, sink)

    async def _replay_segment(self, name: str, stop: int | None, sink: RecordSink) -> None:
        """Feed the cache records of one segment (up to `stop`) to `sink.restore`."""
        try:
            fd = open_regular(name, os.O_RDONLY, self._dirs.fds["log"])
        except OSError:
            return  # deleted meanwhile: the snapshot covers it
        try:
            reader = FrameReader(self._config.max_record_size)
            offset = 0
            while stop is None or offset < stop:
                size = READ_CHUNK if stop is None else min(READ_CHUNK, stop - offset)
                data = os.pread(fd, size, offset)
                if not data:
                    break
                offset += len(data)
                async for records in sliced(reader, data):
                    sink.restore([r for r in records if r.kind is not Kind.MESSAGE])
                await breathe()
        finally:
            os.close(fd)
