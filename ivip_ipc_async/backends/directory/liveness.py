"""Liveness: this peer's lock file, the others' liveness, collecting the dead.

A peer is alive while it holds `flock` on `peers/<peer>.lock` (the kernel lets go
when it dies, however it dies). `Liveness` announces this process, writes the
notes its readers read in its lock file (`note`), and, every third
maintenance round (`check`), finds the dead, collects their files once the
retention window has passed, and forgets writers that left nothing behind.

It is the only place the peer count is set (`count_peers`, whenever peers/ is
listed, here or by the doorbell): the cap (`cap.Budget`) splits
`max_footprint` by it. What it finds is told through callbacks `backend.py`
injects: `on_dead`, `on_back`, `on_gone` (the reader's writer table), and
`on_announce` / `on_withdraw` (this peer's doorbell, bound beside its lock).

Depends on: `state` (the writer table, read), `cap` (the budget), `layout`,
`peerfiles`, `logs`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable

from ...logs import logger
from .cap import Budget
from .layout import LOCK_RE, SEGMENT_RE, Dirs, exists, open_regular, same_file, unlink
from .peerfiles import CAPPED
from .state import Config, Counters, Writers


class Liveness:
    """This peer's lock file, and the liveness and collection of the others.

    Example:
        >>> import tempfile
        >>> config = Config.of(tempfile.mkdtemp() + "/ns")
        >>> budget = Budget(config)
        >>> liveness = Liveness(
        ...     config, Dirs(config.path), Counters(), {}, budget,
        ...     on_dead=print, on_back=print, on_gone=print, on_announce=print, on_withdraw=print,
        ... )
        >>> liveness.count_peers(["00000000000000aa.lock", "00000000000000bb.lock", "x.sock"])
        >>> budget.peers, liveness.lock_fd
        (2, None)
    """

    def __init__(
        self,
        config: Config,
        dirs: Dirs,
        counters: Counters,
        writers: Writers,
        budget: Budget,
        *,
        on_dead: Callable[[str], object],
        on_back: Callable[[str], object],
        on_gone: Callable[[str], object],
        on_announce: Callable[[], object],
        on_withdraw: Callable[[], object],
    ) -> None:
        self._config = config
        self._dirs = dirs
        self._counters = counters
        self._writers = writers  # read only: which writers are known, and dead
        self._budget = budget
        self._on_dead = on_dead  # a writer's lock is let go: read it to its end
        self._on_back = on_back  # a writer taken for dead holds its lock again
        self._on_gone = on_gone  # nothing more can come from a writer
        self._on_announce = on_announce  # this peer's lock file is in place
        self._on_withdraw = on_withdraw  # this peer's lock file is about to be replaced
        self.lock_fd: int | None = None  # peers/<peer>.lock, flock held for life
        # What the lock file says (read by the others): who, and the causes of
        # records they may miss (see `note`).
        self._note: dict[str, int | float] = {}
        self.settle_until = 0.0  # monotonic: no peer is judged dead before this

    def count_peers(self, names: Iterable[str]) -> None:
        """peers/ holds `names`: every lock file, dead or alive, shares the cap."""
        self._budget.set_peers(max(1, sum(1 for name in names if LOCK_RE.match(name))))

    def announce(self) -> None:
        """Create peers/<peer>.lock, locked before it becomes visible."""
        config = self._config
        peers = self._dirs.fds["peers"]
        tmp = f".{config.peer}.lock.tmp"
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=peers,
        )
        try:
            # Nobody else can hold it (peers never lock a young .tmp), but a
            # start() must not fail if one does for a moment: wait a little.
            for _ in range(100):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.001)
            else:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._note = {"pid": os.getpid(), "started": time.time(), "node": config.node} | {
                k: v for k, v in self._note.items() if k.endswith("_through")
            }
            os.write(fd, json.dumps(self._note).encode())
            os.rename(tmp, f"{config.peer}.lock", src_dir_fd=peers, dst_dir_fd=peers)
        except BaseException:
            os.close(fd)
            unlink(tmp, peers)
            raise
        self.lock_fd = fd
        self._on_announce()

    def note_capped(self, segment: int) -> None:
        """Say in this peer's lock file that its segments up to `segment` were
        deleted under the size cap (readers name that cause in a gap report)."""
        self.note(CAPPED, segment)

    def note(self, key: str, segment: int) -> None:
        """Say in this peer's lock file that its segments up to `segment` may be
        missing for `key`'s cause: "capped_through" (deleted under the size cap),
        "displaced_through" (written in a namespace directory removed or moved)."""
        self._note[key] = segment
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.pwrite(self.lock_fd, json.dumps(self._note).encode().ljust(192), 0)

    def announced(self) -> bool:
        """Whether this peer's lock file is still at its name in peers/ (someone
        may have deleted it, or all of peers/: the others would take this peer
        for dead)."""
        peers_fd = self._dirs.fds.get("peers")
        if self.lock_fd is None or peers_fd is None:
            return True
        return same_file(f"{self._config.peer}.lock", peers_fd, self.lock_fd)

    def announce_again(self) -> None:
        """Announce this peer anew in peers/ (its lock file and doorbell were
        removed, or all of peers/); the old lock is let go once the new one
        is in place."""
        old, self.lock_fd = self.lock_fd, None
        self._on_withdraw()
        try:
            self.announce()
        except BaseException:
            self._back_to(old)
            raise
        if old is not None:
            os.close(old)

    def _back_to(self, old: int | None) -> None:
        """`announce_again` failed: close the new lock file if it is in place (the
        doorbell failed), keep the old one."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
        self.lock_fd = old

    def check(self) -> None:
        """Find dead peers by their released flock; collect them after retention."""
        dirs, peer = self._dirs, self._config.peer
        peers_fd = dirs.fds["peers"]
        now = time.time()
        try:
            names = os.listdir(peers_fd)
        except OSError:
            return
        self.count_peers(names)
        alive = {peer}
        own = f"{peer}.lock"
        for name in names:
            m = LOCK_RE.match(name)
            if m is None:
                if name.startswith(".") and name.endswith(".lock.tmp"):
                    _collect_announce_leftover(name, peers_fd, now)
                continue
            if name == own:
                continue  # held by this process (and a try would only say so)
            try:
                fd = open_regular(name, os.O_RDONLY, peers_fd)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    alive.add(m.group(1))
                    continue
                if time.monotonic() < self.settle_until:
                    continue  # see below
                # We hold its lock: that peer is gone.
                self._collect(m.group(1), now)
            finally:
                os.close(fd)
        for writer, w in list(self._writers.items()):
            if w.dead and writer in alive:
                # Taken for dead while its lock file was missing (peers/ removed
                # under it): it has announced itself again.
                self._on_back(writer)
        if time.monotonic() < self.settle_until:
            return  # peers/ was re-created here: the others may not be back yet
        # Segments whose writer has no lock file at all are orphans.
        for writer in list(self._writers):
            if writer not in alive:
                self._on_dead(writer)
        try:
            segments = os.listdir(dirs.fds["log"])  # once for both: an idle round is cheap
        except OSError:
            return
        deleted = self._collect_orphans(segments, alive, now)
        self._forget_gone_writers([name for name in segments if name not in deleted])

    def _forget_gone_writers(self, names: list[str]) -> None:
        """Drop dead writers whose segments are all deleted, read or not: nothing
        of theirs can come any more (1,000 short-lived peers leave no trace in a
        long-lived one, nor in the snapshot header it writes). `names`: what log/
        holds now."""
        present = {m.group(1) for m in map(SEGMENT_RE.match, names) if m is not None}
        writers = self._writers
        for peer in [p for p, w in writers.items() if w.dead and p not in present]:
            self._on_gone(peer)

    def _collect(self, peer: str, now: float) -> None:
        dirs = self._dirs
        self._on_dead(peer)
        unlink(f"{peer}.sock", dirs.fds["peers"])
        if dirs.segments_of(peer, newer_than=now - self._config.retention):
            return  # readers may still need them
        for name in dirs.segments_of(peer):
            if unlink(name, dirs.fds["log"]):
                self._counters.segments_deleted += 1
        if unlink(f"{peer}.lock", dirs.fds["peers"]):
            self._counters.peers_collected += 1
            logger.info("collected the files of dead peer %s", peer)
        self._on_gone(peer)

    def _collect_orphans(self, names: list[str], alive: set[str], now: float) -> set[str]:
        """Delete the segments, among `names` (log/), of writers that have no lock
        file and wrote nothing within retention; returns the names deleted."""
        fds = self._dirs.fds
        deleted: set[str] = set()
        for name in names:
            m = SEGMENT_RE.match(name)
            if m is None or m.group(1) in alive:
                continue
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=fds["log"], follow_symlinks=False)
                lock_exists = exists(f"{m.group(1)}.lock", fds["peers"])
                stale = not lock_exists and now - st.st_mtime > self._config.retention
                if stale and unlink(name, fds["log"]):
                    self._counters.segments_deleted += 1
                    deleted.add(name)
        return deleted

    def close(self) -> None:
        """Let go of the lock file: this peer is now "dead" to the others."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing releases the flock
        self.lock_fd = None

    def drop_inherited(self) -> None:
        """In a forked child: close the parent's lock file (closing a copy keeps
        the parent's flock; nothing is unlinked)."""
        fd, self.lock_fd = self.lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _collect_announce_leftover(name: str, peers_fd: int, now: float) -> None:
    """Delete `.<peer>.lock.tmp` left by a peer killed while announcing itself.

    Only an old one is even opened: a young one belongs to a peer starting
    right now, and taking its flock, even for a moment, would make that
    peer's `start()` fail.
    """
    try:
        st = os.stat(name, dir_fd=peers_fd, follow_symlinks=False)
    except OSError:
        return
    if now - st.st_mtime < 60:
        return
    try:
        fd = open_regular(name, os.O_RDONLY, peers_fd)
    except OSError:
        unlink(name, peers_fd)  # planted junk: not ours to keep
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    finally:
        os.close(fd)
    unlink(name, peers_fd)
