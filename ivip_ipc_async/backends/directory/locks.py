"""Locks of the shared-directory backend: the kernel's `flock` on `<namespace>/locks/<name>`.

The kernel releases an `flock` when the last descriptor of the open file is
closed, so a holder lets go by closing its descriptor, and dies letting go
however it dies (even `kill -9`). A child forked without exec inherits the
descriptors: it closes its copies at once (`forks.forget_in_child`), so a child
never keeps its parent's lock alive (closing a copy is not `LOCK_UN`: the
parent keeps the lock while it lives).

The lock is the file *at the path*: a contender takes the `flock` of the file
it opened, then checks (fstat against stat) that this file is still the one at
`locks/<name>`; a file unlinked or replaced since is an orphan, let go of and
tried again. A holder whose file is unlinked or replaced while it holds it has
lost the lock (someone else may now take the file at the path): its `held` and
`verify()` compare the two at every call, so they read False from that moment
on, and a warning names the file. So two processes never see `held` True at
the same moment (see docs/coordination.md, "A tampered lock directory").

Nothing blocks the event loop: the lock is only tried with `LOCK_NB`. Waiters
are woken by one inotify instance per `DirectoryLocks` (`lock_handover.py`):
a holder closing its file, at release or death, raises `IN_CLOSE_WRITE`. A
timer is the safety net (a file system without inotify events from other
hosts, a lost event).

The file holds a record for the others: one JSON object (holder pid, fencing
token, note), written at offset 0 in one `pwrite` while the lock is held. The
fencing token is one more than the largest of: the lock file's token, the copy
in `<namespace>/fences/<name>` (written after it), and the largest this process has
held. Each is taken only if it is a JSON integer in 1..2**63-2; a damaged or
missing token is reported with a warning. So garbage written into, or the
deletion of, one of the two files never sends the token back.

Depends on: `layout`, `inotify`, `lock_handover` (waking the waiters),
`backends.base` (the lock protocol), `forks`, `waiting`. No other part.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Final

from ... import forks
from ...errors import UnsafeDirectoryError
from ...logs import logger
from ...waiting import wait_event
from ..base import check_lock_name, check_lock_note
from .inotify import LIBC
from .layout import FileId, file_id, json_object, same_file, secure_directory
from .lock_handover import LockWakeups

__all__ = ["DirectoryLocks"]

_SUBDIR: Final = "locks"
_FENCES: Final = "fences"  # fences/<name>: the copy of each lock's last token
_RECORD_SIZE: Final = 1024
_FENCE_SIZE: Final = 24  # the copy: the token in ASCII digits, padded, one pwrite
_DIGITS: Final = re.compile(rb"[1-9][0-9]{0,18}")
_FENCE_MAX: Final = 2**63 - 2  # the next one still fits a signed 64-bit store
_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def valid_fence(value: object) -> int | None:
    """`value` if it is a fencing token that can be trusted (a JSON integer in
    1..2**63-2), else None.

    Example:
        >>> [valid_fence(v) for v in (7, 0, -7, True, 1e308, "12", [1], 2**63)]
        [7, None, None, None, None, None, None, None]
    """
    if type(value) is int and 0 < value <= _FENCE_MAX:
        return value
    return None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "not a regular file"


def _read_copy(fd: int | None) -> int | None:
    """The token in a fence copy: ASCII digits only, else None."""
    if fd is None:
        return None
    try:
        raw = os.pread(fd, _FENCE_SIZE, 0).strip(b" \n")
    except OSError:
        return None
    return valid_fence(int(raw)) if _DIGITS.fullmatch(raw) else None


def _write_copy(fd: int, fence: int) -> None:
    try:
        os.pwrite(fd, (b"%d" % fence).ljust(_FENCE_SIZE - 1) + b"\n", 0)
    except OSError as exc:  # the lock file keeps the token; only the copy is lost
        logger.warning("could not write a fence copy: %s", exc)


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
        self._fences_dir: int | None = None
        # Contenders with a file open (strong: a held lock outlives its Lock object
        # until it is released, the provider closes, or the event loop ends).
        self._contenders: set[_FileContender] = set()
        self._keeper: asyncio.Task[None] | None = None
        self._wakeups: LockWakeups | None = None  # one inotify fd for every waiter here
        self._held_fences: dict[str, int] = {}  # the largest token held here, per lock
        forks.forget_in_child(self, DirectoryLocks._forget)  # a forked child closes them

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
            self._stop_wakeups()

    def _dir_fd(self) -> int:
        if self._dir is None:
            root = secure_directory(self.path)
            try:
                self._dir = secure_directory(_SUBDIR, dir_fd=root)
            finally:
                os.close(root)
        return self._dir

    def _dir_if_there(self) -> int | None:
        """`locks/`, as `_dir_fd` opens it, but never created (None: it is not
        there, or is refused): looking at a lock must not make the namespace again
        while an `rm -rf` of it may be under way."""
        if self._dir is None:
            try:
                root = secure_directory(self.path, create=False)
                try:
                    self._dir = secure_directory(_SUBDIR, dir_fd=root, create=False)
                finally:
                    os.close(root)
            except OSError:  # UnsafeDirectoryError included
                return None
        return self._dir

    def _reopen(self) -> None:
        """`locks/` (or the namespace) was removed and made again: use the one at
        the path from now on (files in the removed one are orphans)."""
        self._stop_wakeups()  # watching the removed directory
        for fd in (self._dir, self._fences_dir):
            if fd is not None:
                os.close(fd)
        self._dir = self._fences_dir = None

    def _fences_dir_fd(self) -> int:
        if self._fences_dir is None:
            root = secure_directory(self.path)
            try:
                self._fences_dir = secure_directory(_FENCES, dir_fd=root)
            finally:
                os.close(root)
        return self._fences_dir

    def file_path(self, name: str) -> Path:
        """Where lock `name`'s file is (for messages)."""
        return self.path / _SUBDIR / name

    def moved(self) -> None:
        """The namespace was re-created at its path (rejoin.py): later attempts
        open its new locks/. A lock held across the move is lost (its file is not
        at the lock's path any more): the next `held` or `verify()` reads False,
        with a warning, and lets go of it."""
        self._reopen()

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
        self._stop_wakeups()
        keeper, self._keeper = self._keeper, None
        if keeper is not None and not keeper.get_loop().is_closed():
            keeper.cancel()
        for fd in (self._dir, self._fences_dir):
            if fd is not None:
                os.close(fd)
        self._dir = self._fences_dir = None

    def _forget(self) -> None:
        self._keeper = None
        self._contenders.clear()
        wakeups, self._wakeups = self._wakeups, None
        if wakeups is not None:
            wakeups.forget()
        for fd in (self._dir, self._fences_dir):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._dir = self._fences_dir = None

    # -- wake-ups ------------------------------------------------------------------------

    def _waiting_on(self) -> LockWakeups | None:
        """The waiters' inotify watch on this event loop (opened by the first
        waiter); None when inotify cannot be had (the waiters' timers remain)."""
        loop = asyncio.get_running_loop()
        wakeups = self._wakeups
        if wakeups is not None and wakeups.loop is loop:
            return wakeups
        self._stop_wakeups()  # made on another event loop: its waiters are gone
        if LIBC is None:
            return None
        try:
            self._wakeups = LockWakeups(loop, self._dir_fd())
        except OSError as exc:  # e.g. out of inotify instances
            logger.debug("lock waiters fall back on their timer: %s", exc)
            return None
        self._guard()  # the watch ends with the event loop
        return self._wakeups

    def _stop_waiting(self, name: str, wake: tuple[LockWakeups, asyncio.Event]) -> None:
        wakeups, event = wake
        if wakeups is self._wakeups and wakeups.discard(name, event):
            self._stop_wakeups()  # the last waiter: no inotify instance while none waits

    def _stop_wakeups(self) -> None:
        wakeups, self._wakeups = self._wakeups, None
        if wakeups is not None:
            wakeups.close()

    # -- the copy of the fencing tokens -----------------------------------------------------

    def _open_fence_copy(self, name: str) -> int | None:
        """The copy of lock `name`'s last token, opened (None, with a warning, when
        something else is in its place or fences/ cannot be had)."""
        try:
            try:
                fd = os.open(name, _FLAGS, 0o600, dir_fd=self._fences_dir_fd())
            except FileNotFoundError:  # fences/ was removed: the one at the path now
                if self._fences_dir is not None:
                    os.close(self._fences_dir)
                    self._fences_dir = None
                fd = os.open(name, _FLAGS, 0o600, dir_fd=self._fences_dir_fd())
        except OSError as exc:
            logger.warning("could not open the fence copy of lock %r: %s", name, exc)
            return None
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
        logger.warning("the fence copy of lock %r is not a regular file", name)
        return None

    def _discard_fence(self, name: str) -> None:
        self._held_fences.pop(name, None)
        if self._fences_dir is not None:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._fences_dir)


