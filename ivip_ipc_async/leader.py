"""Leader election among the processes of one namespace, and jobs that run once.

One process at a time leads a name: it holds an `flock` on
`<namespace>/leaders/<name>.lock` in the shared directory. The kernel releases
the lock when the leader dies, however it dies (even `kill -9`), and a waiting
follower takes over. Nothing blocks the event loop: the lock is only ever tried
with `LOCK_NB`. A follower retries when told to look again, and on a timer (the
safety net, every `poll_interval` seconds). It is told by two hints: the
leader's process ending (a pidfd on the event loop, Linux 5.3+) and a leader
letting go (an event on the IPC).

Two tools:

* `run_once(ipc, name, job)`: start-up jobs (migrations, warming a cache) that
  must run in one worker of a fleet, while the others wait until it is done.
* `Leadership(ipc, name)`: work that must keep running in exactly one process
  (a scheduler), handed over when that process dies.

Example:
    >>> import asyncio, tempfile
    >>> from ivip_ipc_async import AsyncIPC
    >>> async def main():
    ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
    ...         ran = []
    ...         async def migrate():
    ...             ran.append("migrated")
    ...         first = await run_once(ipc, "migrations", migrate)
    ...         again = await run_once(ipc, "migrations", migrate)  # done: not again
    ...         return first, again, ran
    >>> asyncio.run(main())
    (True, False, ['migrated'])
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
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from .backends.directory import secure_directory
from .errors import UnsafeDirectoryError
from .ipc import AsyncIPC
from .logs import logger

__all__ = ["Leadership", "run_once"]

_NAME: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")
_SUBDIR: Final = "leaders"
_RECORD_SIZE: Final = 256  # the lock file's content: one JSON object, space-padded
_LOCK_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

# Leaderships holding a lock file open in this process. A child forked without
# exec must not keep a parent's lock alive after the parent dies: it closes its
# copies (closing is not LOCK_UN: the parent keeps the lock while it lives).
_open_here: weakref.WeakSet[Leadership] = weakref.WeakSet()
# Leaderships won by `run_once`: kept for the life of the process.
_kept: list[Leadership] = []


def _after_fork_in_child() -> None:
    for leadership in list(_open_here):
        leadership._forget_after_fork()
    _kept.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Leadership:
    """The leadership of `name` among the processes sharing `ipc`'s directory.

    At most one `Leadership` of a name leads at a time, across processes and
    within one (each object opens the lock file itself). The lock is the kernel's:
    released when the leader lets go, closes, or dies.

    Args:
        ipc: An `AsyncIPC` on the shared-directory backend; started if it is not.
        name: What is led, e.g. "scheduler": 1-100 letters, digits, `.`, `_`, `-`.
        poll_interval: Seconds between tries while waiting to lead. Hints (the
            leader's death, a release) usually wake a follower sooner.

    Example:
        >>> import asyncio, tempfile
        >>> from ivip_ipc_async import AsyncIPC
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         first, second = Leadership(ipc, "jobs"), Leadership(ipc, "jobs")
        ...         got = await first.try_acquire(), await second.try_acquire()
        ...         first.release()
        ...         await second.acquire(timeout=5)
        ...         return got, first.is_leader, second.is_leader
        >>> asyncio.run(main())
        ((True, False), False, True)

        Work that must run in one process only, handed over when it dies::

            async with Leadership(ipc, "scheduler"):   # waits until this process leads
                while True:
                    await run_due_jobs()
                    await asyncio.sleep(60)
    """

    def __init__(self, ipc: AsyncIPC, name: str, *, poll_interval: float = 1.0) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"invalid leadership name {name!r}: use 1-100 letters, digits, '.', '_' "
                "and '-', not starting with '.' or '-'"
            )
        if not poll_interval > 0:
            raise ValueError("poll_interval must be positive")
        self.ipc = ipc
        self.name = name
        self.poll_interval = poll_interval
        self._fd: int | None = None
        self._leading = False

    def __repr__(self) -> str:
        state = "leading" if self._leading else "following"
        return f"<Leadership {self.name!r} {state}>"

    @property
    def is_leader(self) -> bool:
        """True while this object holds the leadership."""
        return self._leading

    @property
    def _event(self) -> str:
        return f"ivip:leader:{self.name}"

    # -- taking and letting go -------------------------------------------------------

    async def try_acquire(self) -> bool:
        """Take the leadership if it is free, without waiting; True when held.

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         leadership = Leadership(ipc, "once")
            ...         return await leadership.try_acquire(), await leadership.try_acquire()
            >>> asyncio.run(main())
            (True, True)
        """
        if self._leading:
            return True
        fd = await self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._leading = True
        self._write_record(done=False)
        return True

    async def acquire(self, timeout: float | None = None) -> None:
        """Wait until this object leads; `TimeoutError` after `timeout` seconds.

        Never blocks the event loop: the lock is tried again when a hint says the
        leader may be gone, and every `poll_interval` seconds in any case.
        """
        try:
            async with asyncio.timeout(timeout), self._watch() as look:
                while not await self.try_acquire():
                    await look(self._holder_pid())
        finally:
            if not self._leading:
                self.release()  # close the lock file: nothing is held

    def release(self) -> None:
        """Let go: a waiting follower takes over. Safe to repeat.

        `async with` (or `run_once`) also tells the followers at once; after a
        bare `release()` they notice at their next try.
        """
        self._leading = False
        fd, self._fd = self._fd, None
        _open_here.discard(self)
        if fd is not None:
            os.close(fd)  # the last descriptor of the open file: the flock goes with it

    async def __aenter__(self) -> Leadership:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        was_leading = self._leading
        self.release()
        if was_leading:
            await self._tell_followers()

    # -- the lock file ---------------------------------------------------------------------

    async def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        directory = await _namespace_directory(self.ipc)
        root = secure_directory(directory)
        try:
            leaders = secure_directory(_SUBDIR, dir_fd=root)
        finally:
            os.close(root)
        path = directory / _SUBDIR / f"{self.name}.lock"
        try:
            fd = os.open(f"{self.name}.lock", _LOCK_FLAGS, 0o600, dir_fd=leaders)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeDirectoryError(f"refusing {str(path)!r}: it is a symlink") from None
            raise
        finally:
            os.close(leaders)
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "it is not a regular file"
        elif st.st_uid != os.geteuid():
            problem = f"it is owned by uid {st.st_uid}, not by this user"
        if problem:
            os.close(fd)
            raise UnsafeDirectoryError(f"refusing {str(path)!r}: {problem}")
        self._fd = fd
        _open_here.add(self)
        return fd

    def _write_record(self, *, done: bool) -> None:
        """Say who leads (a hint for followers) and whether its `run_once` job is done."""
        if self._fd is None:
            return
        info = {"pid": os.getpid(), "since": time.time(), "done": done}
        data = json.dumps(info).encode().ljust(_RECORD_SIZE - 1) + b"\n"
        try:
            os.pwrite(self._fd, data, 0)  # one small write at offset 0: no truncation race
        except OSError as exc:  # only a hint is lost; the lock is the truth
            logger.warning("could not write leadership record of %r: %s", self.name, exc)

    def _read_record(self) -> dict[str, Any]:
        if self._fd is None:
            return {}
        try:
            info = json.loads(os.pread(self._fd, _RECORD_SIZE, 0))
        except (OSError, ValueError):  # empty, or read while being written: no hint
            return {}
        return info if isinstance(info, dict) else {}

    def _holder_pid(self) -> int | None:
        pid = self._read_record().get("pid")
        return pid if isinstance(pid, int) and pid > 0 and pid != os.getpid() else None

    def _holder_done(self) -> bool:
        return self._read_record().get("done") is True

    def _forget_after_fork(self) -> None:
        fd, self._fd = self._fd, None
        self._leading = False
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # never LOCK_UN here: that would release the parent's lock

    # -- waiting -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _watch(self) -> AsyncIterator[Callable[[int | None], Awaitable[None]]]:
        """While waiting: `await look(pid)` returns when it is worth trying again.

        Wakes on an IPC event about this name, when process `pid` (the leader, as
        its record says) ends, or after `poll_interval` seconds.
        """
        wake = asyncio.Event()
        sub = self.ipc.on(self._event, lambda _message: wake.set())
        ending = _EndWatch(asyncio.get_running_loop(), wake.set)

        async def look(pid: int | None) -> None:
            ending.watch(pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.poll_interval)
            wake.clear()

        try:
            yield look
        finally:
            sub.stop()
            ending.close()

    async def _tell_followers(self, done: bool = False) -> None:
        if not self.ipc.started:
            return  # never restart an IPC that was shut down; followers poll anyway
        try:
            await self.ipc.notify(self._event, {"done": done}, include_self=True)
        except Exception as exc:  # a hint: followers still poll
            logger.warning("could not tell followers of %r: %s", self.name, exc)


class _EndWatch:
    """Calls `wake()` once when process `pid` ends: a pidfd on the event loop.

    A pidfd stays readable after the process ended, so the reader is removed
    when it fires, and the same pid is not watched twice (a stale record, or a
    pid from another pid namespace, must not make the loop spin).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], object]) -> None:
        self._loop = loop
        self._wake = wake
        self._pid: int | None = None
        self._fd: int | None = None

    def watch(self, pid: int | None) -> None:
        if pid is None or pid == self._pid:
            return
        self.close()
        self._pid = pid
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is None:
            return
        try:
            self._fd = pidfd_open(pid)
        except OSError:  # gone already (its lock may not be free yet), or no support
            return
        self._loop.add_reader(self._fd, self._fired)

    def _fired(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
        self._wake()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self._loop.remove_reader(fd)
            os.close(fd)


async def _namespace_directory(ipc: AsyncIPC) -> Path:
    await ipc.start()
    path = getattr(ipc._backend, "path", None)
    if not isinstance(path, Path):
        raise TypeError(
            "leader election needs the shared-directory backend "
            f"(this AsyncIPC uses {type(ipc._backend).__name__})"
        )
    return path


async def run_once(
    ipc: AsyncIPC,
    name: str,
    job: Callable[[], Awaitable[Any]],
    *,
    timeout: float | None = None,
    poll_interval: float = 1.0,
) -> bool:
    """Run `job` in one living process of the namespace; the others wait until it is done.

    Every worker of a fleet calls it at start-up; one of them (the leader of
    `name`) runs `job()`, and the call returns in the others once the job has
    finished. The leader keeps the leadership for the rest of its life, so a
    worker that starts or restarts later returns False at once, without running
    the job again. Returns True in the process that ran `job` (this call).

    If the leader dies before `job` finishes, or `job` raises there, a waiting
    process takes over and runs it. If the leader dies *after* the job, the next
    process to call `run_once` (a restarted worker, a new deployment) runs it
    again: jobs must be idempotent, as migrations and cache warm-ups are.

    Args:
        ipc: An `AsyncIPC` on the shared-directory backend (started if not).
        name: The job's name (as for `Leadership`).
        job: An async callable with no arguments.
        timeout: Seconds to wait for another process's job; `TimeoutError` after.
        poll_interval: Seconds between tries while waiting (see `Leadership`).

    Raises:
        TimeoutError: waited longer than `timeout` for another process's job.
        Exception: whatever `job` raised, in the process that ran it (the
            leadership is released first, so another process may try).

    Example:
        >>> import asyncio, tempfile
        >>> from ivip_ipc_async import AsyncIPC
        >>> async def main():
        ...     path = tempfile.mkdtemp()
        ...     async with AsyncIPC(path) as one, AsyncIPC(path) as two:
        ...         async def warm_up():
        ...             await asyncio.sleep(0.05)
        ...         return await asyncio.gather(
        ...             run_once(one, "warm-up", warm_up), run_once(two, "warm-up", warm_up)
        ...         )
        >>> sorted(asyncio.run(main()))  # one ran it, the other waited for it
        [False, True]
    """
    leadership = Leadership(ipc, name, poll_interval=poll_interval)
    try:
        async with asyncio.timeout(timeout), leadership._watch() as look:
            while not await leadership.try_acquire():
                if leadership._holder_done():
                    return False  # done by the living leader
                await look(leadership._holder_pid())
    finally:
        if not leadership.is_leader:
            leadership.release()  # close the lock file: nothing is held
    try:
        await job()
    except BaseException as exc:
        leadership.release()
        if isinstance(exc, Exception):
            await leadership._tell_followers()
        raise
    leadership._write_record(done=True)
    _kept.append(leadership)
    await leadership._tell_followers(done=True)
    return True
