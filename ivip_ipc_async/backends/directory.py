"""The shared-directory backend: segments, wake-ups, peers, retention, snapshots.

Layout of one namespace (see docs/design.md for the reasons)::

    <root>/<namespace>/              0700, owned by the user, never a symlink
        log/<peer>-<segment>.seg     append-only records of one writer (0600)
        peers/<peer>.lock            held with flock(LOCK_EX) for the peer's life
        peers/<peer>.sock            the peer's doorbell (unix datagram socket)
        snapshot.lock                flock of the one peer that writes snapshots
        snapshot.bin                 cache state, replaced atomically

Every process writes only its own segments. A write is one `os.write` of a
whole batch (group commit), then a one-byte-ish datagram to every peer's
doorbell. Readers keep an offset per segment and a sequence number per writer;
doorbells, watchfiles events and a periodic re-scan only say "look", so a lost
wake-up costs latency, never a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiofiles

from ..errors import UnsafeDirectoryError
from ..logs import logger, rate_limited
from ..records import HEADER_SIZE, FrameReader, Kind, Record, encode_frame
from .base import RecordSink
from .directory_lock import DirectoryLocks

__all__ = [
    "DirectoryBackend",
    "default_namespace",
    "default_root",
    "secure_directory",
]


_SEGMENT_RE: Final = re.compile(r"^([0-9a-f]{16})-(\d{8})\.seg$")
_LOCK_RE: Final = re.compile(r"^([0-9a-f]{16})\.lock$")
_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SOCKET_PATH_MAX: Final = 107
_SNAPSHOT: Final = "snapshot.bin"
_READ_CHUNK: Final = 256 << 10
_SLICE: Final = 0.003  # seconds of reading and dispatch per loop callback, then yield
_STEP: Final = 256  # records parsed and dispatched between two looks at the clock
_WRITE_THROUGH_PER_TICK: Final = 16
_MAX_OPEN_SEGMENTS: Final = 128  # reader fds kept open; the idlest are closed past this
_RING_AT_LEAST_EVERY: Final = 0.0005  # seconds: a busy writer still rings this often
_MIN_SEGMENT: Final = 64 << 10  # segments shrink to this when many writers share the cap
_ROOM_RETRY: Final = 0.01  # seconds between tries of a write waiting for room under the cap
_ROOM_WAIT: Final = 10.0  # seconds a write waits for a snapshot to make room, then fails


class _NoRoom(Exception):
    """The write would put this writer over its share of `max_footprint`, and its
    oldest segment holds cache writes no snapshot covers yet."""


# -- where the directory is -----------------------------------------------------


def default_root() -> Path:
    """The per-user base directory used when no path is given.

    `$XDG_RUNTIME_DIR/ivip-ipc` when the session has one, else
    `/dev/shm/ivip-ipc-<uid>` (memory-backed), else `<tmp>/ivip-ipc-<uid>`.

    Example:
        >>> default_root().name.startswith("ivip-ipc")
        True
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "ivip-ipc"
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return Path("/dev/shm") / f"ivip-ipc-{os.geteuid()}"
    return Path(tempfile.gettempdir()) / f"ivip-ipc-{os.geteuid()}"


def default_namespace(cwd: str | None = None) -> str:
    """The namespace of an application that names none: one per working directory.

    Example:
        >>> default_namespace("/srv/app") == default_namespace("/srv/app")
        True
        >>> default_namespace("/srv/app") == default_namespace("/srv/other")
        False
    """
    where = os.path.realpath(cwd if cwd is not None else os.getcwd())
    return "app-" + hashlib.sha256(where.encode()).hexdigest()[:16]


def check_namespace(namespace: str) -> str:
    """Refuse namespaces that are not a plain directory name."""
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be str, not {type(namespace).__name__}")
    if not _NAMESPACE_RE.match(namespace):
        raise ValueError(
            f"invalid namespace {namespace!r}: use 1-100 characters from "
            "letters, digits, '.', '_' and '-', not starting with '.' or '-'"
        )
    return namespace


def secure_directory(path: Path | str, *, dir_fd: int | None = None) -> int:
    """Create (0700) or open a directory the current user may trust; returns its fd.

    Refuses, with `UnsafeDirectoryError`, a symlink, a directory owned by another
    user, or one that group or others can write. With `dir_fd`, `path` is a name
    relative to that directory, so no symlink can be swapped in between.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     fd = secure_directory(os.path.join(tmp, "ipc"))
        ...     oct(os.fstat(fd).st_mode & 0o777)
        ...     os.close(fd)
        '0o700'
    """
    path = os.fspath(path)
    if dir_fd is None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700, dir_fd=dir_fd)
    try:
        fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeDirectoryError(
                f"refusing {path!r}: it is a symlink or not a directory"
            ) from None
        raise
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"it is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = f"group or others can write to it (mode {stat.filemode(st.st_mode)})"
    if problem:
        os.close(fd)
        raise UnsafeDirectoryError(f"refusing shared directory {path!r}: {problem}")
    return fd


# -- state kept per peer --------------------------------------------------------


@dataclass(slots=True)
class _Writer:
    """What this process knows of one other writer's segments."""

    peer: str
    segment: int  # the segment being read
    reader: FrameReader
    fd: int | None = None
    offset: int = 0
    last_seq: int = 0  # last record sequence number delivered
    newest_segment: int = 0  # highest segment number seen for this writer
    live: bool = False  # False while restoring state at start
    dead: bool = False
    refused: bool = False  # a segment could not be opened safely (warned once)
    last_read: float = 0.0  # monotonic time of the last bytes read
    cause: str = ""  # why records may be missing next: named in the gap report
    stuck_at: int = -1  # offset of an incomplete frame seen at the last safety re-scan


@dataclass(slots=True)
class _OwnSegment:
    number: int
    size: int = 0
    has_cache: bool = False
    closed_at: float = 0.0
    last_seq: int = 0


@dataclass(slots=True)
class _Pending:
    """Appends waiting for the end-of-iteration group write: (records, waiter)."""

    calls: list[tuple[Sequence[Record], asyncio.Future[None]]] = field(default_factory=list)


