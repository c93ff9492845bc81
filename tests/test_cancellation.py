"""A cancellation that lands with a wake-up is never lost (issue #20, item 3).

A waiter for a lock, a leadership or a message, inside `asyncio.timeout(...)`:
when the other process's release (or message) and the deadline land in the
same loop iteration, 3.11's `asyncio.wait_for` returned the wait's result and
swallowed the cancellation: the waiter came back holding the lock, and the
`TimeoutError` was lost.

Made deterministic, not timed: a loop callback makes the other process release
(blocking until it has), so its wake-up is already on its way to this process;
then the deadline is moved to "now" after `hops` more loop iterations. Every
`hops` from 0 to 7 is tried, so whichever iteration the wake-up is handled in,
one round puts the deadline in it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ivip_ipc_async import AsyncIPC, Leadership

from .test_backends import Make, make, medium  # noqa: F401 - the parametrized fixtures

OTHER = textwrap.dedent(
    """
    import asyncio, os, sys
    from ivip_ipc_async import AsyncIPC
    from ivip_ipc_async import Leadership

    medium = sys.argv[1]

    def make():
        if "#" in medium:
            url, namespace = medium.split("#")
            return AsyncIPC(url, namespace=namespace)
        return AsyncIPC(medium)

    async def main():
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        async with make() as ipc:
            held = None
            os.write(1, b"ready\\n")
            while line := await stdin.readline():
                op = line.decode().strip()
                if op == "lock":
                    held = ipc.lock("race", lease=30)
                    await held.acquire()
                elif op == "lead":
                    held = Leadership(ipc, "race", lease=30)
                    await held.acquire()
                elif op == "release":
                    await held.release()
                elif op == "notify":
                    await ipc.notify("ping", 1)
                os.write(1, b"ok\\n")

    asyncio.run(main())
    """
)


class Other:
    """The other process, driven with blocking pipes: a loop callback can make it
    act and wait until it has."""

    def __init__(self, where: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", OTHER, where],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.read() == b"ready"

    def read(self) -> bytes:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the other process exited"
        return line.strip()

    def do(self, op: str) -> None:
        """Blocking: returns once the other process has done `op`."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(op.encode() + b"\n")
        self.proc.stdin.flush()
        assert self.read() == b"ok"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def other(medium: str) -> Iterator[Callable[[], Other]]:  # noqa: F811
    made: list[Other] = []

    def spawn() -> Other:
        made.append(Other(medium))
        return made[-1]

    yield spawn
    for proc in made:
        proc.close()


class Deadline:
    """`asyncio.timeout(None)` around a wait, whose deadline a callback sets, and
    whose `TimeoutError` is kept (`timed_out`) rather than raised."""

    def __init__(self) -> None:
        self.cm = asyncio.timeout(None)
        self.active = False
        self.timed_out = False

    async def __aenter__(self) -> Deadline:
        await self.cm.__aenter__()
        self.active = True
        return self

    async def __aexit__(self, *exc: Any) -> bool:
        self.active = False
        try:
            await self.cm.__aexit__(*exc)
        except TimeoutError:
            self.timed_out = True
            return True
        return False

    @property
    def expired(self) -> bool:
        return self.cm.expired()

    def expire_after(self, hops: int) -> None:
        """Make the deadline due `hops` loop iterations from now."""
        loop = asyncio.get_running_loop()
        if hops:
            loop.call_soon(self.expire_after, hops - 1)
        elif self.active:
            self.cm.reschedule(loop.time())


def act_then_expire(other: Other, op: str, deadline: Deadline, hops: int) -> None:
    """From a loop callback: `other` does `op` now (this loop is blocked meanwhile,
    so its wake-up is pending here when the loop goes on), then the deadline is
    made due `hops` loop iterations later."""
    other.do(op)
    time.sleep(0.02)  # a notice sent over TCP (Redis) is in this process's socket
    deadline.expire_after(hops)


async def race(wait: Callable[[], Any], other: Other, op: str, hops: int) -> Deadline:
    """Run `wait()` inside a deadline; `op` and the deadline land together."""
    loop = asyncio.get_running_loop()
    async with Deadline() as deadline:
        loop.call_later(0.1, act_then_expire, other, op, deadline, hops)
        await wait()
    return deadline


HOPS = range(8)


@pytest.mark.parametrize("kind", ["lock", "lead"])
async def test_a_lock_wait_cancelled_as_the_lock_is_released_raises_timeout(
    kind: str,
    make: Make,  # noqa: F811
    other: Callable[[], Other],
) -> None:
    ipc = await make().start()
    holder = other()
    lost: list[int] = []
    for hops in HOPS:
        await asyncio.to_thread(holder.do, kind)  # the other process holds the lock
        waiter: Any = (
            ipc.lock("race", lease=30, poll_interval=60)
            if kind == "lock"
            else Leadership(ipc, "race", lease=30, poll_interval=60)
        )
        deadline = await race(waiter.acquire, holder, "release", hops)
        held = waiter.held
        if deadline.expired and not deadline.timed_out:
            lost.append(hops)  # the deadline passed, yet the wait returned (with the lock)
        assert held is not deadline.timed_out
        await waiter.release()
    assert lost == []


async def test_wait_for_cancelled_as_the_message_arrives_raises_timeout(
    make: Make,  # noqa: F811
    other: Callable[[], Other],
) -> None:
    ipc: AsyncIPC = await make().start()
    sender = other()
    lost: list[int] = []
    for hops in HOPS:
        got: list[Any] = []

        async def wait(got: list[Any] = got) -> None:
            got.append(await ipc.wait_for("ping", timeout=30))

        deadline = await race(wait, sender, "notify", hops)
        if deadline.expired and not deadline.timed_out:
            lost.append(hops)  # the deadline passed, yet the wait returned the message
        assert bool(got) is not deadline.timed_out
    assert lost == []


# The directory's lock waiter is reworked by another change (issue #20, item 5),
# which takes this wait with it: drop the exception when both are merged.


def test_no_asyncio_wait_for_left_in_the_library() -> None:
    """Every wait goes through ivip_ipc_async.waiting (3.11's wait_for loses
    cancellations)."""
    root = os.path.join(os.path.dirname(__file__), "..", "ivip_ipc_async")
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py") and name != "waiting.py":
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    if "asyncio.wait_for(" in f.read():
                        found.append(os.path.relpath(path, root))
    assert found == []