class _FileContender:
    """One attempt at one lock file (see `Contender` in backends/base.py)."""

    def __init__(self, provider: DirectoryLocks, name: str) -> None:
        self._provider = provider
        self.name = name
        self.fence = 0
        self._fd: int | None = None
        self._inode: FileId = (0, 0)  # the open file's
        self._held = False
        self._note = ""
        self._wake: tuple[LockWakeups, asyncio.Event] | None = None

    def __repr__(self) -> str:
        return f"<lock {self.name!r} {'held' if self._held else 'free'} fence={self.fence}>"

    @property
    def held(self) -> bool:
        """Held, and the file still at the lock's path (one `stat`)."""
        if not self._held:
            return False
        if self._fd is not None and self._linked():
            return True
        logger.warning(
            "lock file %s was removed or replaced while held (fence %d): this holding is "
            "lost; the next holder's fence is larger",
            self._provider.file_path(self.name),
            self.fence,
        )
        self._held = False
        self._close()  # the orphan's flock protects nothing now
        return False

    # -- the file -------------------------------------------------------------------

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        try:
            try:
                fd = os.open(self.name, _FLAGS, 0o600, dir_fd=self._provider._dir_fd())
            except FileNotFoundError:  # locks/ itself was removed: the one at the path now
                self._provider._reopen()
                fd = os.open(self.name, _FLAGS, 0o600, dir_fd=self._provider._dir_fd())
        except OSError as exc:
            what = {errno.ELOOP: "a symlink", errno.EISDIR: "a directory", errno.ENXIO: "a socket"}
            if exc.errno in what:
                path = self._provider.file_path(self.name)
                raise UnsafeDirectoryError(
                    f"refusing lock file {path}: it is {what[exc.errno]}"
                ) from None
            raise
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = f"it is {_kind(st.st_mode)}"
        elif st.st_uid != os.geteuid():
            problem = f"it is owned by uid {st.st_uid}, not by this user"
        if problem:
            os.close(fd)
            path = self._provider.file_path(self.name)
            raise UnsafeDirectoryError(f"refusing lock file {path}: {problem}")
        self._fd, self._inode = fd, file_id(st)
        forks.forget_in_child(self, _FileContender._forget)  # a forked child closes it
        self._provider._contenders.add(self)
        return fd

    def _linked(self) -> bool:
        """Is the open file still the one at the lock's path (not unlinked, not
        replaced)? An inode number is not reused while a descriptor keeps it.
        Never creates a directory: no locks/ (or no namespace) is "not linked"."""
        dir_fd = self._provider._dir_if_there()
        # Not known (EACCES...): not linked, the safe side for a lock.
        return dir_fd is not None and same_file(self.name, dir_fd, self._inode, unknown=False)

    def _read_raw(self) -> bytes:
        if self._fd is None:
            return b""
        try:
            return os.pread(self._fd, _RECORD_SIZE, 0)
        except OSError:
            return b""

    def _read(self) -> dict[str, Any]:
        # Empty, damaged, or read while being written: {}, no hint.
        return json_object(self._read_raw())

    def _write(self) -> None:
        if self._fd is None:
            return
        info = {"pid": os.getpid(), "fence": self.fence, "note": self._note}
        data = json.dumps(info).encode().ljust(_RECORD_SIZE - 1) + b"\n"
        try:
            os.pwrite(self._fd, data, 0)  # one write at offset 0: no truncation race
        except OSError as exc:  # only the hint is lost; the flock is the truth
            logger.warning("could not write the record of lock %r: %s", self.name, exc)

    def _next_fence(self, copy_fd: int | None) -> int:
        """One more than the largest trusted token (read while holding the lock)."""
        raw = self._read_raw()
        in_file = valid_fence(json_object(raw).get("fence"))
        copy = _read_copy(copy_fd)
        held_here = self._provider._held_fences.get(self.name)
        last = max(in_file or 0, copy or 0, held_here or 0)
        if (in_file or 0) < last or (in_file is None and raw.strip(b"\0 \n")):
            logger.warning(
                "lock file %s: its fencing token was damaged or removed (%r); the largest "
                "known is %d (copy %s, held here %s): continuing from it",
                self._provider.file_path(self.name),
                raw[:40],
                last,
                copy,
                held_here,
            )
        return min(last, _FENCE_MAX - 1) + 1

    # -- the contract ----------------------------------------------------------------

    async def try_acquire(self, note: str = "") -> bool:
        if self.held:
            return True
        check_lock_note(note)
        for _ in range(8):  # an orphaned file (discarded, unlinked, replaced): the new one
            was_open = self._fd is not None
            fd = self._open()
            if was_open and not self._linked():  # a waiter's file, orphaned since
                self._close()
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if self._linked():
                break
            self._close()  # orphaned between the check and the flock: let go of it
        else:
            return False
        copy_fd = self._provider._open_fence_copy(self.name)
        try:
            self.fence = self._next_fence(copy_fd)
            self._held = True
            self._note = note
            self._write()  # the file first, then the copy: a crash between leaves the larger
            if copy_fd is not None:
                _write_copy(copy_fd, self.fence)
        finally:
            if copy_fd is not None:
                os.close(copy_fd)
        self._provider._held_fences[self.name] = self.fence
        self._unwait()
        self._provider._guard()
        return True

    async def wait(self, timeout: float) -> None:
        wakeups = self._provider._waiting_on()
        if wakeups is None:
            await asyncio.sleep(timeout)
            return
        if self._wake is None or self._wake[0] is not wakeups:
            self._wake = wakeups, wakeups.add(self.name)
            # Woken from now on: a release between the last try and now raised no
            # event for us, so try again at once.
            await asyncio.sleep(0)
            return
        event = self._wake[1]
        await wait_event(event, timeout)
        event.clear()

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
        except (PermissionError, OverflowError):
            pass
        return note

    async def set_note(self, note: str) -> None:
        check_lock_note(note)
        if self.held:
            self._note = note
            self._write()

    async def verify(self) -> bool:
        return self.held  # the kernel's lock, on the file still at the lock's path

    async def release(self, *, discard: bool = False) -> None:
        if discard and self.held:
            # The copy first: a crash between leaves the lock file's token, the larger.
            self._provider._discard_fence(self.name)
            with contextlib.suppress(OSError):
                os.unlink(self.name, dir_fd=self._provider._dir_fd())
        self._drop()

    # -- descriptors -------------------------------------------------------------------

    def _drop(self) -> None:
        """Close everything: the lock, if held, goes with the descriptor."""
        self._held = False
        self._unwait()
        self._close()

    def _unwait(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            self._provider._stop_waiting(self.name, wake)

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        forks.discard(self)
        self._provider._contenders.discard(self)
        if fd is not None:
            os.close(fd)  # the last descriptor of the open file: the flock goes with it

    def _forget(self) -> None:
        """In a forked child: close the copy, never `LOCK_UN` (the parent's lock)."""
        self._held = False
        self._wake = None
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
