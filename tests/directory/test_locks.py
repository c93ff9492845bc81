"""The directory's locks across real processes: shared wake-ups, a tampered
`locks/` directory, and a deadline that lands with the release.

The other processes are `python -c HOLDER` children driven by lines on their
stdin (sync pipes with deadlines: the tests wait on them, never on a sleep).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncIPC
from ivip_ipc_async.backends.directory.inotify import LIBC
from ivip_ipc_async.errors import IPCError

needs_inotify = pytest.mark.skipif(LIBC is None, reason="inotify is Linux's")

# A process holding locks of `sys.argv[1]`'s namespace on command:
#   {"op": "acquire", "name": n}  -> {"held": bool, "fence": int}
#   {"op": "check", "name": n}    -> {"held": bool, "verified": bool}
#   {"op": "release", "name": n}  -> {"released": n}   ("*": every lock it holds)
HOLDER = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from ivip_ipc_async import AsyncIPC

    def say(**fields):
        os.write(1, json.dumps(fields).encode() + b"\\n")

    async def main():
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        async with AsyncIPC(sys.argv[1], doorbell=False) as ipc:
            locks = {}
            say(ready=os.getpid())
            while line := await stdin.readline():
                cmd = json.loads(line)
                op, name = cmd["op"], cmd.get("name")
                if op == "acquire":
                    lock = locks[name] = ipc.lock(name, poll_interval=30)
                    try:
                        await lock.acquire(timeout=cmd.get("timeout", 10))
                    except TimeoutError:
                        say(held=False, fence=0, timed_out=True)
                        continue
                    say(held=lock.held, fence=lock.fence)
                elif op == "acquire_many":
                    for i in range(cmd["n"]):
                        lock = locks[f"k{i}"] = ipc.lock(f"k{i}")
                        await lock.acquire(timeout=10)
                    say(held=cmd["n"])
                elif op == "check":
                    lock = locks[name]
                    say(held=lock.held, verified=await lock.verify())
                elif op == "release":
                    for key in list(locks) if name == "*" else [name]:
                        await locks.pop(key).release()
                    say(released=name)

    asyncio.run(main())
    """
)


