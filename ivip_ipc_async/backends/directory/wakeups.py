"""Wake-ups: doorbells rung after each write, and the directory watcher.

A wake-up only says "look": the reader finds what is new from its offsets, so a
lost wake-up costs latency, never a record. Doorbells (one unix datagram socket
per peer, `peers/<peer>.sock`) are the fast path; the watcher notices peers
joining and leaving (and watches `log/` when there is no doorbell); the safety
re-scan of the maintenance round catches the rest.

The watcher is, on Linux, an inotify descriptor read by the event loop itself
(`loop.add_reader`): no thread and no periodic wake-up, so an idle process pays
nothing for it. Where inotify cannot be had (another system, no libc, the
per-user inotify limits reached), or with `IVIP_IPC_WATCHER=watchfiles`, it is a
`watchfiles.watch` thread polling every `watch_step` ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

# Imported with the package, not in the watcher thread: importing it there
# holds the GIL for ~20 ms, a stall of the event loop at every start.
import watchfiles

from ... import fault_points
from ...logs import logger, rate_limited
from .inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    LIBC,
    open_inotify,
    read_events,
)
from .layout import LOCK_RE, SEGMENT_RE, FileId, Namespace, file_id, same_file

if TYPE_CHECKING:
    from .reader import LogReader
    from .segments import OwnSegments

_SOCKET_PATH_MAX: Final = 107
_RING_AT_LEAST_EVERY: Final = 0.0005  # seconds: a busy writer still rings this often
_monotonic = time.monotonic
_RETRY_FIRST: Final = 0.001  # seconds before ringing again a peer whose queue was full
_RETRY_MAX: Final = 0.1

WATCHER_ENV: Final = "IVIP_IPC_WATCHER"  # "watchfiles": the thread even where inotify works
_WATCHERS: Final = ("", "auto", "inotify", "watchfiles")

# A peer joins (its lock renamed into place, its socket bound), leaves (both
# unlinked) or dies (the kernel closes its lock file, opened for writing); a
# segment is created. Appends (IN_MODIFY) only when log/ has no doorbells.
_IN_PEERS: Final = IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM | IN_CLOSE_WRITE | IN_ONLYDIR
_IN_LOG: Final = _IN_PEERS | IN_MODIFY
_IN_APPEARED: Final = IN_CREATE | IN_MOVED_TO | IN_MODIFY | IN_CLOSE_WRITE
# The namespace directory, peers/ or log/ itself renamed (see rejoin.py); removed:
# the kernel says so only once no process holds it open, so what says it is the
# removal of this peer's own files from peers/, and of log/ or peers/ from the
# namespace (`_IN_ROOT`), before the directory itself goes.
_IN_SELF: Final = IN_DELETE_SELF | IN_MOVE_SELF
_IN_ROOT: Final = _IN_SELF | IN_DELETE | IN_ONLYDIR
_GONE: Final = IN_DELETE | IN_MOVED_FROM


class Wakeups:
    """This peer's doorbell, the ringers of the others', and the watcher thread.

    Example:
        >>> import tempfile
        >>> Wakeups(Namespace(tempfile.mkdtemp() + "/ns")).peers_wanted
        False
    """

    def __init__(self, ns: Namespace) -> None:
        self._ns = ns
        self.bell: socket.socket | None = None
        self._bell_id: FileId = (0, 0)  # file_id of peers/<peer>.sock once bound
        self.on_displaced: Callable[[], object] | None = None  # see rejoin.py
        self._ringers: dict[str, socket.socket] = {}
        self._peers_mtime = 0  # st_mtime_ns of peers/ when the ringers were last refreshed
        self.peers_wanted = False  # peers/ changed: refresh the ringers at the next read
        self._unrung = False  # written since the peers were last rung
        self._last_ring = 0.0
        self._ring_segment = -1  # the segment `_ring_msg` names
        self._ring_msg = b""
        self._owed: set[str] = set()  # peers whose doorbell queue was full
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = _RETRY_FIRST
        self.watcher: str | None = None  # "inotify" or "watchfiles", once started
        self._inotify: int | None = None  # the inotify fd, read by `_inotify_loop`
        self._inotify_loop: asyncio.AbstractEventLoop | None = None
        self._own_prefix = f"{ns.peer}-"
        # Deleted by another process (this one deletes them only when closing, or
        # announcing again): this peer was removed from peers/.
        self._own_files = (f"{ns.peer}.lock", f"{ns.peer}.sock", "log", "peers")
        self.watch_thread: threading.Thread | None = None
        self._watch_stop = threading.Event()
        self._watch_done: asyncio.Future[None] | None = None
        self._watch_error: BaseException | None = None
        self._watch_backoff = 0.0
        self._watch_retry_at = 0.0

    def connect(self, reader: LogReader, segments: OwnSegments) -> None:
        self._reader = reader
        self._segments = segments

    @property
    def peers(self) -> list[str]:
        """The peers this one rings."""
        return sorted(self._ringers)

    # -- doorbells ---------------------------------------------------------------------

    def bind_doorbell(self) -> None:
        ns = self._ns
        path = str(ns.path / "peers" / f"{ns.peer}.sock")
        if len(path.encode()) > _SOCKET_PATH_MAX:
            logger.warning(
                "shared directory path is too long for a unix socket (%d bytes > %d): "
                "no doorbell, wake-ups come from watchfiles (slower)",
                len(path.encode()),
                _SOCKET_PATH_MAX,
            )
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(path)
            os.chmod(f"{ns.peer}.sock", 0o600, dir_fd=ns.fds["peers"])
            self._bell_id = file_id(
                os.stat(f"{ns.peer}.sock", dir_fd=ns.fds["peers"], follow_symlinks=False)
            )
        except BaseException:
            sock.close()
            raise
        self.bell = sock
        assert ns.loop is not None
        ns.loop.add_reader(sock.fileno(), self._on_doorbell)

    def doorbell_bound(self) -> bool:
        """Whether this peer's doorbell is still at its name in peers/ (False:
        someone deleted the socket file, and no peer can ring it)."""
        peers_fd = self._ns.fds.get("peers")
        if self.bell is None or peers_fd is None:
            return True
        # The socket's own fd is of sockfs: the file's identity was kept at bind.
        return same_file(f"{self._ns.peer}.sock", peers_fd, self._bell_id)

    def close_doorbell(self) -> None:
        """Stop listening on the doorbell, close it, delete its socket file."""
        ns = self._ns
        if self.bell is None:
            return
        loop = ns.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(self.bell.fileno())
        self.bell.close()
        self.bell = None
        if "peers" in ns.fds:
            with contextlib.suppress(OSError):
                os.unlink(f"{ns.peer}.sock", dir_fd=ns.fds["peers"])

    def forget_peers(self) -> None:
        """Drop every ringer (the peers' doorbells moved): found again by
        `refresh_peers`."""
        for sock in self._ringers.values():
            sock.close()
        self._ringers.clear()
        self._peers_mtime = 0

    def refresh_peers_if_wanted(self) -> None:
        if self.peers_wanted:
            self.refresh_peers()

    def refresh_peers(self, ring_new: bool = False) -> list[str]:
        """Re-read peers/: connect a ringer to each new doorbell, drop the gone.
        Returns the peers new to this one."""
        self.peers_wanted = False
        ns = self._ns
        new: list[str] = []
        if ns.closing or not ns.use_doorbell:
            return new
        peers_fd = ns.fds["peers"]
        try:
            names = os.listdir(peers_fd)
        except OSError:
            return new
        self._segments.set_peer_count(max(1, sum(1 for name in names if LOCK_RE.match(name))))
        present = set()
        for name in names:
            if not name.endswith(".sock") or name == f"{ns.peer}.sock":
                continue
            peer = name[:-5]
            present.add(peer)
            if peer in self._ringers:
                continue
            sock = _connect_doorbell(name, peers_fd)
            if sock is None:
                continue
            self._ringers[peer] = sock
            new.append(peer)
            if ring_new:
                self._ring_one(peer, sock, b"P")
        for peer in set(self._ringers) - present:
            self._ringers.pop(peer).close()
        return new

    def written(self) -> None:
        """Records were written: ring at once if the last ring is older than
        `_RING_AT_LEAST_EVERY`, else at the end of the loop iteration
        (`ring_if_unrung`). Called after every write, so no keyword and no
        attribute lookup for the clock."""
        self._unrung = True
        if _monotonic() - self._last_ring > _RING_AT_LEAST_EVERY:
            self.ring()

    def ring_if_unrung(self) -> None:
        if self._unrung:
            self.ring()

    def ring(self) -> None:
        self._unrung = False
        self._last_ring = time.monotonic()
        number = self._segments.segments[-1].number
        msg = self._ring_msg
        if number != self._ring_segment:
            self._ring_segment = number
            msg = self._ring_msg = b"S" + self._ns.peer.encode() + b"%08d" % number
        # The known peers first (the wake-up is on the latency path), then a
        # look for new ones, which are rung at once.
        for peer, sock in list(self._ringers.items()):
            self._ring_one(peer, sock, msg)
        for peer in self._notice_new_peers():
            new = self._ringers.get(peer)
            if new is not None:
                self._ring_one(peer, new, msg)

    def _notice_new_peers(self) -> list[str]:
        """Refresh the ringers if peers/ changed: a peer that has just started must
        get the doorbell for the very next write, not after the next re-scan.
        Returns the peers found new."""
        peers_fd = self._ns.fds.get("peers")
        if peers_fd is None or not self._ns.use_doorbell:
            return []
        mtime = os.fstat(peers_fd).st_mtime_ns
        # Directory timestamps are coarse (a clock tick): while the last change is
        # recent, a second change may not have moved the timestamp, so look again.
        if mtime != self._peers_mtime or time.time_ns() - mtime < 50_000_000:
            self._peers_mtime = mtime
            return self.refresh_peers()
        return []

    def _ring_one(self, peer: str, sock: socket.socket, msg: bytes) -> None:
        try:
            sock.send(msg)
            self._ns.counters["doorbells_sent"] += 1
        except BlockingIOError:
            # Its queue is full: it has wake-ups pending already, but they may
            # name an older segment than this one (a reader that reaches the end
            # of what it believes is the newest segment stops there). Ring it
            # again shortly, until it takes the news.
            self._owed.add(peer)
            self._retry_later()
        except OSError:
            # ECONNREFUSED: the peer died (collected by the liveness check), or
            # bound a new doorbell (peers/ re-created): look at peers/ again.
            self._ringers.pop(peer, None)
            sock.close()
            self.peers_wanted = True

    def _retry_later(self) -> None:
        loop = self._ns.loop
        if self._retry is None and loop is not None and not self._ns.closing:
            self._retry = loop.call_later(self._retry_delay, self._ring_owed)

    def _ring_owed(self) -> None:
        """Ring again the peers whose queue was full (every 1 ms, backing off to
        100 ms while a peer takes nothing: a stopped process costs little)."""
        self._retry = None
        owed, self._owed = self._owed, set()
        if self._ns.closing or not owed:
            return
        msg = b"S" + self._ns.peer.encode() + b"%08d" % self._segments.segments[-1].number
        for peer in owed:
            sock = self._ringers.get(peer)
            if sock is not None:
                self._ring_one(peer, sock, msg)
        if self._owed:
            self._retry_delay = min(_RETRY_MAX, self._retry_delay * 2)
        else:
            self._retry_delay = _RETRY_FIRST

    def _on_doorbell(self) -> None:
        bell = self.bell
        if bell is None:
            return
        if fault_points.ACTIVE:
            fault_points.stall("doorbell")
        while True:
            try:
                msg = bell.recv(64)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            self._ns.counters["doorbells_received"] += 1
            # Anyone of this user can send here: a datagram that is not exactly
            # "S<peer><8 digits>" (checked by `news`) or "P" says nothing.
            if msg[:1] == b"S" and len(msg) == 25:
                peer = msg[1:17].decode("ascii", "replace")
                self._reader.news(peer, msg[17:25])
            elif msg[:1] == b"P":
                self.peers_wanted = True
                self._reader.full_scan_wanted = True
        self._reader.read_now()

    # -- the watcher --------------------------------------------------------------------

    @property
    def watcher_alive(self) -> bool:
        """Whether the watcher is watching (False before start and after a failure)."""
        if self.watcher == "inotify":
            return self._inotify is not None
        thread = self.watch_thread
        return thread is not None and thread.is_alive()

    def start_watcher(self) -> None:
        """Watch with inotify on the event loop; with the watchfiles thread where
        inotify cannot be had, or when `IVIP_IPC_WATCHER=watchfiles` asks for it."""
        choice = os.environ.get(WATCHER_ENV, "").strip().lower()
        if choice not in _WATCHERS:
            rate_limited(
                logging.WARNING,
                WATCHER_ENV,
                "%s=%r is not a watcher (inotify, watchfiles): using the default",
                WATCHER_ENV,
                choice,
            )
        if choice != "watchfiles" and LIBC is not None and sys.platform == "linux":
            try:
                self._start_inotify()
                return
            except (OSError, NotImplementedError) as exc:
                # Out of inotify instances (max_user_instances) or watches
                # (max_user_watches): watchfiles will likely fail the same way,
                # but it is tried, and restarted, all the same. Or a loop
                # without `add_reader` (NotImplementedError): the thread works.
                logger.warning("cannot watch with inotify (%s): using the watchfiles thread", exc)
        self._start_watchfiles()

    def _paths(self) -> list[tuple[str, int]]:
        """The directories to watch, with their inotify masks: peers/, and log/ when
        there is no doorbell. With doorbells, log/ is not watched: every append to a
        watched segment would cost each watching process an inotify event
        (measured: a 1 us write became 9 us with two watchers)."""
        paths = [("peers", _IN_PEERS)]
        if self.bell is None:
            paths.append(("log", _IN_LOG))
        return paths

    def _start_inotify(self) -> None:
        ns = self._ns
        loop = asyncio.get_running_loop()
        # Each directory of the namespace is watched for its own removal or
        # renaming too (rejoin.py); the namespace itself for nothing else.
        masks = dict(self._paths())
        masks.setdefault("log", IN_ONLYDIR)
        wanted: list[tuple[int, str | None, int]] = [
            (ns.fds[name], str(ns.path / name), mask | _IN_SELF) for name, mask in masks.items()
        ]
        wanted.append((ns.fds["root"], str(ns.path), _IN_ROOT))
        fd = open_inotify(wanted)
        try:
            loop.add_reader(fd, self._on_inotify)
        except BaseException:
            os.close(fd)
            raise
        self._inotify, self._inotify_loop = fd, loop
        self.watcher = "inotify"
        self._watch_error = None

    def _on_inotify(self) -> None:
        fd = self._inotify
        if fd is None:
            return
        try:
            events = read_events(fd)
        except OSError as exc:
            # Never seen: the kernel's queue cannot fail. Stop, and let the
            # supervisor start a new watcher with backoff (re-scans deliver).
            self._stop_inotify()
            self._watch_failed(exc)
            return
        reader = self._reader
        own = self._own_prefix
        count = 0
        lost = False
        displaced = False
        for _wd, mask, name in events:
            if mask & _IN_SELF or (mask & _GONE and name in self._own_files):
                displaced = True
                continue
            if mask & (IN_Q_OVERFLOW | IN_IGNORED):
                # Events were dropped, or a watched directory is gone: look at
                # everything. IN_IGNORED: the watch is dead, start a new one.
                reader.full_scan_wanted = True
                self.peers_wanted = True
                lost = lost or bool(mask & IN_IGNORED)
                continue
            if name.startswith(own) or not name.endswith((".seg", ".sock", ".lock")):
                continue
            count += 1
            if not name.endswith(".seg"):
                self.peers_wanted = True
                continue
            m = SEGMENT_RE.match(name)
            if m is not None and mask & _IN_APPEARED:
                # What a doorbell would say: read this writer (a writer not known
                # yet asks for a full scan).
                reader.news(m.group(1), m.group(2).encode())
            else:
                reader.full_scan_wanted = True
        self._ns.counters["watch_events"] += count
        if displaced and self.on_displaced is not None:
            self.on_displaced()
        if lost:
            self._stop_inotify()
            if not displaced:  # else the rejoin starts a new watcher, or says what is wrong
                self._watch_failed(OSError("a watched directory was removed or unmounted"))
        if count or reader.full_scan_wanted or self.peers_wanted:
            reader.schedule_read()

    def _stop_inotify(self) -> None:
        """Stop reading the inotify fd and close it (safe when the loop is closed)."""
        fd, self._inotify = self._inotify, None
        loop, self._inotify_loop = self._inotify_loop, None
        if fd is None:
            return
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _start_watchfiles(self) -> None:
        ns = self._ns
        loop = asyncio.get_running_loop()
        self.watcher = "watchfiles"
        self._watch_done = loop.create_future()
        self._watch_stop.clear()
        paths = [str(ns.path / name) for name, _mask in self._paths()]
        own = self._own_prefix

        def keep(_change: Any, path: str) -> bool:
            name = os.path.basename(path)
            return not name.startswith(own) and name.endswith((".seg", ".sock", ".lock"))

        def run() -> None:
            try:
                for changes in watchfiles.watch(
                    *paths,
                    watch_filter=keep,
                    step=ns.watch_step,
                    debounce=ns.watch_step * 4,
                    stop_event=self._watch_stop,
                    rust_timeout=0,
                    raise_interrupt=False,
                    recursive=False,
                    ignore_permission_denied=True,
                ):
                    _call_soon(loop, self._on_watch, changes)
            except Exception as exc:
                _call_soon(loop, self._watch_failed, exc)
            finally:
                _call_soon(loop, _resolve, self._watch_done)

        self.watch_thread = threading.Thread(target=run, name="ivip-ipc-watch", daemon=True)
        self.watch_thread.start()

    def _watch_failed(self, exc: BaseException) -> None:
        if not self._ns.closing:
            self._watch_error = exc
            logger.warning(
                "the %s watcher stopped (%s): falling back to doorbells plus a re-scan "
                "every %.1fs until it can be restarted",
                self.watcher,
                exc,
                self._ns.rescan_interval,
            )

    def restart_watcher(self) -> None:
        """Watch the directories now at the namespace's path (rejoin.py): an
        inotify watcher is replaced at once; the watchfiles thread is told to
        stop, and its supervisor starts a new one at the next round."""
        if self._ns.closing or self.watcher is None:
            return
        self._watch_backoff = 0.0
        self._watch_retry_at = 0.0
        if self.watcher == "inotify" or self._inotify is not None:
            self._stop_inotify()
            self.start_watcher()
        else:
            self._watch_error = OSError("the namespace directory was re-created")
            self._watch_stop.set()

    def supervise_watcher(self) -> None:
        """Restart a watcher that stopped, with a growing pause between tries (a
        new inotify watcher first, the watchfiles thread if that cannot be had)."""
        if self._ns.closing or self.watcher is None or self.watcher_alive:
            return
        now = time.monotonic()
        if now < self._watch_retry_at:
            return
        self._watch_backoff = min(60.0, max(1.0, self._watch_backoff * 2))
        self._watch_retry_at = now + self._watch_backoff
        self._ns.counters["watcher_restarts"] += 1
        logger.warning("restarting the watcher (it stopped: %s)", self._watch_error)
        self.start_watcher()

    def _on_watch(self, changes: set[tuple[Any, str]]) -> None:
        self._ns.counters["watch_events"] += len(changes)
        for _change, path in changes:
            if path.endswith(".seg"):
                self._reader.full_scan_wanted = True
            else:
                self.peers_wanted = True
        self._reader.schedule_read()

    # -- the end -----------------------------------------------------------------------

    def stop_watcher(self) -> None:
        """Stop watching: at once with inotify; the watchfiles thread is told to
        stop, and does within one `watch_step`."""
        self._stop_inotify()
        self._watch_stop.set()

    async def wait_watcher(self) -> None:
        """Wait for the watchfiles thread, if any, to end."""
        if self._watch_done is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._watch_done)
        if self.watch_thread is not None:
            self.watch_thread.join(1.0)  # it has said it is done: this is its last breath

    def close(self) -> None:
        """Close the doorbell (and delete its socket file), every ringer, and the
        inotify fd."""
        self._stop_inotify()
        self.close_doorbell()
        self.forget_peers()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def drop_inherited(self) -> None:
        """In a forked child: close the parent's sockets and inotify fd, unlink
        nothing, and leave the event loop alone: its epoll instance is the
        parent's too, and removing a reader from it would remove the parent's."""
        inotify, self._inotify, self._inotify_loop = self._inotify, None, None
        if inotify is not None:
            with contextlib.suppress(OSError):
                os.close(inotify)
        socks = [self.bell, *self._ringers.values()]
        self.bell = None
        self._ringers.clear()
        self._retry = None  # of the parent's loop
        self._owed.clear()
        for sock in socks:
            if sock is not None:
                sock.close()


def _connect_doorbell(name: str, peers_fd: int) -> socket.socket | None:
    """Connect to a peer's doorbell if `name` is a unix socket of this user.

    The socket is opened with `O_PATH | O_NOFOLLOW` and connected through
    `/proc/self/fd`, so a symlink planted under the name is never followed and
    nothing can be swapped in between the check and the connect.
    """
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=peers_fd)
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            rate_limited(
                logging.WARNING,
                ("doorbell", name),
                "not ringing %s: it is not a socket of this user",
                name,
            )
            sock.close()
            return None
        sock.setblocking(False)
        sock.connect(f"/proc/self/fd/{fd}")
    except OSError:
        sock.close()
        return None
    finally:
        os.close(fd)
    return sock


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
        loop.call_soon_threadsafe(fn, *args)


def _resolve(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)
