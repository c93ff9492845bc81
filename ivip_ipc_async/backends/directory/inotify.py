"""inotify(7) through libc: the one binding the watcher (`watcher.py`) and the lock
waiters (`lock_handover.py`) share, with the event flags they use and the event
records' parser. Linux only: `LIBC` is None elsewhere, and callers fall back (the
watchfiles thread; a timer).

Depends on: nothing of the package.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Any, Final

__all__ = [
    "IN_ATTRIB",
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_DELETE",
    "IN_DELETE_SELF",
    "IN_IGNORED",
    "IN_MODIFY",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_MOVE_SELF",
    "IN_ONLYDIR",
    "IN_Q_OVERFLOW",
    "LIBC",
    "open_inotify",
    "parse_events",
    "read_events",
]


def _load_libc() -> Any:
    """libc with inotify (Linux); None elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1  # noqa: B018 - presence check
        libc.inotify_add_watch  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


LIBC: Final = _load_libc()

IN_MODIFY: Final = 0x002
IN_ATTRIB: Final = 0x004
IN_CLOSE_WRITE: Final = 0x008
IN_MOVED_FROM: Final = 0x040
IN_MOVED_TO: Final = 0x080
IN_CREATE: Final = 0x100
IN_DELETE: Final = 0x200
IN_DELETE_SELF: Final = 0x400
IN_MOVE_SELF: Final = 0x800
IN_Q_OVERFLOW: Final = 0x4000
IN_IGNORED: Final = 0x8000
IN_ONLYDIR: Final = 0x0100_0000
_IN_DONTFOLLOW: Final = 0x0200_0000

_EVENT: Final = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then name
_READ_SIZE: Final = 64 << 10  # many events per read (one is 16 bytes plus its padded name)
_READS_PER_CALL: Final = 16  # then the loop runs others; the fd is still readable
_OVERFLOW: Final = (-1, IN_Q_OVERFLOW, "")


def open_inotify(watches: list[tuple[int, str | None, int]]) -> int:
    """An inotify fd (non-blocking, close-on-exec) watching each `(fd, path,
    mask)`; OSError when inotify is not to be had.

    Each is watched through `/proc/self/fd/<fd>`: the very file or directory
    this process opened and checked, whatever is renamed over its path since.
    Without /proc, `path` itself (when given), never through a symlink.
    """
    if LIBC is None:
        raise OSError(errno.ENOSYS, "inotify is not available")
    ino: int = LIBC.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if ino < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    try:
        for fd, path, mask in watches:
            wd = LIBC.inotify_add_watch(ino, f"/proc/self/fd/{fd}".encode(), mask)
            if wd < 0 and path is not None and ctypes.get_errno() == errno.ENOENT:
                wd = LIBC.inotify_add_watch(ino, os.fsencode(path), mask | _IN_DONTFOLLOW)
            if wd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"inotify_add_watch({path or fd}): {os.strerror(err)}")
    except BaseException:
        os.close(ino)
        raise
    return ino


def read_events(fd: int) -> list[tuple[int, int, str]]:
    """The events queued on the inotify fd `fd`, as `(wd, mask, name)`."""
    events: list[tuple[int, int, str]] = []
    for _ in range(_READS_PER_CALL):
        try:
            data = os.read(fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            break
        if not data:
            break
        events += parse_events(data)
    return events


def parse_events(data: bytes) -> list[tuple[int, int, str]]:
    """`struct inotify_event` records as `(wd, mask, name)`.

    The kernel returns whole records; a record cut short all the same is read
    as an overflow (look at everything). Names are decoded as the os module
    does (`os.fsdecode`: bytes that are not UTF-8 survive as surrogates).

    Example:
        >>> parse_events(_EVENT.pack(1, IN_CREATE, 0, 16) + b"a.sock".ljust(16, b"\\0"))
        [(1, 256, 'a.sock')]
    """
    events: list[tuple[int, int, str]] = []
    offset, end, size = 0, len(data), _EVENT.size
    while offset < end:
        if end - offset < size:
            events.append(_OVERFLOW)
            break
        wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        offset += size
        if offset + length > end:
            events.append(_OVERFLOW)
            break
        name = data[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        events.append((wd, mask, os.fsdecode(name)))
    return events
