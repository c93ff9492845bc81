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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...logs import logger, rate_limited
from .layout import Namespace

if TYPE_CHECKING:
    from .peers import Peers
    from .reader import LogReader
    from .segments import OwnSegments
    from .snapshots import Snapshots
    from .wakeups import Wakeups

_SETTLE_ROUNDS = 9  # maintenance rounds (three liveness checks) for the others to rejoin
# Seconds between seeing a directory removed and re-creating it: an `rm -rf`
# of the namespace is then over (peers/ re-created in the middle of it would
# make it fail with "Directory not empty").
_AFTER_EVENT = 0.1


class Rejoin:
    """Notices the namespace's directories removed or moved, and rejoins at the path.

    Example:
        >>> import tempfile
        >>> Rejoin(Namespace(tempfile.mkdtemp() + "/ns")).problem
        ''
    """

    def __init__(self, ns: Namespace) -> None:
        self._ns = ns
        self.problem = ""  # what is broken and not repaired yet ("" when all is well)
        self._seq_seen_home = 0  # own sequence number when the layout was last found in place
        self._soon: asyncio.TimerHandle | None = None
        self.on_moved: Callable[[], object] | None = None  # the namespace was re-created
        self._unfinished = ""  # why a rejoin began that failed part-way: done again

    def connect(
        self,
        peers: Peers,
        segments: OwnSegments,
        wakeups: Wakeups,
        reader: LogReader,
        snapshots: Snapshots,
    ) -> None:
        self._peers = peers
        self._segments = segments
        self._wakeups = wakeups
        self._reader = reader
        self._snapshots = snapshots

    def soon(self) -> None:
        """The watcher saw a directory of the namespace removed or renamed: look
        shortly (once the removal is over)."""
        loop = self._ns.loop
        if self._soon is not None:
            self._soon.cancel()
        if loop is not None and not self._ns.closing:
            self._soon = loop.call_later(_AFTER_EVENT, self.check, False)

    def close(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None

    def check(self, wait: bool = True) -> bool:
        """Look, and rejoin if something moved; True when all is in place now.
        `wait`: something seen moved for the first time is re-created at a look
        `_AFTER_EVENT` seconds later (`soon`), not at once."""
        ns = self._ns
        if ns.closing or "root" not in ns.fds:
            return True
        snapshot = self._snapshots.task
        if ns.retired and (snapshot is None or snapshot.done()):
            ns.close_retired()  # no snapshot write is using an old root any more
        what = ns.displaced() or self._unfinished
        if not what:
            if not self._peers.announced():
                what = f"this peer's lock file in {ns.path / 'peers'} was removed"
            elif not self._wakeups.doorbell_bound():
                what = f"this peer's doorbell in {ns.path / 'peers'} was removed"
            elif not self._segments.linked():
                what = f"this peer's segment in {ns.path / 'log'} was removed"
        if not what:
            self._seq_seen_home = self._segments.seq
            if self.problem:
                logger.warning("%s is in place again", ns.path)
            self.problem = ""
            return True
        if wait and not self.problem:
            self.soon()
            return False
        try:
            self._rejoin(what)
        except OSError as exc:  # UnsafeDirectoryError included: a symlink, another user's
            self.problem = f"{what}, and it cannot be re-created: {exc}"
            rate_limited(logging.ERROR, ("rejoin", ns.path), "%s", self.problem)
            return False
        self.problem = ""
        return True

    def _rejoin(self, what: str) -> None:
        ns = self._ns
        if not self.problem:
            logger.warning("%s: re-creating it and joining again", what)
        replaced = ns.reopen_directories()
        if not self._unfinished:
            ns.counters["layout_repairs"] += 1
        # The fds are swapped: from here on the layout looks in place, so a step
        # failing below (OSError) leaves this said until a rejoin completes.
        self._unfinished = what
        if "root" in replaced:
            self._snapshots.moved()
            if self.on_moved is not None:
                self.on_moved()  # the locks: later attempts in the new locks/
        if "log" in replaced or not self._segments.linked():
            # Records written since the layout was last seen in place went where
            # joiners do not look: only peers holding that segment open read them.
            # Both recorded before the new segment is opened: if that fails, the
            # fds are swapped already, and the next look finds the layout in place.
            stranded = self._segments.seq - self._seq_seen_home
            self._seq_seen_home = self._segments.seq
            self._peers.note("displaced_through", self._segments.segments[-1].number)
            if stranded:
                ns.counters["records_stranded"] += stranded
                logger.warning(
                    "up to %d records this process wrote since it last found %s in place "
                    "may be lost to peers that could not see them (those reading that "
                    "segment got them; others report a gap)",
                    stranded,
                    ns.path,
                )
            self._segments.start_again("log" in replaced)  # on failure, writes retry too
        if "peers" in replaced or not self._peers.announced() or not self._wakeups.doorbell_bound():
            self._peers.announce_again()
        self._seq_seen_home = self._segments.seq
        # The others are rejoining too: none is taken for dead meanwhile.
        self._peers.settle_until = time.monotonic() + _SETTLE_ROUNDS * ns.rescan_interval
        self._wakeups.forget_peers()
        self._wakeups.restart_watcher()
        self._wakeups.refresh_peers(ring_new=True)
        self._reader.schedule_read(full=True)
        self._unfinished = ""
        logger.warning("peer %s joined %s again", ns.peer, ns.path)
