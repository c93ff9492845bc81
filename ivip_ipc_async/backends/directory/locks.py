"""Locks of the shared-directory backend: the kernel's `flock` on `<namespace>/locks/<name>`.

The kernel releases an `flock` when the last descriptor of the open file is
closed, so a holder lets go by closing its descriptor, and dies letting go
however it dies (even `kill -9`). A child forked without exec inherits the
descriptors: it closes its copies at once (`os.register_at_fork`), so a child
never keeps its parent's lock alive (closing a copy is not `LOCK_UN`: the
parent keeps the lock while it lives).

Nothing blocks the event loop: the lock is only tried with `LOCK_NB`. A
waiter watches the lock file with inotify (on its own descriptor's inode):
a holder closing its descriptor, at release or death, raises
`IN_CLOSE_WRITE`, a note being written `IN_MODIFY`, a discarded file
`IN_ATTRIB`. Waiters keep their descriptor open while they wait (they never
write), so their tries wake nobody. A timer is the safety net (a file system
without inotify events from other hosts, a lost event).

The file holds a record for the others: one JSON object (holder pid, fencing
token, note), written at offset 0 in one `pwrite` while the lock is held. The
fencing token is the previous holder's plus one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import stat
import weakref
from pathlib import Path
from typing import Any, Final

from ...errors import UnsafeDirectoryError
from ...logs import logger
from ..base import check_lock_name, check_lock_note
from .inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_DELETE_SELF,
    IN_MODIFY,
    IN_MOVE_SELF,
    LIBC,
    open_inotify,
)
from .layout import secure_directory

__all__ = ["DirectoryLocks"]

_SUBDIR: Final = "locks"
_RECORD_SIZE: Final = 1024
_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

# What a waiter is woken by on the lock file (inotify, Linux; elsewhere it polls).
_IN_MASK: Final = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_DELETE_SELF | IN_MOVE_SELF

# Contenders with a descriptor open in this process: closed in a forked child.
_open_here: weakref.WeakSet[_FileContender] = weakref.WeakSet()
_providers: weakref.WeakSet[DirectoryLocks] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for contender in list(_open_here):
        contender._forget()
    for provider in list(_providers):
        provider._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


class DirectoryLocks:
    """The `LockProvider` of a namespace directory: one file per lock in `locks/`.

    Example:
        >>> import asyncio, tempfile
        >>> async def main():
        ...     locks = DirectoryLocks(Path(tempfile.mkdtemp()) / "ns")
        ...     one, two = locks.contender("u.a", lease=5), locks.contender("u.a", lease=5)
        ...     got = await one.try_acquire(), await two.try_acquire()
        ...     await locks.close()
        ...     return got, one.fence
        >>> asyncio.run(main())
        ((True, False), 1)
    """

    leased = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._dir: int | None = None
        # Contenders with a file open (strong: a held lock outlives its Lock object
        # until it is released, the provider closes, or the event loop ends).
        self._contenders: set[_FileContender] = set()
        self._keeper: asyncio.Task[None] | None = None
        _providers.add(self)

    def _guard(self) -> None:
        """Locks held here are let go when the event loop ends (its tasks are cancelled)."""
        loop = asyncio.get_running_loop()
        keeper = self._keeper
        if keeper is None or keeper.done() or keeper.get_loop() is not loop:
            self._keeper = loop.create_task(self._keep(), name="ivip-ipc-locks")

    async def _keep(self) -> None:
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            for contender in list(self._contenders):
                contender._drop()

    def _dir_fd(self) -> int:
        if self._dir is None:
            root = secure_directory(self.path)
            try:
                self._dir = secure_directory(_SUBDIR, dir_fd=root)
            finally:
                os.close(root)
        return self._dir

    def moved(self) -> None:
        """The namespace was re-created at its path (rejoin.py): later attempts
        open its new locks/ (locks held stay in the old one until released)."""
        fd, self._dir = self._dir, None
        if fd is not None:
            os.close(fd)

    def contender(self, name: str, *, lease: float) -> _FileContender:
        """One attempt at lock `name` (`lease` is ignored: the kernel's lock is not lost)."""
        return _FileContender(self, check_lock_name(name))

    async def close(self) -> None:
        """Release every lock held here (closing a descriptor releases its lock)."""
        self.abandon()

    def abandon(self) -> None:
        """As `close`: nothing here needs the event loop."""
        for contender in list(self._contenders):
            contender._drop()
        keeper, self._keeper = self._keeper, None
        if keeper is not None and not keeper.get_loop().is_closed():
            keeper.cancel()
        fd, self._dir = self._dir, None
        if fd is not None:
            os.close(fd)

    def _forget(self) -> None:
        self._keeper = None
        self._contenders.clear()
        fd, self._dir = self._dir, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class _FileContender:
    """One attempt at one lock file (see `Contender` in backends/base.py)."""

    def __init__(self, provider: DirectoryLocks, name: str) -> None:
        self._provider = provider
        self.name = name
        self.fence = 0
        self._fd: int | None = None
        self._held = False
        self._note = ""
        self._inotify: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<lock {self.name!r} {'held' if self._held else 'free'} fence={self.fence}>"

    @property
    def held(self) -> bool:
        return self._held

    # -- the file -------------------------------------------------------------------

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        dir_fd = self._provider._dir_fd()
        try:
            fd = os.open(self.name, _FLAGS, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeDirectoryError(f"refusing lock file {self.name!r}: a symlink") from None
            raise
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "it is not a regular file"
        elif st.st_uid != os.geteuid():
            problem = f"it is owned by uid {st.st_uid}, not by this user"
        if problem:
            os.close(fd)
            raise UnsafeDirectoryError(f"refusing lock file {self.name!r}: {problem}")
        self._fd = fd
        _open_here.add(self)
        self._provider._contenders.add(self)
        return fd

    def _linked(self, fd: int) -> bool:
        """Is `fd` still the file at the lock's path (not discarded by a holder)?"""
        try:
            now = os.stat(self.name, dir_fd=self._provider._dir_fd(), follow_symlinks=False)
        except FileNotFoundError:
            return False
        st = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)

    def _read(self) -> dict[str, Any]:
        if self._fd is None:
            return {}
        try:
            info = json.loads(os.pread(self._fd, _RECORD_SIZE, 0))
        except (OSError, ValueError):  # empty, or read while being written: no hint
            return {}
        return info if isinstance(info, dict) else {}

    def _write(self) -> None:
        if self._fd is None:
            return
        info = {"pid": os.getpid(), "fence": self.fence, "note": self._note}
        data = json.dumps(info).encode().ljust(_RECORD_SIZE - 1) + b"\n"
        try:
            os.pwrite(self._fd, data, 0)  # one write at offset 0: no truncation race
        except OSError as exc:  # only the hint is lost; the flock is the truth
            logger.warning("could not write the record of lock %r: %s", self.name, exc)

    # -- the contract ----------------------------------------------------------------

    async def try_acquire(self, note: str = "") -> bool:
        if self._held:
            return True
        check_lock_note(note)
        for _ in range(8):  # a discarded file is replaced: try the new one
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if self._linked(fd):
                break
            self._close()  # discarded by its last holder: let go of the orphan
        else:
            return False
        previous = self._read().get("fence")
        self.fence = (previous if isinstance(previous, int) and previous >= 0 else 0) + 1
        self._held = True
        self._note = note
        self._write()
        self._provider._guard()
        return True

    async def wait(self, timeout: float) -> None:
        fd = self._open()
        if self._inotify is None and LIBC is not None and self._watch(fd):
            # Watched from now on (only waiters pay for it): a release between the
            # last try and this watch raised no event for us, so try again at once.
            await asyncio.sleep(0)
            return
        wake = self._wake
        if wake is None or self._inotify is None:
            await asyncio.sleep(timeout)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout)
        wake.clear()

    async def holder_note(self) -> str | None:
        info = self._read()
        pid, note = info.get("pid"), info.get("note")
        if not isinstance(pid, int) or not isinstance(note, str) or pid <= 0:
            return None
        if self._held:
            return self._note
        try:
            os.kill(pid, 0)  # a record left by a holder that died says nothing
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return note

    async def set_note(self, note: str) -> None:
        check_lock_note(note)
        if self._held:
            self._note = note
            self._write()

    async def verify(self) -> bool:
        return self._held  # the kernel's lock is never taken from a living holder

    async def release(self, *, discard: bool = False) -> None:
        if self._held and discard and self._fd is not None:
            with contextlib.suppress(OSError):
                if self._linked(self._fd):
                    os.unlink(self.name, dir_fd=self._provider._dir_fd())
        self._drop()

    # -- descriptors -------------------------------------------------------------------

    def _drop(self) -> None:
        """Close everything: the lock, if held, goes with the descriptor."""
        self._held = False
        self._close()

    def _close(self) -> None:
        self._unwatch()
        fd, self._fd = self._fd, None
        _open_here.discard(self)
        self._provider._contenders.discard(self)
        if fd is not None:
            os.close(fd)  # the last descriptor of the open file: the flock goes with it

    def _forget(self) -> None:
        """In a forked child: close the copies, never `LOCK_UN` (the parent's lock)."""
        self._held = False
        self._loop = self._wake = None
        for fd in (self._fd, self._inotify):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._inotify = None

    def _watch(self, fd: int) -> bool:
        """Watch the inode `fd` opened; False when inotify is not to be had."""
        loop = asyncio.get_running_loop()
        try:
            ino = open_inotify([(fd, None, _IN_MASK)])  # the inode this descriptor opened
        except OSError:
            return False  # e.g. out of inotify instances: the timer still wakes us
        self._inotify, self._loop, self._wake = ino, loop, asyncio.Event()
        loop.add_reader(ino, self._on_event)
        return True

    def _on_event(self) -> None:
        if self._inotify is None:
            return
        with contextlib.suppress(OSError):
            while os.read(self._inotify, 4096):
                pass
        if self._wake is not None:
            self._wake.set()

    def _unwatch(self) -> None:
        ino, self._inotify = self._inotify, None
        loop, self._loop = self._loop, None
        if ino is None:
            return
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(ino)
        os.close(ino)