class Child:
    """A Python program in its own process, reading lines and printing JSON lines."""

    def __init__(self, code: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )

    def line(self, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"no line from the holder within {timeout}s")
        text = self.proc.stdout.readline()
        if not text:
            raise AssertionError(f"the holder ended (exit {self.proc.wait()})")
        out: dict[str, Any] = json.loads(text)
        return out

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        return self.line()

    def end(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def holders(ipc_dir: Path) -> Iterator[Any]:
    """`holders()`: a started Holder process on `ipc_dir`, ended afterwards."""
    started: list[Child] = []

    def start() -> Child:
        started.append(Child(HOLDER, str(ipc_dir)))
        assert "ready" in started[-1].line()
        return started[-1]

    yield start
    for holder in started:
        holder.end()


def lock_path(ns: Path, name: str) -> Path:
    return ns / "default" / "locks" / f"u.{name}"


# -- item 5: every waiter of a process shares one inotify instance ---------------------------

_WAITERS = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from ivip_ipc_async import AsyncIPC

    def inotify_fds():
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
            except OSError:
                pass
        return n

    async def main():
        n = int(sys.argv[2])
        async with AsyncIPC(sys.argv[1], doorbell=False) as ipc:
            before = inotify_fds()
            # poll_interval=30: only a wake-up, never the timer, gets them the lock in time
            locks = [ipc.lock(f"k{i}", poll_interval=30) for i in range(n)]
            waiting = [asyncio.ensure_future(lock.acquire(timeout=60)) for lock in locks]
            # Trying and starting to wait never waits for I/O: a few loop turns suffice.
            for _ in range(50):
                await asyncio.sleep(0)
            assert not any(w.done() for w in waiting)
            print(json.dumps({"added": inotify_fds() - before}), flush=True)
            sys.stdin.readline()  # the holder released everything
            start = time.monotonic()
            await asyncio.gather(*waiting)
            print(json.dumps({"all_held_after": time.monotonic() - start,
                              "held": sum(lock.held for lock in locks),
                              "added": inotify_fds() - before}), flush=True)

    asyncio.run(main())
    """
)


@needs_inotify
def test_a_hundred_waiters_on_a_hundred_locks_add_one_inotify_instance(
    ipc_dir: Path, holders: Any
) -> None:
    """100 waiters on 100 locks held by another process: at most one more inotify
    descriptor in the waiting process (the per-user limit is often 128), and every
    waiter is still woken by the release, not by its 30 s timer."""
    holder = holders()
    assert holder.ask(op="acquire_many", n=100) == {"held": 100}
    waiters = Child(_WAITERS, str(ipc_dir), "100")
    try:
        assert waiters.line()["added"] <= 1
        assert holder.ask(op="release", name="*") == {"released": "*"}
        last = waiters.ask(op="go")
        assert last["held"] == 100
        assert last["all_held_after"] < 10  # woken by the releases (the timer: 30 s)
        assert last["added"] <= 1
    finally:
        waiters.end()


# -- item 6: the lock file removed, replaced, garbled, or something else planted ---------------


@pytest.mark.parametrize("how", ["unlink", "replace"])
def test_a_held_lock_whose_file_is_removed_is_never_held_twice(
    ipc_dir: Path, holders: Any, how: str
) -> None:
    """The lock file unlinked (or another file renamed over it) while held: when a
    second process takes the lock, the first no longer believes it holds it
    (`held` and `verify()` read False), and the new fence is larger."""
    first, second = holders(), holders()
    got = first.ask(op="acquire", name="a")
    assert got["held"]
    assert got["fence"] == 1
    path = lock_path(ipc_dir, "a")
    if how == "unlink":
        path.unlink()
    else:
        other = path.with_name("planted")
        other.write_bytes(b"")
        other.rename(path)
    taken = second.ask(op="acquire", name="a", timeout=10)
    assert taken["held"]
    assert first.ask(op="check", name="a") == {"held": False, "verified": False}
    assert taken["fence"] > got["fence"]
    assert second.ask(op="check", name="a") == {"held": True, "verified": True}
    # The first lets go of what it had: the second's holding is untouched.
    assert first.ask(op="release", name="a") == {"released": "a"}
    assert second.ask(op="check", name="a") == {"held": True, "verified": True}


def test_the_locks_directory_removed_under_a_holder(ipc_dir: Path, holders: Any) -> None:
    """`rm -rf locks/` under a holder: another process takes the lock in the new
    directory, the first no longer holds it, and still takes other locks (in the
    new directory, not the removed one it had open)."""
    first, second = holders(), holders()
    assert first.ask(op="acquire", name="a")["fence"] == 1
    shutil.rmtree(ipc_dir / "default" / "locks")
    taken = second.ask(op="acquire", name="a")
    assert taken["held"]
    assert taken["fence"] > 1  # from the copy of the fences, outside locks/
    assert first.ask(op="check", name="a") == {"held": False, "verified": False}
    assert first.ask(op="acquire", name="b")["held"]
    assert second.ask(op="acquire", name="b", timeout=0.2).get("timed_out")
    assert first.ask(op="acquire", name="a", timeout=0.2).get("timed_out")


def test_checking_a_lock_never_re_creates_a_removed_namespace(ipc_dir: Path, holders: Any) -> None:
    """The namespace removed (`rm -rf`) under a holder, which rejoins (re-creating
    the namespace, its log/ and peers/, never locks/): checking the lock held across
    the move reads False and creates nothing (before: `held` made the namespace and
    locks/ again, racing an `rm -rf` still under way); a new lock is taken in a new
    locks/ all the same."""
    holder = holders()
    assert holder.ask(op="acquire", name="a")["held"]
    ns = ipc_dir / "default"
    shutil.rmtree(ns)
    deadline = time.monotonic() + 10
    while not list((ns / "peers").glob("*.lock")):  # the holder rejoined
        assert time.monotonic() < deadline, "the holder did not rejoin"
        time.sleep(0.01)
    assert holder.ask(op="check", name="a") == {"held": False, "verified": False}
    assert not (ns / "locks").exists()
    assert holder.ask(op="acquire", name="b")["held"]
    assert (ns / "locks" / "u.b").is_file()


_GARBAGE = {
    "float": b"1e308",
    "string": b'"12"',
    "negative": b"-7",
    "list": b"[1, 2]",
    "float fence": b'{"pid": 1, "fence": 1e308, "note": ""}',
    "string fence": b'{"pid": 1, "fence": "12", "note": ""}',
    "negative fence": b'{"pid": 1, "fence": -7, "note": ""}',
    "list fence": b'{"pid": 1, "fence": [9], "note": ""}',
    "bool fence": b'{"pid": 1, "fence": true, "note": ""}',
    "smaller fence": b'{"pid": 1, "fence": 1, "note": ""}',
    "huge fence": b'{"pid": 1, "fence": 1' + b"0" * 40 + b', "note": ""}',
    "binary": b"\xff\xfe\x00garbage",
    "deep list": b"[" * 1023,  # RecursionError in json.loads, not a ValueError
    "deep object": b'{"a":' * 300,
    "empty": b"",
    "deleted": b"",
}


@pytest.mark.parametrize("damage", sorted(_GARBAGE))
def test_a_garbled_or_deleted_lock_file_never_sends_the_fence_back(
    ipc_dir: Path, holders: Any, damage: str
) -> None:
    """Three holdings (fences 1, 2, 3), then the free lock's file is overwritten with
    garbage or deleted: the next holder, in another process, still gets a fence
    larger than 3, and a fence a 64-bit store can keep."""
    first, second = holders(), holders()
    for fence in (1, 2, 3):
        assert first.ask(op="acquire", name="a")["fence"] == fence
        first.ask(op="release", name="a")
    path = lock_path(ipc_dir, "a")
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(_GARBAGE[damage])
    got = second.ask(op="acquire", name="a")
    assert got["held"]
    assert 3 < got["fence"] < 2**63


@pytest.mark.parametrize("planted", ["directory", "fifo", "symlink", "socket"])
async def test_something_else_planted_at_a_lock_path_is_a_clear_error(
    ipc_dir: Path, planted: str
) -> None:
    """A directory, FIFO, symlink or socket where a lock file belongs: an IPCError
    naming the path, at once (never a raw IsADirectoryError, never a hang)."""
    import socket

    async with AsyncIPC(ipc_dir, doorbell=False) as ipc:
        lock = ipc.lock("a", poll_interval=30)
        await ipc.lock("b").try_acquire()  # the namespace and its locks/ exist
        path = lock_path(ipc_dir, "a")
        server = None
        if planted == "directory":
            path.mkdir()
        elif planted == "fifo":
            os.mkfifo(path)
        elif planted == "symlink":
            target = ipc_dir / "elsewhere"
            target.write_bytes(b"")
            path.symlink_to(target)
        else:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(path))
        try:
            for attempt in (lock.try_acquire, lambda: lock.acquire(timeout=5)):
                with pytest.raises(IPCError, match=str(path)):
                    await asyncio.wait_for(attempt(), 5)
        finally:
            if server is not None:
                server.close()
        assert not lock.held


# -- item 3: a deadline that lands in the same loop iteration as the release --------------------


@needs_inotify
@pytest.mark.parametrize("trial", range(2))
@pytest.mark.parametrize("deadline_of", ["asyncio.timeout", "acquire(timeout=)"])
async def test_a_deadline_landing_with_the_release_is_never_swallowed(
    ipc_dir: Path, holders: Any, deadline_of: str, trial: int
) -> None:
    """A waiter inside `asyncio.timeout_at(deadline)` (or `acquire(timeout=)`,
    whose deadline is a moment after the one noted); another process releases,
    and the event loop is held until the deadline has passed, so the release's
    inotify event and the deadline are handled in the same loop iteration. The
    deadline must win: TimeoutError, and the lock is not held (on Python 3.11
    `asyncio.wait_for` returned the woken wait and dropped the cancellation)."""
    holder = holders()
    assert holder.ask(op="acquire", name="a")["held"]
    async with AsyncIPC(ipc_dir, doorbell=False) as ipc:
        lock = ipc.lock("a", poll_interval=30)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0

        async def wait() -> None:
            if deadline_of == "asyncio.timeout":
                async with asyncio.timeout_at(deadline):
                    await lock.acquire(timeout=None)
            else:
                await lock.acquire(timeout=deadline - loop.time())

        waiting = asyncio.ensure_future(wait())
        for _ in range(50):  # trying and starting to wait never waits for I/O
            await asyncio.sleep(0)
        assert not waiting.done()

        def release_then_hold_the_loop() -> None:
            assert holder.ask(op="release", name="a") == {"released": "a"}
            while loop.time() <= deadline + 0.05:  # the release's event is queued meanwhile
                time.sleep(0.001)

        loop.call_at(deadline - 0.5, release_then_hold_the_loop)
        with pytest.raises(TimeoutError):
            await waiting
        assert not lock.held
        # The lock was let go: the holder process takes it again at once.
        assert holder.ask(op="acquire", name="a", timeout=5)["held"]
