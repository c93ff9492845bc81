"""Where the directory is, what its files are called, and how they are opened safely.

Layout of one namespace (see docs/design.md for the reasons)::

    <root>/<namespace>/              0700, owned by the user, never a symlink
        log/<peer>-<segment>.seg     append-only records of one writer (0600)
        peers/<peer>.lock            held with flock(LOCK_EX) for the peer's life
        peers/<peer>.sock            the peer's doorbell (unix datagram socket)
        snapshot.lock                flock of the one peer that writes snapshots
        snapshot.bin                 cache state, replaced atomically

`Namespace` is what every part of one started backend shares: the directory's
fds, this peer's name, the options, the counters and the background tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import secrets
import stat
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, Final, NamedTuple

from ...errors import UnsafeDirectoryError
from ...logs import logger
from ...records import FrameReader, Record
from ..base import LossCause, RecordSink


class Loss(NamedTuple):
    """Why a writer's records may be missing next, for the gap report: the cause
    (which counter) and what happened, in words (for the warning).

    Example:
        >>> str(Loss(LossCause.TRUNCATION, "its segment was cut short"))
        'truncation (its segment was cut short)'
    """

    cause: LossCause
    detail: str

    def __str__(self) -> str:
        return f"{self.cause.value} ({self.detail})"


# ASCII digits and the very end of the name (`\d` takes any Unicode digit, `$`
# a trailing newline): names in the directory are untrusted input.
SEGMENT_RE: Final = re.compile(r"([0-9a-f]{16})-([0-9]{8})\.seg\Z")
LOCK_RE: Final = re.compile(r"([0-9a-f]{16})\.lock\Z")
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
SNAPSHOT: Final = "snapshot.bin"
READ_CHUNK: Final = 256 << 10
# A ticker on the loop sees up to two slices between its wake-ups (one ends its
# iteration, the next starts it), so a slice stays well under half of 10 ms.
SLICE: Final = 0.002  # seconds of reading and dispatch per loop callback, then yield
STEP: Final = 64  # records parsed and dispatched between two looks at the clock
GROUP_WRITE: Final = 1 << 20  # bytes of independent appends joined in one frame


async def sliced(reader: FrameReader, data: bytes) -> AsyncIterator[list[Record]]:
    """The records `data` completes, `STEP` at a time, yielding to the event loop
    whenever a `SLICE` has passed (a restore or a snapshot load of 100,000 keys
    never holds the loop in one go)."""
    deadline = time.perf_counter() + SLICE
    records = reader.feed(data, STEP)
    while True:
        yield records
        if not reader.backlog:
            return
        if time.perf_counter() > deadline:
            await breathe()
            deadline = time.perf_counter() + SLICE
        records = reader.feed(limit=STEP)


async def breathe() -> None:
    """Yield to the event loop between two slices of work, behind the timers due.

    `asyncio.sleep(0)` queues the caller ahead of the timers that fall due while
    it runs, so a task sleeping 1 ms would wait for two slices; a timer of (next
    to) no delay is queued behind them, so it waits for one.
    """
    await asyncio.sleep(_NEXT_TO_NO_DELAY)


def after_timers_due(callback: Callable[[], object]) -> None:
    """Call `callback` (a slice of work) once the timers due now have run, and
    the tasks they wake: a timer only wakes a task, which runs one loop turn
    later, so `callback` is queued one turn later too (see `breathe`)."""
    loop = asyncio.get_running_loop()
    loop.call_later(0, loop.call_soon, callback)


_NEXT_TO_NO_DELAY: Final = 1e-9  # asyncio.sleep(0) is a plain yield, without a timer


COUNTERS: Final = (
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
    "layout_repairs",
    "records_stranded",
)


# -- where the directory is: ivip_ipc_async/namespaces.py (shared with the CLI) --


def secure_directory(path: Path | str, *, dir_fd: int | None = None, create: bool = True) -> int:
    """Create (0700) or open a directory the current user may trust; returns its fd.

    Refuses, with `UnsafeDirectoryError`, a symlink, a directory owned by another
    user, or one that group or others can write. With `dir_fd`, `path` is a name
    relative to that directory, so no symlink can be swapped in between. With
    `create=False`, a directory that is not there is `FileNotFoundError`.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     fd = secure_directory(os.path.join(tmp, "ipc"))
        ...     oct(os.fstat(fd).st_mode & 0o777)
        ...     os.close(fd)
        '0o700'
    """
    path = os.fspath(path)
    if create and dir_fd is None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
    if create:
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


# -- opening what may have been planted -------------------------------------------


class UnsafeFileError(OSError):
    """A name in the namespace is not a regular file of this user (a FIFO, a
    device, a directory, a link or another user's file): never opened."""


def open_regular(name: str, flags: int, dir_fd: int, mode: int = 0o600) -> int:
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


def json_object(data: bytes) -> dict[str, Any]:
    """`data` parsed as one JSON object, or {} when it is not one.

    Every JSON record read from the directory (a lock's record, a peer's note, a
    snapshot's header) goes through here: the bytes are untrusted, and
    `json.loads` raises more than ValueError (RecursionError on deep nesting).

    Example:
        >>> json_object(b'{"pid": 7}'), json_object(b"[" * 5000), json_object(b"[1]")
        ({'pid': 7}, {}, {})
    """
    try:
        value = json.loads(data)
    except Exception:  # damaged, nested too deep, too large: no record at all
        return {}
    return value if isinstance(value, dict) else {}


def unlink(name: str, dir_fd: int) -> bool:
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("could not delete %s: %s", name, exc)
        return False


def size_of(name: str, dir_fd: int) -> int:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_size
    except OSError:
        return 0


def exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


FileId = tuple[int, int]  # (st_dev, st_ino): which file, on which device


def file_id(st: os.stat_result) -> FileId:
    """The identity of the file `st` describes: device and inode number."""
    return (st.st_dev, st.st_ino)


def same_file(name: str, dir_fd: int | None, held: int | FileId, *, unknown: bool = True) -> bool:
    """Whether `name` (relative to `dir_fd`) is still the file `held` is: an open
    fd, or the `file_id` it had. Not there: False. Not known (EACCES, ELOOP...):
    `unknown`. Never follows a symlink. An inode number is not reused while a
    descriptor keeps the file, and is unique only on its device.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     fd = os.open(tmp, os.O_RDONLY)
        ...     kept = same_file(tmp, None, fd)
        ...     os.rmdir(tmp); os.mkdir(tmp)
        ...     print(kept, same_file(tmp, None, fd), same_file("gone", fd, (0, 0)))
        ...     os.close(fd)
        True False False
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return unknown
    return file_id(st) == (file_id(os.fstat(held)) if isinstance(held, int) else held)


def _moved(name: str, fd: int, dir_fd: int | None) -> bool:
    """Whether `name` (relative to `dir_fd`) is no longer the directory `fd` is
    (not known to be gone, EACCES, ELOOP...: not moved, no repair for that)."""
    return not same_file(name, dir_fd, fd)


def segment_name(peer: str, number: int) -> str:
    """The file name of segment `number` of `peer` in log/."""
    return f"{peer}-{number:08d}.seg"


# -- what every part of one started backend shares --------------------------------


class Namespace:
    """One namespace as this backend sees it: where it is, who we are in it, the
    options, the counters, the directory fds and the background tasks.

    Example:
        >>> import tempfile
        >>> ns = Namespace(tempfile.mkdtemp() + "/ns", node=1)
        >>> ns.peer
        '0000000000000001'
    """

    def __init__(
        self,
        path: Path | str,
        *,
        max_record_size: int = 16 << 20,
        segment_bytes: int = 2 << 20,
        retention: float = 15.0,
        max_footprint: int = 64 << 20,
        max_state_bytes: int = 512 << 20,
        rescan_interval: float = 2.0,
        snapshot_interval: float = 1.0,
        watch_step: int = 150,
        doorbell: bool = True,
        node: int | None = None,
    ) -> None:
        # Absolute: the path is looked at again while running (`displaced`), and
        # a relative one would follow the process's working directory.
        self.path = Path(os.path.abspath(path))
        self.max_record_size = max_record_size
        self.segment_bytes = segment_bytes
        self.retention = retention
        self.max_footprint = max_footprint
        self.max_state_bytes = max_state_bytes
        self.rescan_interval = rescan_interval
        self.snapshot_interval = snapshot_interval
        self.watch_step = watch_step
        self.use_doorbell = doorbell
        self.node = node if node is not None else (secrets.randbits(63) or 1)
        self.peer = f"{self.node:016x}"
        self.sink: RecordSink | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fds: dict[str, int] = {}  # "root", "log", "peers"
        self.retired: list[int] = []  # fds of directories removed or moved, see reopen
        self.closing = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def open_directories(self) -> None:
        # The directory given (or the default root) and the namespace inside it
        # are both checked; the namespace is opened through the root's fd.
        base = secure_directory(self.path.parent)
        try:
            root = secure_directory(self.path.name, dir_fd=base)
        finally:
            os.close(base)
        self.fds["root"] = root
        for name in ("log", "peers"):
            self.fds[name] = secure_directory(name, dir_fd=root)

    def displaced(self) -> str:
        """What of the namespace is no longer where this process opened it ("":
        nothing): the directory at `path`, and its log/ and peers/, must be the
        very ones this process's fds refer to (same device and inode). A logout
        may clear `$XDG_RUNTIME_DIR`, a cleaner may `rm -rf`, someone may rename.

        Example:
            >>> import tempfile
            >>> ns = Namespace(tempfile.mkdtemp() + "/ns")
            >>> ns.open_directories()
            >>> ns.displaced()
            ''
        """
        root = self.fds.get("root")
        if root is None:
            return ""
        if _moved(str(self.path), root, None):
            return f"the namespace directory {self.path} was removed or moved"
        for name in ("log", "peers"):
            fd = self.fds.get(name)
            if fd is not None and _moved(name, fd, root):
                return f"{self.path / name} was removed or moved"
        return ""

    def reopen_directories(self) -> set[str]:
        """Open (creating them 0700, with the checks of `secure_directory`) the
        namespace at `path` and its log/ and peers/, in place of those that were
        removed or moved; returns the names of the fds replaced. The fds replaced
        are kept open in `retired` (a snapshot being written may still use the old
        root) until `close_retired`."""
        root = self.fds["root"]
        fresh = Namespace(self.path)
        try:
            if _moved(str(self.path), root, None):
                fresh.open_directories()
            else:
                for name in ("log", "peers"):
                    if _moved(name, self.fds[name], root):
                        fresh.fds[name] = secure_directory(name, dir_fd=root)
        except BaseException:
            for fd in fresh.fds.values():
                os.close(fd)
            raise
        replaced = set(fresh.fds)
        for name in replaced:
            self.retired.append(self.fds[name])
            self.fds[name] = fresh.fds[name]
        return replaced

    def close_retired(self) -> None:
        """Close the fds of directories replaced by `reopen_directories`."""
        retired, self.retired = self.retired, []
        for fd in retired:
            with contextlib.suppress(OSError):
                os.close(fd)

    def spawn(
        self, factory: Callable[[], Coroutine[Any, Any, None]], restart: bool = False
    ) -> None:
        """Run a background task; one that dies is logged loudly (and restarted)."""
        name = factory.__name__
        task = asyncio.get_running_loop().create_task(factory(), name=f"ivip-ipc{name}")
        self.tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self.tasks.discard(t)
            if t.cancelled() or self.closing:
                return
            exc = t.exception()
            if exc is None:
                return
            self.counters["task_failures"] += 1
            again = ", restarting it" if restart else ""
            logger.error("background task %s died%s", name, again, exc_info=exc)
            if restart:
                self.spawn(factory, restart=True)

        task.add_done_callback(done)

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep `task` among the background tasks until it is done."""
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def segments_of(self, peer: str, newer_than: float | None = None) -> list[str]:
        out = []
        for name in os.listdir(self.fds["log"]):
            if not name.startswith(peer + "-"):
                continue
            if newer_than is not None:
                try:
                    st = os.stat(name, dir_fd=self.fds["log"], follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_mtime <= newer_than:
                    continue
            out.append(name)
        return out

    def footprint(self) -> int:
        """Bytes the namespace holds: segments, snapshots and their leftovers."""
        total = 0
        for where in ("log", "root"):
            fd = self.fds.get(where)
            if fd is None:
                continue
            with contextlib.suppress(OSError):
                for name in os.listdir(fd):
                    with contextlib.suppress(OSError):
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):
                            total += st.st_size
        return total
