"""The doorbell: a datagram rung to every peer after a write, and this peer's own.

Each peer binds a unix datagram socket, `peers/<peer>.sock` (docs/format.md
says what a datagram holds). After a write the writer's doorbell rings every
other peer's (at once, or at the end of the loop iteration when it rang less
than `_RING_AT_LEAST_EVERY` ago); a peer whose queue is full is rung again,
backing off. A ring only says "look": the reader finds what is new from its
offsets, so a lost ring costs latency, never a record.

What a received datagram says is handed on through callbacks `backend.py`
injects (the reader's): `on_news(peer, segment)`, `on_look()` (look at every
writer), then `on_read()`. Whenever it lists peers/ it tells `on_listed`
(liveness counts the peers there).

Depends on: `state` (`OwnLog`: which segment to name), `layout`, `logs`,
`fault_points`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Final

from ... import fault_points
from ...logs import logger, rate_limited
from .layout import Dirs, FileId, file_id, same_file
from .state import Config, Counters, Life, OwnLog

__all__ = ["Doorbell"]

_SOCKET_PATH_MAX: Final = 107
_RING_AT_LEAST_EVERY: Final = 0.0005  # seconds: a busy writer still rings this often
_monotonic = time.monotonic
_RETRY_FIRST: Final = 0.001  # seconds before ringing again a peer whose queue was full
_RETRY_MAX: Final = 0.1


class Doorbell:
    """This peer's doorbell, and the ringers of the others'.

    Example:
        >>> import tempfile
        >>> config, counters = Config.of(tempfile.mkdtemp() + "/ns"), Counters()
        >>> doorbell = Doorbell(
        ...     config, Dirs(config.path), counters, Life(counters), OwnLog(),
        ...     on_news=print, on_look=print, on_read=print, on_listed=print,
        ... )
        >>> doorbell.peers, doorbell.bell is None
        ([], True)
    """

    def __init__(
        self,
        config: Config,
        dirs: Dirs,
        counters: Counters,
        life: Life,
        own: OwnLog,
        *,
        on_news: Callable[[str, bytes], object],
        on_look: Callable[[], object],
        on_read: Callable[[], object],
        on_listed: Callable[[list[str]], object],
    ) -> None:
        self._config = config
        self._dirs = dirs
        self._counters = counters
        self._life = life
        self._own = own  # the segment a ring names: the one being written
        self._on_news = on_news  # peer says it wrote to segment (8 ASCII digits)
        self._on_look = on_look  # look at every writer: one may be new
        self._on_read = on_read  # read now what the news says
        self._on_listed = on_listed  # the names in peers/, whenever they are listed
        self.bell: socket.socket | None = None
        self._bell_id: FileId = (0, 0)  # file_id of peers/<peer>.sock once bound
        self._ringers: dict[str, socket.socket] = {}
        self._peers_mtime = 0  # st_mtime_ns of peers/ when the ringers were last refreshed
        self.peers_wanted = False  # peers/ changed: refresh the ringers soon
        self._refresh_scheduled = False
        self._unrung = False  # written since the peers were last rung
        self._last_ring = 0.0
        self._ring_segment = -1  # the segment `_ring_msg` names
        self._ring_msg = b""
        self._owed: set[str] = set()  # peers whose doorbell queue was full
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = _RETRY_FIRST

    @property
    def peers(self) -> list[str]:
        """The peers this one rings."""
        return sorted(self._ringers)

    # -- doorbells ---------------------------------------------------------------------

    def bind(self) -> None:
        """Bind this peer's doorbell, peers/<peer>.sock (unless doorbells are off)."""
        config, fds = self._config, self._dirs.fds
        if not config.use_doorbell:
            return
        path = str(config.path / "peers" / f"{config.peer}.sock")
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
            os.chmod(f"{config.peer}.sock", 0o600, dir_fd=fds["peers"])
            self._bell_id = file_id(
                os.stat(f"{config.peer}.sock", dir_fd=fds["peers"], follow_symlinks=False)
            )
        except BaseException:
            sock.close()
            raise
        self.bell = sock
        assert self._life.loop is not None
        self._life.loop.add_reader(sock.fileno(), self._on_doorbell)

    def bound(self) -> bool:
        """Whether this peer's doorbell is still at its name in peers/ (False:
        someone deleted the socket file, and no peer can ring it)."""
        peers_fd = self._dirs.fds.get("peers")
        if self.bell is None or peers_fd is None:
            return True
        # The socket's own fd is of sockfs: the file's identity was kept at bind.
        return same_file(f"{self._config.peer}.sock", peers_fd, self._bell_id)

    def unbind(self) -> None:
        """Stop listening on the doorbell, close it, delete its socket file."""
        if self.bell is None:
            return
        loop = self._life.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(self.bell.fileno())
        self.bell.close()
        self.bell = None
        fds = self._dirs.fds
        if "peers" in fds:
            with contextlib.suppress(OSError):
                os.unlink(f"{self._config.peer}.sock", dir_fd=fds["peers"])

    def forget_peers(self) -> None:
        """Drop every ringer (the peers' doorbells moved): found again by
        `refresh_peers`."""
        for sock in self._ringers.values():
            sock.close()
        self._ringers.clear()
        self._peers_mtime = 0

    def peers_changed(self) -> None:
        """peers/ changed (a peer joined or left): refresh the ringers soon."""
        self.peers_wanted = True
        life = self._life
        if not self._refresh_scheduled and life.loop is not None and not life.closing:
            self._refresh_scheduled = True
            life.loop.call_soon(self._refresh_if_wanted)

    def _refresh_if_wanted(self) -> None:
        self._refresh_scheduled = False
        if self.peers_wanted:
            self.refresh_peers()

    def refresh_peers(self, ring_new: bool = False) -> list[str]:
        """Re-read peers/: connect a ringer to each new doorbell, drop the gone.
        Returns the peers new to this one."""
        self.peers_wanted = False
        new: list[str] = []
        if self._life.closing or not self._config.use_doorbell:
            return new
        peers_fd = self._dirs.fds["peers"]
        try:
            names = os.listdir(peers_fd)
        except OSError:
            return new
        self._on_listed(names)
        own = f"{self._config.peer}.sock"
        present = set()
        for name in names:
            if not name.endswith(".sock") or name == own:
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
        """Ring if written since the last ring (the end of a loop iteration)."""
        if self._unrung:
            self.ring()

    def ring(self) -> None:
        """Ring every peer's doorbell: "S<peer><segment>"."""
        self._unrung = False
        self._last_ring = time.monotonic()
        number = self._own.segments[-1].number
        msg = self._ring_msg
        if number != self._ring_segment:
            self._ring_segment = number
            msg = self._ring_msg = b"S" + self._config.peer.encode() + b"%08d" % number
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
        peers_fd = self._dirs.fds.get("peers")
        if peers_fd is None or not self._config.use_doorbell:
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
            self._counters.doorbells_sent += 1
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
            self.peers_changed()

    def _retry_later(self) -> None:
        loop = self._life.loop
        if self._retry is None and loop is not None and not self._life.closing:
            self._retry = loop.call_later(self._retry_delay, self._ring_owed)

    def _ring_owed(self) -> None:
        """Ring again the peers whose queue was full (every 1 ms, backing off to
        100 ms while a peer takes nothing: a stopped process costs little)."""
        self._retry = None
        owed, self._owed = self._owed, set()
        if self._life.closing or not owed:
            return
        msg = b"S" + self._config.peer.encode() + b"%08d" % self._own.segments[-1].number
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
            self._counters.doorbells_received += 1
            # Anyone of this user can send here: a datagram that is not exactly
            # "S<peer><8 digits>" (checked by `on_news`) or "P" says nothing.
            if msg[:1] == b"S" and len(msg) == 25:
                self._on_news(msg[1:17].decode("ascii", "replace"), msg[17:25])
            elif msg[:1] == b"P":
                self.peers_changed()
                self._on_look()
        self._on_read()

    # -- the end -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the doorbell (and delete its socket file) and every ringer."""
        self.unbind()
        self.forget_peers()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def drop_inherited(self) -> None:
        """In a forked child: close the parent's sockets, unlink nothing, and
        leave the event loop alone: its epoll instance is the parent's too, and
        removing a reader from it would remove the parent's."""
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
