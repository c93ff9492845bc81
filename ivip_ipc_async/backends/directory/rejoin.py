"""Rejoin: the namespace's directories removed or moved under this process.

A logout may clear `$XDG_RUNTIME_DIR` (the default root), a cleaner may `rm -rf`
the namespace or its peers/, someone may rename it. This process's fds still
refer to the old directories, so without a look it would go on writing where
no joiner looks, and take the peers whose lock files vanished for dead.

`Rejoin.check` looks (one `stat` per directory, each maintenance round, and at
once when the watcher sees one of them removed or renamed): when the directory
at the path is not the one the fds refer to, it re-creates the layout with the
usual checks (`secure_directory`: 0700, owned by this user, never through a
symlink), announces this peer again (lock file, doorbell), starts a new
segment there, lets go of `snapshot.lock`, watches the new directories and
rescans. Until that succeeds, `problem` says what is wrong (`health()`).

What this process wrote in the old directory after it was removed or moved,
before it noticed, reached only the peers that had that segment open: their
number (at most: those written since the layout was last seen in place) is
reported here (a warning, `records_stranded`), and readers that miss some
report a gap whose cause is named from the lock file's note.

`Rejoin` holds no part: it reads `Dirs` and `OwnLog`, and does each step of a
rejoin through `RejoinSteps`, the callbacks `backend.py` gives it.

Depends on: `state`, `layout`, `logs`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ...logs import logger, rate_limited
from .layout import Dirs
from .state import Config, Counters, Life, OwnLog

_SETTLE_ROUNDS = 9  # maintenance rounds (three liveness checks) for the others to rejoin
# Seconds between seeing a directory removed and re-creating it: an `rm -rf`
# of the namespace is then over (peers/ re-created in the middle of it would
# make it fail with "Directory not empty").
_AFTER_EVENT = 0.1


@dataclass(frozen=True, slots=True)
class RejoinSteps:
    """What a rejoin looks at and does, each step a part's (wired by `backend.py`).

    Example:
        >>> steps = RejoinSteps(*[print] * 10)
    """

    snapshot_busy: Callable[[], bool]  # a snapshot is being written (maybe in the old root)
    announced: Callable[[], bool]  # this peer's lock file is at its name in peers/
    doorbell_bound: Callable[[], bool]  # this peer's doorbell is at its name in peers/
    segment_linked: Callable[[], bool]  # the segment being written is at its name in log/
    root_replaced: Callable[[], object]  # the namespace directory is a new one
    note_displaced: Callable[[int], object]  # lock file: segments up to n were displaced
    start_again: Callable[[bool], object]  # go on in a new segment (log/ is new: True)
    announce_again: Callable[[], object]  # a new lock file and doorbell in peers/
    settle: Callable[[float], object]  # judge no peer dead before this monotonic time
    rewatch: Callable[[], object]  # ring, watch and read the directories at the path


class Rejoin:
    """Notices the namespace's directories removed or moved, and rejoins at the path.

    Example:
        >>> import tempfile
        >>> config, counters = Config.of(tempfile.mkdtemp() + "/ns"), Counters()
        >>> steps = RejoinSteps(*[print] * 10)
        >>> Rejoin(config, Dirs(config.path), counters, Life(counters), OwnLog(), steps).problem
        ''
    """

    def __init__(
        self,
        config: Config,
        dirs: Dirs,
        counters: Counters,
        life: Life,
        own: OwnLog,
        steps: RejoinSteps,
    ) -> None:
        self._config = config
        self._dirs = dirs
        self._counters = counters
        self._life = life
        self._own = own
        self._steps = steps
        self.problem = ""  # what is broken and not repaired yet ("" when all is well)
        self._seq_seen_home = 0  # own sequence number when the layout was last found in place
        self._soon: asyncio.TimerHandle | None = None
        self._unfinished = ""  # why a rejoin began that failed part-way: done again

    def soon(self) -> None:
        """The watcher saw a directory of the namespace removed or renamed: look
        shortly (once the removal is over)."""
        loop = self._life.loop
        if self._soon is not None:
            self._soon.cancel()
        if loop is not None and not self._life.closing:
            self._soon = loop.call_later(_AFTER_EVENT, self.check, False)

    def close(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None

    def check(self, wait: bool = True) -> bool:
        """Look, and rejoin if something moved; True when all is in place now.
        `wait`: something seen moved for the first time is re-created at a look
        `_AFTER_EVENT` seconds later (`soon`), not at once."""
        dirs, steps, path = self._dirs, self._steps, self._config.path
        if self._life.closing or "root" not in dirs.fds:
            return True
        if dirs.retired and not steps.snapshot_busy():
            dirs.close_retired()  # no snapshot write is using an old root any more
        what = dirs.displaced() or self._unfinished
        if not what:
            if not steps.announced():
                what = f"this peer's lock file in {path / 'peers'} was removed"
            elif not steps.doorbell_bound():
                what = f"this peer's doorbell in {path / 'peers'} was removed"
            elif not steps.segment_linked():
                what = f"this peer's segment in {path / 'log'} was removed"
        if not what:
            self._seq_seen_home = self._own.seq
            if self.problem:
                logger.warning("%s is in place again", path)
            self.problem = ""
            return True
        if wait and not self.problem:
            self.soon()
            return False
        try:
            self._rejoin(what)
        except OSError as exc:  # UnsafeDirectoryError included: a symlink, another user's
            self.problem = f"{what}, and it cannot be re-created: {exc}"
            rate_limited(logging.ERROR, ("rejoin", path), "%s", self.problem)
            return False
        self.problem = ""
        return True

    def _rejoin(self, what: str) -> None:
        steps, own, path = self._steps, self._own, self._config.path
        if not self.problem:
            logger.warning("%s: re-creating it and joining again", what)
        replaced = self._dirs.reopen()
        if not self._unfinished:
            self._counters.layout_repairs += 1
        # The fds are swapped: from here on the layout looks in place, so a step
        # failing below (OSError) leaves this said until a rejoin completes.
        self._unfinished = what
        if "root" in replaced:
            steps.root_replaced()  # snapshot.lock let go, later lock attempts in the new locks/
        if "log" in replaced or not steps.segment_linked():
            # Records written since the layout was last seen in place went where
            # joiners do not look: only peers holding that segment open read them.
            # Both recorded before the new segment is opened: if that fails, the
            # fds are swapped already, and the next look finds the layout in place.
            stranded = own.seq - self._seq_seen_home
            self._seq_seen_home = own.seq
            steps.note_displaced(own.head.number)
            if stranded:
                self._counters.records_stranded += stranded
                logger.warning(
                    "up to %d records this process wrote since it last found %s in place "
                    "may be lost to peers that could not see them (those reading that "
                    "segment got them; others report a gap)",
                    stranded,
                    path,
                )
            steps.start_again("log" in replaced)  # on failure, writes retry too
        if "peers" in replaced or not steps.announced() or not steps.doorbell_bound():
            steps.announce_again()
        self._seq_seen_home = own.seq
        # The others are rejoining too: none is taken for dead meanwhile.
        steps.settle(time.monotonic() + _SETTLE_ROUNDS * self._config.rescan_interval)
        steps.rewatch()
        self._unfinished = ""
        logger.warning("peer %s joined %s again", self._config.peer, path)
