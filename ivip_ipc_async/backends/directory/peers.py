"""Peers: this one's lock file, the others' liveness, and collecting the dead.

A peer is alive while it holds `flock` on `peers/<peer>.lock` (the kernel lets go
when it dies, however it dies). `Peers` announces this process, tells whether
another one lives, and, every third maintenance round, collects the files of
the dead once the retention window has passed, and forgets writers that left
nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from typing import TYPE_CHECKING

from ...logs import logger
from .layout import (
    LOCK_RE,
    SEGMENT_RE,
    Namespace,
    exists,
    json_object,
    open_regular,
    same_file,
    unlink,
)

if TYPE_CHECKING:
    from .reader import LogReader
    from .segments import OwnSegments
    from .wakeups import Wakeups


class Peers:
    """This peer's lock file, and the liveness and collection of the others.

    Example:
        >>> import tempfile
        >>> Peers(Namespace(tempfile.mkdtemp() + "/ns")).lock_fd is None
        True
    """

    def __init__(self, ns: Namespace) -> None:
        self._ns = ns
        self.lock_fd: int | None = None  # peers/<peer>.lock, flock held for life
        # What the lock file says (read by the others): who, and the causes of
        # records they may miss (see `note`).
        self._note: dict[str, int | float] = {}
        self.settle_until = 0.0  # monotonic: no peer is judged dead before this

    def connect(self, reader: LogReader, segments: OwnSegments, wakeups: Wakeups) -> None:
        self._reader = reader
        self._segments = segments
        self._wakeups = wakeups

    def announce(self) -> None:
        """Create peers/<peer>.lock, locked before it becomes visible."""
        ns = self._ns
        peers = ns.fds["peers"]
        tmp = f".{ns.peer}.lock.tmp"
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
            self._note = {"pid": os.getpid(), "started": time.time(), "node": ns.node} | {
                k: v for k, v in self._note.items() if k.endswith("_through")
            }
            os.write(fd, json.dumps(self._note).encode())
            os.rename(tmp, f"{ns.peer}.lock", src_dir_fd=peers, dst_dir_fd=peers)
        except BaseException:
            os.close(fd)
            unlink(tmp, peers)
            raise
        self.lock_fd = fd
        if ns.use_doorbell:
            self._wakeups.bind_doorbell()

    def note_capped(self, segment: int) -> None:
        """Say in this peer's lock file that its segments up to `segment` were
        deleted under the size cap (readers name that cause in a gap report)."""
        self.note("capped_through", segment)

    def note(self, key: str, segment: int) -> None:
        """Say in this peer's lock file that its segments up to `segment` may be
        missing for `key`'s cause: "capped_through" (deleted under the size cap),
        "displaced_through" (written in a namespace directory removed or moved)."""
        self._note[key] = segment
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.pwrite(self.lock_fd, json.dumps(self._note).encode().ljust(192), 0)

    def capped_through(self, peer: str) -> int:
        """The last segment `peer` deleted under the size cap (0: none)."""
        return self.noted(peer, "capped_through")

    def noted(self, peer: str, key: str) -> int:
        """The segment number `peer` noted for `key` in its lock file (0: none)."""
        peers_fd = self._ns.fds.get("peers")
        if peers_fd is None:
            return 0
        try:
            fd = open_regular(f"{peer}.lock", os.O_RDONLY, peers_fd)
        except OSError:
            return 0
        try:
            value = json_object(os.pread(fd, 4096, 0)).get(key)
        except OSError:
            return 0
        finally:
            os.close(fd)
        return value if type(value) is int and value > 0 else 0  # untrusted: a count

    def announced(self) -> bool:
        """Whether this peer's lock file is still at its name in peers/ (someone
        may have deleted it, or all of peers/: the others would take this peer
        for dead)."""
        peers_fd = self._ns.fds.get("peers")
        if self.lock_fd is None or peers_fd is None:
            return True
        return same_file(f"{self._ns.peer}.lock", peers_fd, self.lock_fd)

    def announce_again(self) -> None:
        """Announce this peer anew in peers/ (its lock file and doorbell were
        removed, or all of peers/); the old lock is let go once the new one
        is in place."""
        old, self.lock_fd = self.lock_fd, None
        self._wakeups.close_doorbell()
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

    def holds_lock(self, peer: str) -> bool:
        """Whether `peer` is alive: its lock file is there and locked."""
        try:
            fd = open_regular(f"{peer}.lock", os.O_RDONLY, self._ns.fds["peers"])
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def check(self) -> None:
        """Find dead peers by their released flock; collect them after retention."""
        ns = self._ns
        peers_fd = ns.fds["peers"]
        now = time.time()
        try:
            names = os.listdir(peers_fd)
        except OSError:
            return
        self._segments.set_peer_count(max(1, sum(1 for name in names if LOCK_RE.match(name))))
        alive = {ns.peer}
        own = f"{ns.peer}.lock"
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
        for peer, w in self._reader.writers.items():
            if w.dead and peer in alive:
                # Taken for dead while its lock file was missing (peers/ removed
                # under it): it has announced itself again.
                w.dead = False
                self._reader.dirty.add(peer)
                self._reader.schedule_read()
        if time.monotonic() < self.settle_until:
            return  # peers/ was re-created here: the others may not be back yet
        # Segments whose writer has no lock file at all are orphans.
        for peer in list(self._reader.writers):
            if peer not in alive:
                self._reader.mark_dead(peer)
        try:
            segments = os.listdir(ns.fds["log"])  # once for both: an idle round is cheap
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
        writers = self._reader.writers
        for peer in [p for p, w in writers.items() if w.dead and p not in present]:
            self._reader.forget(peer)

    def _collect(self, peer: str, now: float) -> None:
        ns = self._ns
        self._reader.mark_dead(peer)
        unlink(f"{peer}.sock", ns.fds["peers"])
        if ns.segments_of(peer, newer_than=now - ns.retention):
            return  # readers may still need them
        for name in ns.segments_of(peer):
            if unlink(name, ns.fds["log"]):
                ns.counters["segments_deleted"] += 1
        if unlink(f"{peer}.lock", ns.fds["peers"]):
            ns.counters["peers_collected"] += 1
            logger.info("collected the files of dead peer %s", peer)
        self._reader.forget(peer)

    def _collect_orphans(self, names: list[str], alive: set[str], now: float) -> set[str]:
        """Delete the segments, among `names` (log/), of writers that have no lock
        file and wrote nothing within retention; returns the names deleted."""
        ns = self._ns
        deleted: set[str] = set()
        for name in names:
            m = SEGMENT_RE.match(name)
            if m is None or m.group(1) in alive:
                continue
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=ns.fds["log"], follow_symlinks=False)
                lock_exists = exists(f"{m.group(1)}.lock", ns.fds["peers"])
                stale = not lock_exists and now - st.st_mtime > ns.retention
                if stale and unlink(name, ns.fds["log"]):
                    ns.counters["segments_deleted"] += 1
                    deleted.add(name)
        return deleted

    def close(self) -> None:
        """Let go of the lock file: this peer is now "dead" to the others."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing releases the flock
        self.lock_fd = None


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