class DirectoryBackend:
    """Records through a shared directory on the local machine.

    Args:
        path: The namespace directory (created 0700 when missing).
        max_record_size: Largest record accepted, in bytes (`ValueError` above).
        segment_bytes: A segment is closed and a new one started past this size.
        retention: Seconds a closed segment is kept for slow readers and joiners.
        max_footprint: Bytes the namespace may use on disk, all peers together.
        rescan_interval: Seconds between full re-scans (the safety net).
        snapshot_interval: Seconds between snapshots of a changing cache.
        watch_step: watchfiles' polling step in ms (its idle cost; it is not
            the fast path, doorbells are).
        doorbell: Ring peers' sockets after each write (off: rely on watchfiles).

    Example:
        >>> import tempfile
        >>> backend = DirectoryBackend(tempfile.mkdtemp() + "/ns")
        >>> backend.max_record_size
        16777216
    """

    def __init__(
        self,
        path: Path | str,
        *,
        max_record_size: int = 16 << 20,
        segment_bytes: int = 2 << 20,
        retention: float = 15.0,
        max_footprint: int = 64 << 20,
        rescan_interval: float = 2.0,
        snapshot_interval: float = 1.0,
        watch_step: int = 150,
        doorbell: bool = True,
        node: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_record_size = max_record_size
        self.segment_bytes = segment_bytes
        self.retention = retention
        self.max_footprint = max_footprint
        self.rescan_interval = rescan_interval
        self.snapshot_interval = snapshot_interval
        self.watch_step = watch_step
        self.use_doorbell = doorbell
        self.node = node if node is not None else (secrets.randbits(63) or 1)
        self.peer = f"{self.node:016x}"

        self._sink: RecordSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: dict[str, int] = {}
        self._lock_fd: int | None = None
        self._snapshot_lock_fd: int | None = None
        self._bell: socket.socket | None = None
        self._bell_path: str | None = None
        self._ringers: dict[str, socket.socket] = {}
        self._peers_mtime = 0  # st_mtime_ns of peers/ when the ringers were last refreshed
        self._log_mtime = 0  # st_mtime_ns of log/ at the last full scan
        self._snapshot_mtime = 0  # st_mtime_ns of snapshot.bin when its positions were read
        # own segments
        self._seg_fd: int | None = None
        self._segments: list[_OwnSegment] = []
        self._own_bytes = 0  # bytes in own segments
        self._peer_count = 1  # peers with a lock file, dead or alive: they share the cap
        self._snapshot_bytes = 0
        self._budget = max_footprint  # own share of the cap; see _update_budget
        self._segment_limit = segment_bytes
        self._own_capped_through = 0  # last own segment deleted early, under the cap
        self._room_since = 0.0  # monotonic time writes started waiting for room
        self._seq = 0
        self._pending: _Pending | None = None
        self._must_rotate = False  # a write failed part-way: continue in a new segment
        self._tick_writes = 0  # appends written at once in this loop iteration
        self._tick_scheduled = False
        self._unrung = False  # written since the peers were last rung
        self._last_ring = 0.0
        self._write_error: BaseException | None = None
        # reading
        self._writers: dict[str, _Writer] = {}
        self._dirty: set[str] = set()
        self._read_scheduled = False
        self._full_scan_wanted = False
        self._peers_wanted = False
        # background
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watch_thread: threading.Thread | None = None
        self._watch_stop = threading.Event()
        self._watch_done: asyncio.Future[None] | None = None
        self._watch_error: BaseException | None = None
        self._watch_backoff = 0.0
        self._watch_retry_at = 0.0
        self._closing = False
        self._live = False  # True once the log present at start has been restored
        self._last_snapshot_version = -1
        self._last_snapshot_at = 0.0
        self._snapshot_positions: dict[str, tuple[int, int, int]] = {}
        self._snapshot_written: tuple[int, int, int] | None = None  # (ino, size, mtime)
        self._snapshot_suspect = False  # the snapshot loaded at start was damaged
        self._snapshot_seen: tuple[int, int, int] | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._locks: DirectoryLocks | None = None  # made by locks() on first use
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "records_written",
                "batches_written",
                "bytes_written",
                "records_read",
                "bytes_read",
                "doorbells_sent",
                "doorbells_received",
                "watch_events",
                "rescans",
                "gaps",
                "records_lost",
                "garbage_bytes",
                "torn_tails",
                "peers_collected",
                "segments_deleted",
                "snapshots_written",
                "snapshots_damaged",
                "segments_capped",
                "write_errors",
                "task_failures",
                "watcher_restarts",
            ),
            0,
        )

    # -- life -------------------------------------------------------------------

    async def start(self, sink: RecordSink) -> None:
        """Open the directory, announce this peer, load the present, start watching."""
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        _started.add(self)
        try:
            self._open_directories()
            self._announce()
            self._open_segment(1)
            self._snapshot_suspect = not await self._load_snapshot()
            self._snapshot_seen = self._snapshot_identity()
            self._scan()
            await self._restore_log()
            self._start_watcher()
            self._spawn(self._maintain, restart=True)
            self._refresh_peers(ring_new=True)
        except BaseException:
            self.abandon()
            raise

    async def close(self) -> None:
        """Flush what was accepted, stop every task and thread, release files."""
        if self._closing:
            return
        self._flush()
        if self._unrung:
            self._ring()
        self._closing = True
        self._watch_stop.set()
        snapshot = self._snapshot_task
        if snapshot is not None and not snapshot.done():
            # Let a snapshot being written finish: cancelling aiofiles mid-call
            # can leave its file open in the worker thread.
            await asyncio.wait([snapshot], timeout=5)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._watch_done is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._watch_done)
        if self._watch_thread is not None:
            self._watch_thread.join(1.0)  # it has said it is done: this is its last breath
        self._release()

    def abandon(self) -> None:
        """Release everything without the event loop (it may be closed already)."""
        self._closing = True
        self._watch_stop.set()
        for task in list(self._tasks):
            if not task.get_loop().is_closed():
                task.cancel()
        self._tasks.clear()
        self._release()

    def _drop_inherited(self) -> None:
        """In a forked child: close the parent's descriptors, touch nothing else.

        The child must hold none of the parent's locks (a plain helper forked by
        `multiprocessing` would otherwise keep a killed parent "alive" to its
        peers), and must not unlink the parent's files or settle its futures.
        """
        self._closing = True
        self._tasks.clear()
        self._pending = None
        self._loop = None
        socks = [self._bell, *self._ringers.values()]
        self._bell = None
        self._ringers.clear()
        for sock in socks:
            if sock is not None:
                sock.close()
        fds = [w.fd for w in self._writers.values()]
        fds += [self._seg_fd, self._snapshot_lock_fd, self._lock_fd, *self._fds.values()]
        for w in self._writers.values():
            w.fd = None
        self._seg_fd = self._snapshot_lock_fd = self._lock_fd = None
        self._fds.clear()
        for fd in fds:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _release(self) -> None:
        if self._locks is not None:
            self._locks.abandon()  # closing their files releases the locks held here
        loop = self._loop
        if self._bell is not None:
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(Exception):
                    loop.remove_reader(self._bell.fileno())
            self._bell.close()
            self._bell = None
            if "peers" in self._fds:
                with contextlib.suppress(OSError):
                    os.unlink(f"{self.peer}.sock", dir_fd=self._fds["peers"])
        for sock in self._ringers.values():
            sock.close()
        self._ringers.clear()
        for w in self._writers.values():
            if w.fd is not None:
                os.close(w.fd)
                w.fd = None
        if self._seg_fd is not None:
            os.close(self._seg_fd)
            self._seg_fd = None
        for fd in (self._snapshot_lock_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)  # closing releases the flock: we are now "dead" to peers
        self._snapshot_lock_fd = self._lock_fd = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        pending, self._pending = self._pending, None
        if pending is not None:
            for _, fut in pending.calls:
                if not fut.done() and not fut.get_loop().is_closed():
                    fut.set_exception(ConnectionAbortedError("the IPC instance was closed"))

    def _spawn(
        self, factory: Callable[[], Coroutine[Any, Any, None]], restart: bool = False
    ) -> None:
        """Run a background task; one that dies is logged loudly (and restarted)."""
        name = factory.__name__
        task = asyncio.get_running_loop().create_task(factory(), name=f"ivip-ipc{name}")
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if t.cancelled() or self._closing:
                return
            exc = t.exception()
            if exc is None:
                return
            self.counters["task_failures"] += 1
            again = ", restarting it" if restart else ""
            logger.error("background task %s died%s", name, again, exc_info=exc)
            if restart:
                self._spawn(factory, restart=True)

        task.add_done_callback(done)

    # -- directories and peers ----------------------------------------------------

    def _open_directories(self) -> None:
        # The directory given (or the default root) and the namespace inside it
        # are both checked; the namespace is opened through the root's fd.
        base = secure_directory(self.path.parent)
        try:
            root = secure_directory(self.path.name, dir_fd=base)
        finally:
            os.close(base)
        self._fds["root"] = root
        for name in ("log", "peers"):
            self._fds[name] = secure_directory(name, dir_fd=root)

    def _announce(self) -> None:
        """Create peers/<peer>.lock, locked before it becomes visible."""
        peers = self._fds["peers"]
        tmp = f".{self.peer}.lock.tmp"
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
            info = {"pid": os.getpid(), "started": time.time(), "node": self.node}
            os.write(fd, json.dumps(info).encode())
            os.rename(tmp, f"{self.peer}.lock", src_dir_fd=peers, dst_dir_fd=peers)
        except BaseException:
            os.close(fd)
            _unlink(tmp, peers)
            raise
        self._lock_fd = fd
        if self.use_doorbell:
            self._bind_doorbell()

    def _bind_doorbell(self) -> None:
        path = str(self.path / "peers" / f"{self.peer}.sock")
        if len(path.encode()) > _SOCKET_PATH_MAX:
            logger.warning(
                "shared directory path is too long for a unix socket (%d bytes > %d): "
                "no doorbell, wake-ups come from watchfiles (slower)",
                len(path.encode()),
                _SOCKET_PATH_MAX,
            )
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(path)
        os.chmod(f"{self.peer}.sock", 0o600, dir_fd=self._fds["peers"])
        self._bell = sock
        self._bell_path = path
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._on_doorbell)

    def _refresh_peers(self, ring_new: bool = False) -> None:
        """Re-read peers/: connect a ringer to each new doorbell, drop the gone."""
        self._peers_wanted = False
        if self._closing or not self.use_doorbell:
            return
        peers_fd = self._fds["peers"]
        try:
            names = os.listdir(peers_fd)
        except OSError:
            return
        self._peer_count = max(1, sum(1 for name in names if _LOCK_RE.match(name)))
        self._update_budget()
        present = set()
        for name in names:
            if not name.endswith(".sock") or name == f"{self.peer}.sock":
                continue
            peer = name[:-5]
            present.add(peer)
            if peer in self._ringers:
                continue
            sock = _connect_doorbell(name, peers_fd)
            if sock is None:
                continue
            self._ringers[peer] = sock
            if ring_new:
                self._ring_one(peer, sock, b"P")
        for peer in set(self._ringers) - present:
            self._ringers.pop(peer).close()

    def _ring(self) -> None:
        self._unrung = False
        self._last_ring = time.monotonic()
        self._notice_new_peers()
        if not self._ringers:
            return
        msg = b"S" + self.peer.encode() + b"%08d" % self._segments[-1].number
        for peer, sock in list(self._ringers.items()):
            self._ring_one(peer, sock, msg)

    def _notice_new_peers(self) -> None:
        """Refresh the ringers if peers/ changed: a peer that has just started must
        get the doorbell for the very next write, not after the next re-scan."""
        peers_fd = self._fds.get("peers")
        if peers_fd is None or not self.use_doorbell:
            return
        mtime = os.fstat(peers_fd).st_mtime_ns
        # Directory timestamps are coarse (a clock tick): while the last change is
        # recent, a second change may not have moved the timestamp, so look again.
        if mtime != self._peers_mtime or time.time_ns() - mtime < 50_000_000:
            self._peers_mtime = mtime
            self._refresh_peers()

    def _ring_one(self, peer: str, sock: socket.socket, msg: bytes) -> None:
        try:
            sock.send(msg)
            self.counters["doorbells_sent"] += 1
        except BlockingIOError:
            pass  # its queue is full: it has wake-ups pending already
        except OSError:
            # ECONNREFUSED: the peer died; it is collected by the liveness check.
            self._ringers.pop(peer, None)
            sock.close()

    def _on_doorbell(self) -> None:
        bell = self._bell
        if bell is None:
            return
        while True:
            try:
                msg = bell.recv(64)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            self.counters["doorbells_received"] += 1
            if msg[:1] == b"S" and len(msg) == 25:
                peer = msg[1:17].decode("ascii", "replace")
                w = self._writers.get(peer)
                if w is None:
                    self._full_scan_wanted = True
                else:
                    w.newest_segment = max(w.newest_segment, int(msg[17:25] or b"0"))
                    self._dirty.add(peer)
            elif msg[:1] == b"P":
                self._peers_wanted = True
                self._full_scan_wanted = True
        if not self._read_scheduled:
            self._read_scheduled = True
            self._read_pass()  # read now: a call_soon would cost one more loop turn

    # -- writing ------------------------------------------------------------------

    def _open_segment(self, number: int) -> None:
        name = f"{self.peer}-{number:08d}.seg"
        self._seg_fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=self._fds["log"],
        )
        self._segments.append(_OwnSegment(number))

    async def append(self, records: Sequence[Record]) -> None:
        """Write records; when this returns they are in the segment file.

        The first few appends of a loop iteration are written at once (one
        `os.write` costs about 1 us; a wait for the next iteration costs more);
        past `_WRITE_THROUGH_PER_TICK` in one iteration, appends join one batch
        written at the end of the iteration (group commit), which also lets a
        tight `await notify()` loop yield to the other tasks now and then.
        """
        if self._closing:
            raise ConnectionAbortedError("the IPC instance is closed")
        if self._pending is None and self._tick_writes < _WRITE_THROUGH_PER_TICK:
            self._tick_writes += 1
            if not self._tick_scheduled:
                self._tick_scheduled = True
                asyncio.get_running_loop().call_soon(self._end_tick)
            try:
                self._write(records)
            except _NoRoom:
                pass  # waits below, first in line, for a snapshot to make room
            else:
                self._unrung = True
                if time.monotonic() - self._last_ring > _RING_AT_LEAST_EVERY:
                    self._ring()
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._pending = _Pending([(records, waiter)])
            self._wait_for_room()
            await waiter
            return
        pending = self._pending
        if pending is None:
            pending = self._pending = _Pending()
            if not self._tick_scheduled:
                self._tick_scheduled = True
                asyncio.get_running_loop().call_soon(self._end_tick)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending.calls.append((records, fut))
        await fut

    def _end_tick(self) -> None:
        """End of a loop iteration: write the batch, ring the peers once."""
        self._tick_scheduled = False
        self._tick_writes = 0
        self._flush()
        if self._unrung:
            self._ring()

    def _flush(self) -> None:
        """Write the queued appends: one `os.write` per batch of up to
        `max_record_size` bytes (group commit), each batch all-or-nothing.

        An append whose caller was cancelled while it waited is not written: a
        cancelled `notify` or cache `set` then never happened anywhere, instead of
        reaching the peers while the caller (and its own cache mirror) believe
        it failed.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        calls = [call for call in pending.calls if not call[1].cancelled()]
        # A group write stays within a segment (the cap counts in segments); one
        # append's records are one frame whatever its size.
        room = min(self.max_record_size, self._segment_limit) - HEADER_SIZE
        start = 0
        while start < len(calls):
            # A batch: as many whole appends as fit in one frame.
            stop, size = start, 0
            while stop < len(calls):
                extra = sum(r.size for r in calls[stop][0])
                if stop > start and size + extra > room:
                    break
                size += extra
                stop += 1
            batch = calls[start:stop]
            try:
                self._write([r for records, _ in batch for r in records])
            except _NoRoom:
                # This batch and the later ones wait, in order, ahead of any new
                # append (the fast path is closed while some are pending).
                self._pending = _Pending(calls[start:])
                self._wait_for_room()
                return
            except OSError as exc:
                for _, fut in calls[start:]:  # this batch and every later one
                    if not fut.done():
                        fut.set_exception(exc)
                return
            self._unrung = True
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            start = stop

    def _write(self, records: Sequence[Record]) -> None:
        """Append records as one frame (several are wrapped in a BATCH frame).

        A write either delivers all of its records or none: readers only see
        whole frames. After a failed write, whatever part of it reached the file
        is left as a torn tail and the writer moves on to a new segment (readers
        drop a torn tail once its writer has moved on). Truncating instead would
        race with a reader that has already read the partial bytes.
        """
        if self._seg_fd is None or self._must_rotate:
            if self._closing:
                raise ConnectionAbortedError("the IPC instance is closed")
            self._rotate()
        first_seq = self._seq
        count = len(records)
        if count == 1:
            data = encode_frame(records[0], first_seq + 1)
        else:
            inner = b"".join([encode_frame(r, first_seq + i + 1) for i, r in enumerate(records)])
            data = encode_frame(Record(Kind.BATCH, "", b"", inner), first_seq + 1)
        size = len(data)
        if self._own_bytes + size > self._budget and not self._make_room(size):
            raise _NoRoom
        seg = self._segments[-1]
        fd = self._seg_fd
        assert fd is not None
        written = 0
        try:
            written = _write_to_segment(fd, data)
            while written < size:  # a short write: rare, but allowed
                written += _write_to_segment(fd, data[written:])
        except OSError:
            self.counters["write_errors"] += 1
            # The file says what reached it (more than `written` if the failing
            # call wrote part of its buffer before failing).
            with contextlib.suppress(OSError):
                written = max(written, os.fstat(fd).st_size - seg.size)
            if written:
                seg.size += written
                self._own_bytes += written
                self._must_rotate = True
                with contextlib.suppress(OSError):
                    self._rotate()
            raise
        self._seq = seg.last_seq = first_seq + count
        seg.size += size
        self._own_bytes += size
        self._room_since = 0.0
        if count > 1 or records[0].kind is not Kind.MESSAGE:  # a lone message skips this
            state = [r for r in records if r.kind is not Kind.MESSAGE]
            if state:
                seg.has_cache = True
                if self._sink is not None:
                    self._sink.written(state)  # stored: applies here, as in every peer
        counters = self.counters
        counters["records_written"] += count
        counters["batches_written"] += 1
        counters["bytes_written"] += size
        if seg.size >= self._segment_limit:
            self._rotate()

    # -- the size cap --------------------------------------------------------------

    def _update_budget(self) -> None:
        """This writer's share of `max_footprint`: the cap, less room for the
        snapshot and its next copy, split among every peer with a lock file (the
        dead ones' segments count until they are collected). Segments shrink so
        that a share always holds several of them."""
        room = self.max_footprint - 2 * self._snapshot_bytes
        share = room // max(1, self._peer_count)
        self._segment_limit = min(self.segment_bytes, max(_MIN_SEGMENT, share // 4))
        self._budget = max(2 * self._segment_limit, share)

    def _make_room(self, size: int) -> bool:
        """Delete own oldest segments until `size` more bytes fit in the share;
        False when the oldest holds cache writes no snapshot covers yet."""
        while self._own_bytes + size > self._budget:
            if len(self._segments) == 1:
                if self._segments[0].size == 0:
                    return True  # one record larger than the share: the slack
                self._rotate()
                continue
            seg = self._segments[0]
            if not self._covered(seg):
                return False
            self._delete_own(seg, capped=True)
        return True

    def _covered(self, seg: _OwnSegment) -> bool:
        """Whether a closed own segment may go: no cache writes in it, or the
        snapshot was taken after its last byte was read."""
        if not seg.has_cache:
            return True
        number, offset, _ = self._snapshot_positions.get(self.peer, (0, 0, 0))
        return seg.number < number or (seg.number == number and offset >= seg.size)

    def _delete_own(self, seg: _OwnSegment, capped: bool) -> None:
        _unlink(f"{self.peer}-{seg.number:08d}.seg", self._fds["log"])
        self.counters["segments_deleted"] += 1
        self._own_bytes -= seg.size
        self._segments.remove(seg)
        if capped and seg.number > self._own_capped_through:
            # Readers that lose records to this deletion read the cause here.
            self._own_capped_through = seg.number
            self.counters["segments_capped"] += 1
            if self._lock_fd is not None:
                note = {"pid": os.getpid(), "node": self.node, "capped_through": seg.number}
                with contextlib.suppress(OSError):
                    os.pwrite(self._lock_fd, json.dumps(note).encode().ljust(128), 0)

    def _wait_for_room(self) -> None:
        """Writes are pending for room under the cap: ask for a snapshot, try
        again shortly; after `_ROOM_WAIT` seconds, fail them (never acknowledged,
        so nothing is lost) with ENOSPC."""
        now = time.monotonic()
        if not self._room_since:
            self._room_since = now
            rate_limited(
                logging.WARNING,
                "room",
                "writes wait for a snapshot: this writer's share of max_footprint (%d of "
                "%d bytes) is full of cache writes no snapshot covers yet",
                self._budget,
                self.max_footprint,
            )
        elif now - self._room_since > _ROOM_WAIT:
            self._room_since = 0.0
            pending, self._pending = self._pending, None
            exc = OSError(
                errno.ENOSPC,
                f"the namespace is at its max_footprint ({self.max_footprint} bytes) and no "
                f"snapshot made room within {_ROOM_WAIT:.0f}s: nothing was written",
            )
            for _, fut in pending.calls if pending is not None else ():
                if not fut.done():
                    fut.set_exception(exc)
            return
        self._request_snapshot()
        if not self._tick_scheduled and self._loop is not None:
            self._tick_scheduled = True
            self._loop.call_later(_ROOM_RETRY, self._end_tick)

    def _request_snapshot(self) -> None:
        """Get a snapshot that covers own segments: write one now as the holder,
        else learn the newest one's positions."""
        if self._snapshot_lock_fd is None:
            self._read_snapshot_positions()
            return
        task = self._snapshot_task
        if self._sink is not None and (task is None or task.done()):
            self._last_snapshot_at = time.monotonic()
            version = self._sink.state_version()
            self._snapshot_task = task = asyncio.get_running_loop().create_task(
                self._write_snapshot(version)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _rotate(self) -> None:
        """Close the current segment and start the next (it may fail: disk full)."""
        seg = self._segments[-1]
        if self._seg_fd is not None:
            os.close(self._seg_fd)
            self._seg_fd = None
            seg.closed_at = time.time()
        self._open_segment(seg.number + 1)
        self._must_rotate = False

    # -- reading ------------------------------------------------------------------

    def _schedule_read(self, full: bool = False) -> None:
        if full:
            self._full_scan_wanted = True
        if not self._read_scheduled and not self._closing and self._loop is not None:
            self._read_scheduled = True
            self._loop.call_soon(self._read_pass)

    def _read_pass(self) -> None:
        self._read_scheduled = False
        if self._closing:
            return
        if self._peers_wanted:
            self._refresh_peers()
        if self._full_scan_wanted:
            self._full_scan_wanted = False
            self._scan()
            self._dirty.update(self._writers)
        deadline = time.perf_counter() + _SLICE
        dirty, self._dirty = self._dirty, set()
        for peer in dirty:
            w = self._writers.get(peer)
            if w is None:
                continue
            if time.perf_counter() > deadline or not self._read_writer(w, deadline):
                self._dirty.add(peer)  # the rest in a later callback: the loop breathes
        if self._dirty:
            self._schedule_read()

    def _scan(self) -> None:
        """List log/ and learn every writer's segments (the safety net)."""
        self.counters["rescans"] += 1
        try:
            names = os.listdir(self._fds["log"])
        except OSError as exc:
            logger.error("cannot list %s: %s", self.path / "log", exc)
            return
        lowest: dict[str, int] = {}
        highest: dict[str, int] = {}
        for name in names:
            m = _SEGMENT_RE.match(name)
            if m is None:
                continue
            peer, number = m.group(1), int(m.group(2))
            if peer == self.peer:
                continue
            lowest[peer] = min(number, lowest.get(peer, number))
            highest[peer] = max(number, highest.get(peer, number))
        for peer, top in highest.items():
            w = self._writers.get(peer)
            if w is None:
                # At start, the snapshot already holds this writer's state up to a
                # position; a writer found later is read from its beginning.
                known = self._snapshot_positions.get(peer) if not self._live else None
                start, offset, last_seq = known or (0, 0, 0)
                if start < lowest[peer]:
                    start, offset, last_seq = lowest[peer], 0, 0
                w = self._writers[peer] = _Writer(
                    peer,
                    start,
                    FrameReader(self.max_record_size, self._garbage_reporter(peer)),
                    offset=offset,
                    last_seq=last_seq,
                    live=self._live,
                )
            w.newest_segment = max(w.newest_segment, top)
            self._dirty.add(peer)

    def _garbage_reporter(self, peer: str) -> Callable[[int, str], None]:
        def report(skipped: int, why: str) -> None:
            self.counters["garbage_bytes"] += skipped
            w = self._writers.get(peer)
            if w is not None:
                w.cause = f"corruption ({why}: {skipped} unreadable bytes in its segment)"
            rate_limited(
                logging.WARNING,
                ("garbage", peer),
                "skipped %d unreadable bytes (%s) in segments of peer %s",
                skipped,
                why,
                peer,
            )

        return report

    def _read_writer(self, w: _Writer, deadline: float) -> bool:
        """Read and hand on what is new from one writer, in order, until
        `deadline` (`time.perf_counter()`); True once everything is read."""
        log_fd = self._fds.get("log")
        if log_fd is None:
            return True
        reader = w.reader
        while True:
            if reader.backlog:
                self._take(w, reader.feed(limit=_STEP))
                if time.perf_counter() > deadline:
                    return False
                continue
            if time.perf_counter() > deadline:
                return False
            if w.fd is None:
                self._limit_open_segments()
                try:
                    w.fd = _open_regular(f"{w.peer}-{w.segment:08d}.seg", os.O_RDONLY, log_fd)
                except FileNotFoundError:
                    if w.segment < w.newest_segment:
                        # Deleted before we got to it: the gap shows in seq.
                        w.cause = w.cause or self._deletion_cause(w.peer, w.segment)
                        w.segment += 1
                        w.offset = 0
                        continue
                    return True
                except OSError as exc:
                    # A symlink, FIFO or other planted thing where a segment should
                    # be: never followed nor waited on.
                    if not w.refused:
                        w.refused = True
                        logger.warning("refusing to read %s-%08d.seg: %s", w.peer, w.segment, exc)
                    if w.segment < w.newest_segment:
                        w.cause = "corruption (a segment was replaced by something unsafe)"
                        w.segment += 1
                        w.offset = 0
                        continue
                    return True
            try:
                data = os.pread(w.fd, _READ_CHUNK, w.offset)
            except OSError as exc:
                logger.error("cannot read segment of peer %s: %s", w.peer, exc)
                return True
            if data:
                w.last_read = time.monotonic()
                w.offset += len(data)
                self.counters["bytes_read"] += len(data)
                records = reader.feed(data, _STEP)
                self._take(w, records)
                if len(records) == _STEP:
                    continue  # maybe more held back: given out at the top of the loop
                if len(data) < _READ_CHUNK and w.segment >= w.newest_segment and not w.dead:
                    return True  # a short read is the end for now: skip the empty pread
                continue
            if w.segment < w.newest_segment:
                # The writer made a newer segment after finishing this one: this
                # end is final. What is left unparsed is a torn write.
                self._drop_tail(w, "its writer moved on")
                os.close(w.fd)
                w.fd = None
                w.segment += 1
                w.offset = 0
                continue
            if w.dead:
                # Its writer is gone and everything is read: give the fd back
                # (hundreds of short-lived peers must not exhaust our fds).
                self._drop_tail(w, "its writer died")
                os.close(w.fd)
                w.fd = None
            return True

    def _limit_open_segments(self) -> None:
        """Close the readers idle the longest when too many segments are open."""
        open_readers = [w for w in self._writers.values() if w.fd is not None]
        excess = len(open_readers) - _MAX_OPEN_SEGMENTS
        if excess <= 0:
            return
        open_readers.sort(key=lambda w: w.last_read)
        for w in open_readers[:excess]:
            if w.reader.pending:
                continue  # mid-record: keep reading from this offset on the same fd
            assert w.fd is not None
            os.close(w.fd)
            w.fd = None  # reopened by name, at the same offset, when it has news

    def _drop_tail(self, w: _Writer, why: str) -> None:
        """The end of a segment is final: hand on the records still held, drop the
        incomplete frame at the end (a torn write: never acknowledged, and its
        sequence numbers are used again by the writer's next records).

        Whole frames inside a torn BATCH must not be salvaged here: the batch
        is all or nothing. Records hidden behind a forged length are recovered
        earlier, while the writer is live (`_unstick`)."""
        while w.reader.backlog:
            self._take(w, w.reader.feed())
        dropped = w.reader.discard_pending()
        if dropped:
            self.counters["torn_tails"] += 1
            rate_limited(
                logging.WARNING,
                ("torn", w.peer),
                "skipped a torn record of %d bytes at the end of segment %s-%08d (%s)",
                dropped,
                w.peer,
                w.segment,
                why,
            )

    def _take(self, w: _Writer, records: list[Record]) -> None:
        if not records:
            return
        fresh: list[Record] = []
        for rec in records:
            if rec.seq <= w.last_seq:
                continue  # already delivered (a re-read after a resync)
            if w.last_seq and rec.seq != w.last_seq + 1:
                lost = rec.seq - w.last_seq - 1
                self.counters["gaps"] += 1
                self.counters["records_lost"] += lost
                cause = w.cause or self._deletion_cause(w.peer, w.segment - 1)
                w.cause = ""
                key = cause.split(" ", 1)[0]
                self.counters[f"records_lost_{key}"] = (
                    self.counters.get(f"records_lost_{key}", 0) + lost
                )
                rate_limited(
                    logging.WARNING,
                    ("gap", w.peer),
                    "gap in the records of peer %s: %d records were lost to this process: %s",
                    w.peer,
                    lost,
                    cause,
                )
                if w.live and self._sink is not None:
                    self._sink.gap(w.peer, lost)
                    self._spawn(self._resync_state)
            w.last_seq = rec.seq
            if rec.kind is not Kind.SNAPSHOT_META:
                fresh.append(rec)
        if not fresh or self._sink is None:
            return
        self.counters["records_read"] += len(fresh)
        if w.live:
            self._sink.deliver(fresh)
        else:
            self._sink.restore(fresh)

    def _deletion_cause(self, peer: str, segment: int) -> str:
        """Why a segment of `peer` is gone: the size cap (its writer says so in
        its lock file) or the retention window."""
        if segment <= self._capped_through(peer):
            return (
                "cap (its writer deleted them to keep the namespace under max_footprint "
                "before this process read them)"
            )
        return (
            "retention (they were deleted before this process read them: it fell more "
            "than the retention window behind)"
        )

    def _capped_through(self, peer: str) -> int:
        """The last segment `peer` deleted under the size cap (0: none)."""
        peers_fd = self._fds.get("peers")
        if peers_fd is None:
            return 0
        try:
            fd = _open_regular(f"{peer}.lock", os.O_RDONLY, peers_fd)
        except OSError:
            return 0
        try:
            note = json.loads(os.pread(fd, 4096, 0))
            return int(note.get("capped_through", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return 0
        finally:
            os.close(fd)

    async def _restore_log(self) -> None:
        """At start: read the retained log as state only, then go live."""
        for w in list(self._writers.values()):
            done = False
            while not done:
                done = self._read_writer(w, time.perf_counter() + _SLICE)
                await asyncio.sleep(0)  # a slice at a time: the loop breathes
            w.live = True
        self._live = True
        self._dirty.clear()

    async def _resync_state(self) -> None:
        """Rebuild the cache state after a gap: the snapshot, then the retained log
        of every writer up to where this process has read it."""
        await self._load_snapshot(positions=False)
        sink, log_fd = self._sink, self._fds.get("log")
        if sink is None or log_fd is None:
            return
        for w in list(self._writers.values()):
            for name in sorted(self._segments_of(w.peer)):
                m = _SEGMENT_RE.match(name)
                if m is None or int(m.group(2)) > w.segment:
                    continue
                stop = w.offset if int(m.group(2)) == w.segment else None
                await self._replay_segment(name, stop, sink)

    async def _replay_segment(self, name: str, stop: int | None, sink: RecordSink) -> None:
        """Feed the cache records of one segment (up to `stop`) to `sink.restore`."""
        try:
            fd = _open_regular(name, os.O_RDONLY, self._fds["log"])
        except OSError:
            return  # deleted meanwhile: the snapshot covers it
        try:
            reader = FrameReader(self.max_record_size)
            offset = 0
            while stop is None or offset < stop:
                size = _READ_CHUNK if stop is None else min(_READ_CHUNK, stop - offset)
                data = os.pread(fd, size, offset)
                if not data:
                    break
                offset += len(data)
                await _restore_sliced(reader, data, sink)
        finally:
            os.close(fd)

    # -- watching -------------------------------------------------------------------

    def _start_watcher(self) -> None:
        loop = asyncio.get_running_loop()
        self._watch_done = loop.create_future()
        self._watch_stop.clear()
        # With doorbells, watch peers/ only: every append to a watched segment
        # would cost each watching process an inotify event (measured: a 1 us
        # write became 9 us with two watchers). Without doorbells, log/ too.
        paths = [str(self.path / "peers")]
        if self._bell is None:
            paths.append(str(self.path / "log"))
        own = f"{self.peer}-"

        def keep(_change: Any, path: str) -> bool:
            name = os.path.basename(path)
            return not name.startswith(own) and name.endswith((".seg", ".sock", ".lock"))

        def run() -> None:
            try:
                import watchfiles

                for changes in watchfiles.watch(
                    *paths,
                    watch_filter=keep,
                    step=self.watch_step,
                    debounce=self.watch_step * 4,
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

        self._watch_thread = threading.Thread(target=run, name="ivip-ipc-watch", daemon=True)
        self._watch_thread.start()

    def _watch_failed(self, exc: BaseException) -> None:
        if not self._closing:
            self._watch_error = exc
            logger.warning(
                "watchfiles stopped (%s): falling back to doorbells plus a re-scan every "
                "%.1fs until it can be restarted",
                exc,
                self.rescan_interval,
            )

    def _supervise_watcher(self) -> None:
        """Restart a watcher thread that died, with a growing pause between tries."""
        thread = self._watch_thread
        if self._closing or thread is None or thread.is_alive():
            return
        now = time.monotonic()
        if now < self._watch_retry_at:
            return
        self._watch_backoff = min(60.0, max(1.0, self._watch_backoff * 2))
        self._watch_retry_at = now + self._watch_backoff
        self.counters["watcher_restarts"] += 1
        logger.warning("restarting the watcher thread (it stopped: %s)", self._watch_error)
        self._start_watcher()

    def _on_watch(self, changes: set[tuple[Any, str]]) -> None:
        self.counters["watch_events"] += len(changes)
        for _change, path in changes:
            if path.endswith(".seg"):
                self._full_scan_wanted = True
            else:
                self._peers_wanted = True
        self._schedule_read()

    # -- maintenance: re-scan, liveness, collection, retention, snapshots ----------

    async def _maintain(self) -> None:
        rounds = 0
        try:
            while not self._closing:
                await asyncio.sleep(self.rescan_interval)
                rounds += 1
                self._safety_rescan(full=rounds % 10 == 0)
                self._supervise_watcher()
                if rounds % 3 == 0:
                    self._peers_wanted = True
                    self._check_peers()
                    self._enforce_retention()
                self._maybe_snapshot()
                self._maybe_reload_snapshot()
        except asyncio.CancelledError:
            if not self._closing:
                # Not cancelled by close(): the event loop is ending (asyncio.run
                # cancels every task before it closes the loop). Let go of the
                # locks now; once the loop is gone nothing would, and peers would
                # wait forever on a process that is alive but no longer serving.
                logger.info("the event loop of peer %s ended without destroy()", self.peer)
                self._flush()
                self.abandon()
            raise

    def _safety_rescan(self, full: bool) -> None:
        """Look for records whose wake-up was lost, as cheaply as possible.

        New bytes in an open segment show in its size (one fstat per writer);
        a new segment shows in the log directory's timestamp, which is coarse,
        so a recent timestamp is looked at again, and every tenth round lists
        the directory whatever it says.
        """
        mtime = os.fstat(self._fds["log"]).st_mtime_ns
        if full or mtime != self._log_mtime or time.time_ns() - mtime < 50_000_000:
            self._log_mtime = mtime
            self._full_scan_wanted = True
        for w in self._writers.values():
            if w.segment < w.newest_segment or (w.fd is None and not w.dead):
                self._dirty.add(w.peer)
                continue
            if w.fd is None:
                continue  # a dead writer read to its end
            with contextlib.suppress(OSError):
                size = os.fstat(w.fd).st_size
                if size < w.offset:
                    self._truncated(w)
                if size != w.offset:
                    self._dirty.add(w.peer)
            self._unstick(w)
        if self._dirty or self._full_scan_wanted:
            self._schedule_read()

    def _truncated(self, w: _Writer) -> None:
        """A segment shrank under this reader (someone truncated it): read it
        again from the start; what was delivered is skipped by sequence number."""
        logger.warning("segment %s-%08d was truncated: reading it again", w.peer, w.segment)
        w.cause = "truncation (its segment was cut short before this process read it)"
        w.reader.discard_pending()
        w.offset = 0
        w.stuck_at = -1

    def _unstick(self, w: _Writer) -> None:
        """An incomplete frame of a live writer that stays incomplete from one
        safety re-scan to the next, with bytes behind its header, has a corrupted
        or forged length (a real write lands whole within microseconds): give it
        up and hand on the records it hid, instead of losing them at rotation.

        (A writer whose disk filled mid-batch, and that could not even start a
        new segment, leaves a torn batch that looks the same: its whole inner
        records are then delivered although the caller got the error.)"""
        reader = w.reader
        if reader.pending <= HEADER_SIZE or reader.backlog or w.dead:
            w.stuck_at = -1
            return
        at = w.offset - reader.pending
        if at != w.stuck_at:
            w.stuck_at = at
            return
        if not self._holds_lock(w.peer):
            return  # a dead writer's torn tail: dropped by `_drop_tail` once it is collected
        w.stuck_at = -1
        self._take(w, reader.salvage())

    def _holds_lock(self, peer: str) -> bool:
        """Whether `peer` is alive: its lock file is there and locked."""
        try:
            fd = _open_regular(f"{peer}.lock", os.O_RDONLY, self._fds["peers"])
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _check_peers(self) -> None:
        """Find dead peers by their released flock; collect them after retention."""
        peers_fd = self._fds["peers"]
        now = time.time()
        try:
            names = os.listdir(peers_fd)
        except OSError:
            return
        self._peer_count = max(1, sum(1 for name in names if _LOCK_RE.match(name)))
        self._update_budget()
        alive = {self.peer}
        for name in names:
            m = _LOCK_RE.match(name)
            if m is None:
                if name.startswith(".") and name.endswith(".lock.tmp"):
                    self._collect_announce_leftover(name, peers_fd, now)
                continue
            try:
                fd = _open_regular(name, os.O_RDONLY, peers_fd)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    alive.add(m.group(1))
                    continue
                # We hold its lock: that peer is gone.
                self._collect(m.group(1), fd, now)
            finally:
                os.close(fd)
        # Segments whose writer has no lock file at all are orphans.
        for peer, w in self._writers.items():
            if peer not in alive and not w.dead:
                w.dead = True
                self._dirty.add(peer)
                self._schedule_read()
        self._collect_orphans(alive, now)
        self._forget_gone_writers()

    def _forget_gone_writers(self) -> None:
        """Drop dead writers whose segments are all deleted, read or not: nothing
        of theirs can come any more (1,000 short-lived peers leave no trace in a
        long-lived one, nor in the snapshot header it writes)."""
        try:
            names = os.listdir(self._fds["log"])
        except OSError:
            return
        present = {m.group(1) for m in map(_SEGMENT_RE.match, names) if m is not None}
        for peer in [p for p, w in self._writers.items() if w.dead and p not in present]:
            w = self._writers.pop(peer)
            if w.fd is not None:
                os.close(w.fd)

    @staticmethod
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
            fd = _open_regular(name, os.O_RDONLY, peers_fd)
        except OSError:
            _unlink(name, peers_fd)  # planted junk: not ours to keep
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        finally:
            os.close(fd)
        _unlink(name, peers_fd)

    def _collect(self, peer: str, lock_fd: int, now: float) -> None:
        w = self._writers.get(peer)
        if w is not None and not w.dead:
            w.dead = True
            self._dirty.add(peer)
            self._schedule_read()
        _unlink(f"{peer}.sock", self._fds["peers"])
        if self._segments_of(peer, newer_than=now - self.retention):
            return  # readers may still need them
        for name in self._segments_of(peer):
            if _unlink(name, self._fds["log"]):
                self.counters["segments_deleted"] += 1
        if _unlink(f"{peer}.lock", self._fds["peers"]):
            self.counters["peers_collected"] += 1
            logger.info("collected the files of dead peer %s", peer)
        if w is not None:
            if w.fd is not None:
                os.close(w.fd)
            del self._writers[peer]

    def _collect_orphans(self, alive: set[str], now: float) -> None:
        try:
            names = os.listdir(self._fds["log"])
        except OSError:
            return
        for name in names:
            m = _SEGMENT_RE.match(name)
            if m is None or m.group(1) in alive:
                continue
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=self._fds["log"], follow_symlinks=False)
                lock_exists = _exists(f"{m.group(1)}.lock", self._fds["peers"])
                stale = not lock_exists and now - st.st_mtime > self.retention
                if stale and _unlink(name, self._fds["log"]):
                    self.counters["segments_deleted"] += 1

    def _segments_of(self, peer: str, newer_than: float | None = None) -> list[str]:
        out = []
        for name in os.listdir(self._fds["log"]):
            if not name.startswith(peer + "-"):
                continue
            if newer_than is not None:
                try:
                    st = os.stat(name, dir_fd=self._fds["log"], follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_mtime <= newer_than:
                    continue
            out.append(name)
        return out

    def _enforce_retention(self) -> None:
        """Delete own closed segments past the retention window that no snapshot
        needs (the size cap is kept on the write path, see `_make_room`)."""
        now = time.time()
        for seg in self._segments[:-1]:
            if now - seg.closed_at <= self.retention or not self._covered(seg):
                break
            self._delete_own(seg, capped=False)
        self._snapshot_bytes = _size_of(_SNAPSHOT, self._fds["root"])
        self._update_budget()

    # -- snapshots -------------------------------------------------------------------

    def _maybe_snapshot(self) -> None:
        if self._snapshot_lock_fd is None:
            try:
                fd = _open_regular("snapshot.lock", os.O_RDWR | os.O_CREAT, self._fds["root"])
            except OSError as exc:
                rate_limited(logging.ERROR, "snapshot.lock", "cannot open snapshot.lock: %s", exc)
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._read_snapshot_positions()
                return
            self._snapshot_lock_fd = fd
            self._last_snapshot_version = -1  # a new holder writes one at once
            self._collect_snapshot_leftovers()
        sink = self._sink
        if sink is None or (self._snapshot_task is not None and not self._snapshot_task.done()):
            return
        if self._snapshot_damaged():
            self._last_snapshot_version = -1  # written again as soon as it is due
        version = sink.state_version()
        due = time.monotonic() - self._last_snapshot_at >= self.snapshot_interval
        own_pos = self._snapshot_positions.get(self.peer, (0, 0, 0))
        moved = own_pos[2] != self._seq and any(s.has_cache for s in self._segments)
        if due and (version != self._last_snapshot_version or moved):
            self._last_snapshot_at = time.monotonic()
            self._snapshot_task = asyncio.get_running_loop().create_task(
                self._write_snapshot(version)
            )
            self._tasks.add(self._snapshot_task)
            self._snapshot_task.add_done_callback(self._tasks.discard)

    def _snapshot_damaged(self) -> bool:
        """Whether snapshot.bin is no longer the file this holder wrote (truncated,
        emptied, replaced or deleted by someone else): then it is written again
        at once, even while the cache is idle."""
        if self._snapshot_written is None:
            return False
        try:
            st = os.stat(_SNAPSHOT, dir_fd=self._fds["root"], follow_symlinks=False)
            now = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            now = None
        if now == self._snapshot_written:
            return False
        self.counters["snapshots_damaged"] += 1
        logger.warning(
            "snapshot.bin was changed by someone else (%s): writing it again",
            "deleted" if now is None else f"{now[1]} bytes, {self._snapshot_written[1]} written",
        )
        self._snapshot_written = None
        return True

    def _snapshot_identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(_SNAPSHOT, dir_fd=self._fds["root"], follow_symlinks=False)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _maybe_reload_snapshot(self) -> None:
        """A process that started from a damaged snapshot loads the next one its
        holder writes (last-writer-wins makes loading it again harmless)."""
        if not self._snapshot_suspect or self._snapshot_lock_fd is not None:
            return
        seen = self._snapshot_identity()
        if seen is None or seen == self._snapshot_seen:
            return
        self._snapshot_seen = seen

        async def reload() -> None:
            if await self._load_snapshot(positions=False):
                self._snapshot_suspect = False

        self._spawn(reload)

    def _collect_snapshot_leftovers(self) -> None:
        """Delete the temporary files of snapshot writers killed mid-write (only
        the holder of snapshot.lock writes one, and that is now this process)."""
        root = self._fds["root"]
        with contextlib.suppress(OSError):
            for name in os.listdir(root):
                leftover = name.startswith(".snapshot.") and name.endswith(".tmp")
                if leftover and _unlink(name, root):
                    logger.info("deleted %s, left by a snapshot writer that died", name)

    async def _write_snapshot(self, version: int) -> None:
        """Write the whole cache state to snapshot.bin, atomically, a slice at a time.

        The temporary file has a fresh random name and is created with
        `O_EXCL`, so nothing planted under it (a link to an outside file) is
        ever written through. The last frame says how many records came before
        it, so a truncated snapshot is recognised.
        """
        assert self._sink is not None
        positions = {
            w.peer: (w.segment, w.offset - w.reader.pending, w.last_seq)
            for w in self._writers.values()
        }
        own = self._segments[-1]
        positions[self.peer] = (own.number, own.size, self._seq)
        meta = Record(
            Kind.SNAPSHOT_META,
            "",
            b"",
            json.dumps({"taken": time.time(), "by": self.peer, "positions": positions}).encode(),
        )
        root = self._fds["root"]
        tmp = f".snapshot.{self.peer}.{secrets.token_hex(4)}.tmp"

        def opener(path: str, flags: int) -> int:
            return os.open(
                path, flags | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=root
            )

        try:
            async with aiofiles.open(tmp, "wb", opener=opener) as f:
                chunk: list[bytes] = [encode_frame(meta, 0)]
                count = 0
                deadline = time.perf_counter() + _SLICE
                for rec in self._sink.state():
                    chunk.append(encode_frame(rec, rec.seq))
                    count += 1
                    if count % _STEP == 0 and time.perf_counter() > deadline:
                        await f.write(b"".join(chunk))  # yields the loop
                        chunk.clear()
                        deadline = time.perf_counter() + _SLICE
                end = json.dumps({"records": count}).encode()
                chunk.append(encode_frame(Record(Kind.SNAPSHOT_META, "", b"", end), 0))
                await f.write(b"".join(chunk))
            os.replace(tmp, _SNAPSHOT, src_dir_fd=root, dst_dir_fd=root)
            st = os.stat(_SNAPSHOT, dir_fd=root, follow_symlinks=False)
        except OSError as exc:
            _unlink(tmp, root)
            logger.error("could not write the cache snapshot: %s", exc)
            return
        self._snapshot_written = (st.st_ino, st.st_size, st.st_mtime_ns)
        self._snapshot_bytes = st.st_size
        self._last_snapshot_version = version
        self._snapshot_positions = positions
        self.counters["snapshots_written"] += 1

    def _read_snapshot_positions(self) -> None:
        """Learn what the current snapshot covers (to know what may be deleted)."""
        try:
            fd = _open_regular(_SNAPSHOT, os.O_RDONLY, self._fds["root"])
        except OSError:
            return
        try:
            mtime = os.fstat(fd).st_mtime_ns
            if mtime == self._snapshot_mtime:
                return  # unchanged since we last read it
            self._snapshot_mtime = mtime
            head = os.pread(fd, HEADER_SIZE, 0)
            if len(head) < HEADER_SIZE:
                return
            # The header frame is read whole, however many peers it names.
            size = HEADER_SIZE + int.from_bytes(head[4:8], "little")  # body_len
            head += os.pread(fd, min(size, self.max_record_size) - HEADER_SIZE, HEADER_SIZE)
        finally:
            os.close(fd)
        recs = FrameReader(self.max_record_size).feed(head)
        if recs and recs[0].kind is Kind.SNAPSHOT_META:
            self._snapshot_positions = _positions(recs[0].data)

    async def _load_snapshot(self, positions: bool = True) -> bool:
        """Load snapshot.bin (if any) into the sink, a slice at a time; False when
        it is damaged (what it held that was readable is loaded all the same)."""
        sink = self._sink
        assert sink is not None
        reader = FrameReader(self.max_record_size, self._garbage_reporter("snapshot"))
        meta: dict[str, tuple[int, int, int]] | None = None
        count, end = 0, -1
        try:
            fd = _open_regular(_SNAPSHOT, os.O_RDONLY, self._fds["root"])
        except FileNotFoundError:
            return True
        except OSError as exc:
            logger.warning("could not read the cache snapshot, replaying the log only: %s", exc)
            return False
        loop = asyncio.get_running_loop()
        offset = 0
        try:
            while data := await loop.run_in_executor(None, os.pread, fd, _READ_CHUNK, offset):
                offset += len(data)
                records = reader.feed(data, _STEP)
                deadline = time.perf_counter() + _SLICE
                while True:
                    state = []
                    for rec in records:
                        if rec.kind is not Kind.SNAPSHOT_META:
                            state.append(rec)
                        elif meta is None and count == 0:
                            meta = _positions(rec.data)
                        else:
                            end = _snapshot_end(rec.data)
                    count += len(state)
                    sink.restore(state)
                    if not reader.backlog:
                        break
                    if time.perf_counter() > deadline:
                        await asyncio.sleep(0)
                        deadline = time.perf_counter() + _SLICE
                    records = reader.feed(limit=_STEP)
        except OSError as exc:
            logger.warning("could not read the cache snapshot, replaying the log only: %s", exc)
            return False
        finally:
            os.close(fd)
        if meta is None or end != count or reader.pending or reader.skipped_bytes:
            self.counters["snapshots_damaged"] += 1
            logger.warning(
                "snapshot.bin is damaged (%s): loaded the %d records it still holds, and "
                "the whole retained log; its holder writes it again",
                "no header" if meta is None else f"{count} records of {end} readable",
                count,
            )
            return False
        if positions:
            self._snapshot_positions = meta
        return True

    # -- locks for others (leader election) -------------------------------------------------

    def open_lock(self, name: str) -> int:
        """Open (creating, 0600) the lock file `name` in the namespace; returns its fd.

        The caller takes and releases the `flock`; used by `leader.Leadership`.
        """
        if "/" in name or name.startswith("."):
            raise ValueError(f"invalid lock name {name!r}")
        return _open_regular(name, os.O_RDWR | os.O_CREAT, self._fds["root"])

    def locks(self) -> DirectoryLocks:
        """The lock capability: `flock`s on files in `locks/` (backends/directory_lock.py)."""
        if self._locks is None:
            self._locks = DirectoryLocks(self.path)
        return self._locks

    # -- cache reads -----------------------------------------------------------------------

    async def fetch(self, topic: str, key: bytes) -> Record | None:
        """Never needed: the directory is read in order, with gaps detected and
        repaired, so the mirror always answers."""
        return None

    def _footprint(self) -> int:
        """Bytes the namespace holds: segments, snapshots and their leftovers."""
        total = 0
        for where in ("log", "root"):
            fd = self._fds.get(where)
            if fd is None:
                continue
            with contextlib.suppress(OSError):
                for name in os.listdir(fd):
                    with contextlib.suppress(OSError):
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):
                            total += st.st_size
        return total

    # -- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters, peers, segments and lag of this backend."""
        footprint = self._footprint()
        segments = 0
        log_fd = self._fds.get("log")
        if log_fd is not None:
            segments = len(os.listdir(log_fd))
        lag = 0
        for w in self._writers.values():
            if w.fd is not None and not w.dead:
                with contextlib.suppress(OSError):
                    lag += max(0, os.fstat(w.fd).st_size - w.offset)
        return {
            "backend": "directory",
            "path": str(self.path),
            "peer": self.peer,
            "peers": sorted(self._ringers) if self.use_doorbell else sorted(self._writers),
            "writers": len(self._writers),
            "segments": segments,
            "footprint_bytes": footprint,
            "lag_bytes": lag,
            "snapshot_holder": self._snapshot_lock_fd is not None,
            "watcher_alive": self._watch_thread is not None and self._watch_thread.is_alive(),
            "maintenance_alive": any(
                t.get_name() == "ivip-ipc_maintain" and not t.done() for t in self._tasks
            ),
            **self.counters,
        }


# Started backends of this process, so that a forked child can let go of their
# descriptors at once (see `_drop_inherited`).
_started: weakref.WeakSet[DirectoryBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for backend in list(_started):
        backend._drop_inherited()
    _started.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)

# The one place records are written; tests replace it to inject disk faults.
_write_to_segment = os.write


def _snapshot_end(data: bytes) -> int:
    """The record count of a snapshot's closing frame (-1: not one)."""
    try:
        return int(json.loads(data)["records"])
    except (ValueError, KeyError, TypeError):
        return -1


def _positions(data: bytes) -> dict[str, tuple[int, int, int]]:
    try:
        raw = json.loads(data)["positions"]
        return {str(k): (int(v[0]), int(v[1]), int(v[2])) for k, v in raw.items()}
    except (ValueError, KeyError, TypeError, IndexError):
        logger.warning("the cache snapshot has an unreadable header; ignoring its positions")
        return {}


def _unlink(name: str, dir_fd: int) -> bool:
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("could not delete %s: %s", name, exc)
        return False


def _size_of(name: str, dir_fd: int) -> int:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_size
    except OSError:
        return 0


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


class UnsafeFileError(OSError):
    """A name in the namespace is not a regular file of this user (a FIFO, a
    device, a directory, a link or another user's file): never opened."""


def _open_regular(name: str, flags: int, dir_fd: int, mode: int = 0o600) -> int:
    """Open `name` only if it is a regular file owned by this user.

    `O_NONBLOCK` keeps a FIFO planted under the name from blocking the open
    (the loop would freeze), `O_NOFOLLOW` refuses a symlink, and the checks
    after opening refuse whatever else was planted.
    """
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
        return fd
    os.close(fd)
    what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"owned by uid {st.st_uid}"
    raise UnsafeFileError(errno.EPERM, f"refusing {name!r}: {what}")


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


async def _restore_sliced(reader: FrameReader, data: bytes, sink: RecordSink) -> None:
    """Feed `data` to `sink.restore` a slice at a time, yielding to the loop between."""
    deadline = time.perf_counter() + _SLICE
    records = reader.feed(data, _STEP)
    while True:
        sink.restore([r for r in records if r.kind is not Kind.MESSAGE])
        if not reader.backlog:
            break
        if time.perf_counter() > deadline:
            await asyncio.sleep(0)
            deadline = time.perf_counter() + _SLICE
        records = reader.feed(limit=_STEP)
    await asyncio.sleep(0)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
        loop.call_soon_threadsafe(fn, *args)


def _resolve(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)
