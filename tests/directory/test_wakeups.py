"""Wake-ups: doorbells and the watchfiles thread."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncIPC

from .helpers import FAKE, FAST, Script, as_nobody, needs_root


async def test_doorbell_never_follows_a_symlink(ipc_dir: Path, until: Any, tmp_path: Path) -> None:
    import socket

    outside = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    outside.bind(str(tmp_path / "outside.sock"))
    outside.setblocking(False)
    try:
        async with AsyncIPC(ipc_dir, **FAST) as a, AsyncIPC(ipc_dir, **FAST) as b:
            os.symlink(tmp_path / "outside.sock", ipc_dir / "default" / "peers" / f"{FAKE}.sock")
            got: list[Any] = []
            b.on("e", got.append)
            await asyncio.sleep(0.1)  # the planted name is seen by the next refresh
            for i in range(5):
                await a.notify("e", i)
            await until(lambda: len(got) == 5)
            assert a.stats()["doorbells_sent"] > 0
        with pytest.raises(BlockingIOError):
            outside.recv(64)
    finally:
        outside.close()


async def test_watcher_that_cannot_start_falls_back_with_a_warning(
    ipc_dir: Path, until: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import watchfiles

    def no_inotify(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "inotify instance limit reached")

    monkeypatch.setattr(watchfiles, "watch", no_inotify)
    with caplog.at_level(logging.WARNING, logger="ivip_ipc_async"):
        async with (
            AsyncIPC(ipc_dir, rescan_interval=0.05) as a,
            AsyncIPC(ipc_dir, rescan_interval=0.05) as b,
        ):
            got: list[Any] = []
            b.on("e", got.append)
            await a.notify("e", 1)
            await until(lambda: got == [1])
            await until(lambda: a.stats()["watcher_restarts"] >= 1)
    assert "inotify instance limit" in caplog.text
    assert "falling back" in caplog.text


@needs_root
async def test_another_user_cannot_ring_a_doorbell(ipc: AsyncIPC, ipc_dir: Path) -> None:
    os.chmod(ipc_dir, 0o755)
    sock = next((ipc_dir / "default" / "peers").glob("*.sock"))
    result = as_nobody(
        f"""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.sendto(b"P", {str(sock)!r})
            print("ALLOWED")
        except PermissionError:
            print("denied")
        """
    )
    assert result.stdout.strip() == "denied", result.stderr


_COUNTING_RECEIVER = """
import asyncio, json, sys
from ivip_ipc_async import AsyncIPC

async def main():
    got = []
    done = asyncio.Event()
    async with AsyncIPC(sys.argv[1], rescan_interval=60) as ipc:
        def take(message):
            got.append(message)
            if message == "last":
                done.set()
        ipc.on("e", take)
        print(json.dumps({"ready": True}), flush=True)
        await done.wait()
        print(json.dumps({"received": len(got)}), flush=True)

asyncio.run(main())
"""


async def test_a_tight_notify_loop_rings_once_per_loop_iteration(ipc_dir: Path, until: Any) -> None:
    """A tight `await notify()` loop writes 64 times per loop iteration and rings
    a peer about once per iteration (each wake-up costs the reader ~35 us of
    CPU), and the last write is rung all the same: the reader, in its own
    process with the safety re-scan a minute away, gets every message."""
    receiver = Script(_COUNTING_RECEIVER, str(ipc_dir))
    try:
        assert receiver.line() == {"ready": True}
        async with AsyncIPC(ipc_dir, rescan_interval=60) as writer:
            await until(lambda: len(writer.stats()["peers"]) == 1)
            rung = writer.stats()["doorbells_sent"]
            started = time.monotonic()
            for i in range(20_000):
                await writer.notify("e", i)
            await writer.notify("e", "last")
            elapsed = time.monotonic() - started
            rings = writer.stats()["doorbells_sent"] - rung
            # One per iteration, plus one per 0.5 ms within an iteration. Before
            # (16 writes per iteration): ~1,250 rings in ~0.12 s.
            assert rings <= 20_001 / 64 + elapsed / 0.0005 + 2, (rings, elapsed)
            assert await asyncio.to_thread(receiver.line) == {"received": 20_001}
    finally:
        receiver.kill()


async def test_a_ring_that_finds_a_full_queue_is_rung_again(ipc_dir: Path, until: Any) -> None:
    """A doorbell whose queue is full drops the datagram; the pending ones may
    name an older segment, so the writer rings again until it is taken: a
    message in a new segment arrives without waiting for the safety re-scan."""
    async with AsyncIPC(ipc_dir) as writer, AsyncIPC(ipc_dir, rescan_interval=60) as reader:
        got: list[Any] = []
        reader.on("e", got.append)
        await writer.notify("e", 0)
        await until(lambda: got == [0])
        loop = asyncio.get_running_loop()
        bell = reader._backend._wakeups.bell  # type: ignore[union-attr]
        assert bell is not None
        loop.remove_reader(bell.fileno())  # the reader is busy: its queue fills
        sent = writer.stats()["doorbells_sent"]
        for i in range(1, 40):
            await writer.notify("e", i)
            await asyncio.sleep(0.001)  # each write rings (one ring per 0.5 ms at most)
        assert writer.stats()["doorbells_sent"] - sent < 39  # some found the queue full
        writer._backend._segments.rotate()  # type: ignore[union-attr]
        await writer.notify("e", "new segment")
        # Drain the stale datagrams the way a busy reader would, and read them.
        loop.add_reader(bell.fileno(), reader._backend._wakeups._on_doorbell)  # type: ignore[union-attr]
        await until(lambda: got[-1:] == ["new segment"], timeout=5)
        assert got == [*range(40), "new segment"]
