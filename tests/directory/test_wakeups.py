"""Wake-ups: doorbells, and the watcher (inotify on the loop, or the watchfiles thread)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncIPC
from ivip_ipc_async.backends.directory import inotify, watcher

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


@pytest.mark.parametrize("watchfiles_too", [False, True])
async def test_watcher_that_cannot_start_falls_back_with_a_warning(
    ipc_dir: Path,
    until: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    watchfiles_too: bool,
) -> None:
    """Out of inotify instances: the watchfiles thread is tried instead; when it
    cannot start either, delivery goes on through doorbells and re-scans, and
    the watcher is restarted with backoff."""
    import watchfiles

    def no_inotify(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "inotify instance limit reached")

    monkeypatch.setattr(watcher, "open_inotify", no_inotify)
    if watchfiles_too:
        monkeypatch.setattr(watchfiles, "watch", no_inotify)
    with caplog.at_level(logging.WARNING, logger="ivip_ipc_async"):
        async with (
            AsyncIPC(ipc_dir, rescan_interval=0.05) as a,
            AsyncIPC(ipc_dir, rescan_interval=0.05) as b,
        ):
            assert a.stats()["watcher"] == "watchfiles"
            got: list[Any] = []
            b.on("e", got.append)
            await a.notify("e", 1)
            await until(lambda: got == [1])
            if watchfiles_too:
                await until(lambda: a.stats()["watcher_restarts"] >= 1)
            else:
                assert a.stats()["watcher_alive"]
    assert "inotify instance limit" in caplog.text
    assert ("falling back" in caplog.text) is watchfiles_too


async def test_a_loop_that_cannot_watch_a_descriptor_gets_the_watchfiles_thread(
    ipc_dir: Path, until: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event loop whose `add_reader` is not implemented for the inotify fd:
    the watchfiles thread watches instead (here the only wake-up: no doorbell)."""
    loop = asyncio.get_running_loop()
    add_reader = loop.add_reader

    def no_inotify_reader(fd: int, callback: Any, *args: Any) -> None:
        if getattr(callback, "__name__", "") == "_on_inotify":
            raise NotImplementedError
        add_reader(fd, callback, *args)

    monkeypatch.setattr(loop, "add_reader", no_inotify_reader)
    async with (
        AsyncIPC(ipc_dir, rescan_interval=60, watch_step=20) as writer,
        AsyncIPC(ipc_dir, rescan_interval=60, watch_step=20, doorbell=False) as reader,
    ):
        assert reader.stats()["watcher"] == "watchfiles"
        got: list[Any] = []
        reader.on("e", got.append)
        await writer.notify("e", 1)
        await until(lambda: got == [1], timeout=5)


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
        bell = reader.medium.backend._doorbell.bell  # type: ignore[union-attr]
        assert bell is not None
        loop.remove_reader(bell.fileno())  # the reader is busy: its queue fills
        sent = writer.stats()["doorbells_sent"]
        for i in range(1, 40):
            await writer.notify("e", i)
            await asyncio.sleep(0.001)  # each write rings (one ring per 0.5 ms at most)
        assert writer.stats()["doorbells_sent"] - sent < 39  # some found the queue full
        writer.medium.backend._segments.rotate()  # type: ignore[union-attr]
        await writer.notify("e", "new segment")
        # Drain the stale datagrams the way a busy reader would, and read them.
        loop.add_reader(bell.fileno(), reader.medium.backend._doorbell._on_doorbell)  # type: ignore[union-attr]
        await until(lambda: got[-1:] == ["new segment"], timeout=5)
        assert got == [*range(40), "new segment"]


# -- the watcher: inotify on the event loop, watchfiles as the fallback ----------------------

_INOTIFY = sys.platform == "linux"
needs_inotify = pytest.mark.skipif(not _INOTIFY, reason="inotify is Linux's")

# A peer in its own process, without doorbells: it joins, writes one message, and
# waits. Only a watcher of log/ tells the others (their re-scan is an hour away).
_JOINER = """
    import asyncio, json, sys
    from ivip_ipc_async import AsyncIPC

    async def main() -> None:
        async with AsyncIPC(sys.argv[1], doorbell=False, rescan_interval=3600) as ipc:
            await ipc.notify("e", "joined")
            print(json.dumps({"peer": ipc.stats()["peer"]}), flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
"""

_SLOW = {"doorbell": False, "rescan_interval": 3600}


def _watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ivip-ipc-watch"]


@pytest.mark.parametrize("watcher", ["default", "watchfiles"])
async def test_a_peer_joining_is_noticed_by_the_watcher(
    ipc_dir: Path, until: Any, scripts: list[Script], monkeypatch: pytest.MonkeyPatch, watcher: str
) -> None:
    """Doorbells off and no re-scan for an hour: the watcher alone notices a new
    peer's segment. By default on Linux that is inotify on the event loop, with no
    thread; IVIP_IPC_WATCHER=watchfiles selects the watchfiles thread."""
    if watcher == "watchfiles":
        monkeypatch.setenv("IVIP_IPC_WATCHER", "watchfiles")
    before = set(threading.enumerate())
    async with AsyncIPC(ipc_dir, **_SLOW) as ipc:
        got: list[Any] = []
        ipc.on("e", got.append)
        stats = ipc.stats()
        assert stats["watcher_alive"]
        if watcher == "watchfiles" or not _INOTIFY:
            assert stats["watcher"] == "watchfiles"
            assert len(_watch_threads()) == 1
        else:
            assert stats["watcher"] == "inotify"
            assert set(threading.enumerate()) == before  # no thread at all
        joiner = Script(_JOINER, str(ipc_dir))
        scripts.append(joiner)
        peer = joiner.line()["peer"]
        await until(lambda: got == ["joined"], timeout=10)
        assert ipc.stats()["watch_events"] > 0
        assert peer in ipc.stats()["peers"]
    assert not _watch_threads()


async def test_an_unknown_watcher_name_warns_and_uses_the_default(
    ipc_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("IVIP_IPC_WATCHER", "kqueue")
    with caplog.at_level(logging.WARNING, logger="ivip_ipc_async"):
        async with AsyncIPC(ipc_dir) as ipc:
            assert ipc.stats()["watcher"] == ("inotify" if _INOTIFY else "watchfiles")
    assert "IVIP_IPC_WATCHER" in caplog.text


@needs_inotify
async def test_destroy_is_prompt_and_leaves_no_inotify_fd(ipc_dir: Path) -> None:
    """No thread to wait for: destroy() does not wait for a watchfiles step (set
    to 2 s here, the thread's worst case)."""
    ipc = AsyncIPC(ipc_dir, watch_step=2000)
    await ipc.start()
    # This instance's own fd (a watchfiles thread of an earlier test may close
    # its own at any moment, so the process's count says nothing).
    fd = ipc.medium.backend._watcher._inotify  # type: ignore[union-attr]
    assert fd is not None
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
    loop = asyncio.get_running_loop()
    started = loop.time()
    await ipc.destroy()
    assert loop.time() - started < 0.5
    with contextlib.suppress(FileNotFoundError):  # closed; or reused, then not for inotify
        assert os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify"


# The start of a child script that counts its inotify descriptors.
_COUNTS_INOTIFY_FDS = """
    import asyncio, json, os, sys

    from ivip_ipc_async import AsyncIPC

    def inotify_fds() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
            except OSError:
                pass
        return n
"""

_FORKER = (
    _COUNTS_INOTIFY_FDS
    + """

    async def main() -> None:
        async with AsyncIPC(sys.argv[1], doorbell=False, rescan_interval=3600) as ipc:
            got = []
            ipc.on("e", got.append)
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: only the at-fork hooks run, then it tells and ends
                os.write(write, str(inotify_fds()).encode())
                os._exit(0)
            os.waitpid(pid, 0)
            child = int(os.read(read, 100))
            print(json.dumps({"child_inotify_fds": child, "mine": inotify_fds()}), flush=True)
            while not got:
                await asyncio.sleep(0.01)
            print(json.dumps({"got": got}), flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
"""
)


@needs_inotify
async def test_a_forked_child_does_not_break_the_parents_watcher(
    ipc_dir: Path, scripts: list[Script]
) -> None:
    """The child closes its copy of the inotify fd without touching the parent's
    event loop (its epoll instance is shared with the child): the parent still
    notices a peer joining without doorbells."""
    forker = Script(_FORKER, str(ipc_dir))
    scripts.append(forker)
    assert forker.line() == {"child_inotify_fds": 0, "mine": 1}
    async with AsyncIPC(ipc_dir, **_SLOW) as joiner:
        await joiner.notify("e", "hello")
        assert forker.line() == {"got": ["hello"]}


_ENDED = (
    _COUNTS_INOTIFY_FDS
    + """

    async def main() -> None:
        ipc = AsyncIPC(sys.argv[1])
        await ipc.start()
        print(json.dumps({"running": inotify_fds()}), flush=True)

    asyncio.run(main())  # ends without destroy()
    print(json.dumps({"ended": inotify_fds()}), flush=True)
"""
)


@needs_inotify
async def test_an_event_loop_ending_without_destroy_closes_the_inotify_fd(
    ipc_dir: Path, scripts: list[Script]
) -> None:
    ended = Script(_ENDED, str(ipc_dir))
    scripts.append(ended)
    assert ended.line() == {"running": 1}
    assert ended.line() == {"ended": 0}


@needs_inotify
async def test_an_inotify_watcher_that_fails_is_restarted(
    ipc_dir: Path,
    until: Any,
    scripts: list[Script],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Reading the inotify fd raised: a warning, delivery goes on through re-scans,
    and the supervisor starts a new watcher (counted in `watcher_restarts`)."""
    real = watcher.read_events
    failures = 0

    def flaky(fd: int) -> Any:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise OSError(errno.EIO, "injected")
        return real(fd)

    monkeypatch.setattr(watcher, "read_events", flaky)
    with caplog.at_level(logging.WARNING, logger="ivip_ipc_async"):
        async with AsyncIPC(ipc_dir, doorbell=False, rescan_interval=0.05) as ipc:
            got: list[Any] = []
            ipc.on("e", got.append)
            (ipc_dir / "default" / "peers" / "x.sock").touch()  # an event: the read fails
            await until(lambda: ipc.stats()["watcher_restarts"] == 1)
            await until(lambda: ipc.stats()["watcher_alive"])
            assert ipc.stats()["watcher"] == "inotify"
            seen = ipc.stats()["watch_events"]
            joiner = Script(_JOINER, str(ipc_dir))
            scripts.append(joiner)
            joiner.line()
            await until(lambda: got == ["joined"])
            # The re-scans alone would deliver it: the new watcher saw the joiner.
            await until(lambda: ipc.stats()["watch_events"] > seen)
    assert "injected" in caplog.text


def test_inotify_records_are_parsed_robustly() -> None:
    """Whole records, a name that is not UTF-8, the overflow signal, and a
    record cut short (never from the kernel; treated as an overflow)."""
    in_create, in_q_overflow = 0x100, 0x4000

    def record(wd: int, mask: int, name: bytes) -> bytes:
        padded = name + b"\0" * (-len(name) % 16 or (16 if name else 0))
        return struct.pack("iIII", wd, mask, 0, len(padded)) + padded

    data = record(1, in_create, b"a.sock") + record(2, in_create, b"caf\xe9.seg")
    data += record(-1, in_q_overflow, b"")
    events = inotify.parse_events(data)
    assert events == [
        (1, in_create, "a.sock"),
        (2, in_create, os.fsdecode(b"caf\xe9.seg")),
        (-1, in_q_overflow, ""),
    ]
    cut = inotify.parse_events(record(1, in_create, b"a.sock")[:20])
    assert cut == [(-1, in_q_overflow, "")]


async def test_a_forged_doorbell_datagram_costs_only_itself(
    ipc_dir: Path, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A datagram of the right length whose segment number is not digits (or
    whose peer is not hex) is ignored, without an error: the datagrams queued
    behind it are still taken, and the read they ask for happens (the re-scan
    is a minute away)."""
    import socket

    async with (
        AsyncIPC(ipc_dir, rescan_interval=60) as writer,
        AsyncIPC(ipc_dir, rescan_interval=60) as reader,
    ):
        got: list[Any] = []
        reader.on("e", got.append)
        await writer.notify("e", 0)
        await until(lambda: got == [0])
        loop = asyncio.get_running_loop()
        bell = reader.medium.backend._doorbell.bell  # type: ignore[union-attr]
        assert bell is not None
        loop.remove_reader(bell.fileno())  # queue the datagrams, then take them at once
        peer = writer.medium.backend.peer.encode()  # type: ignore[union-attr]
        forger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            forger.connect(bell.getsockname())
            forger.send(b"S" + peer + b"12x45678")  # a known peer, not a segment number
            forger.send(b"S" + peer + b"-0000001")
            forger.send(b"S" + b"\xff" * 16 + b"00000001")  # not a peer id
            writer.medium.backend._doorbell.ring = lambda: None  # type: ignore[union-attr,method-assign]
            await writer.notify("e", 1)  # written, not rung: only the real ring below says so
            forger.send(b"S" + peer + b"%08d" % 1)
        finally:
            forger.close()
        with caplog.at_level(logging.WARNING):
            loop.add_reader(bell.fileno(), reader.medium.backend._doorbell._on_doorbell)  # type: ignore[union-attr]
            await until(lambda: got == [0, 1], timeout=5)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_planted_segment_name_with_other_digits_costs_only_itself(
    ipc_dir: Path, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """`<peer>-<8 digits>.seg` means ASCII digits: a name with other Unicode
    digits (or a trailing newline) planted in log/ is not a segment. Before, the
    watcher's callback raised on it (an asyncio error log, and the other events
    of that read were dropped)."""
    async with (
        AsyncIPC(ipc_dir, rescan_interval=60) as writer,
        AsyncIPC(ipc_dir, rescan_interval=60, doorbell=False) as reader,
    ):
        got: list[Any] = []
        reader.on("e", got.append)
        await writer.notify("e", 0)
        await until(lambda: got == [0])
        peer = writer.medium.backend.peer  # type: ignore[union-attr]
        log = ipc_dir / "default" / "log"
        with caplog.at_level(logging.WARNING):
            (log / f"{peer}-\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0662.seg").write_bytes(b"")
            (log / f"{peer}-00000003.seg\n").write_bytes(b"")
            await writer.notify("e", 1)
            await until(lambda: got == [0, 1], timeout=5)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_doorbell_of_the_same_inode_on_another_device_is_not_ours(
    ipc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file at the doorbell's name with the doorbell's inode number but on another
    device (another file system mounted over peers/, say) is not the doorbell:
    `Doorbell.bound` compares the device too (before: only the inode number)."""
    async with AsyncIPC(ipc_dir) as ipc:
        doorbell = ipc.medium.backend._doorbell  # type: ignore[union-attr]
        assert doorbell.bell is not None
        assert doorbell.bound()
        real = os.stat

        def other_device(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            st = real(path, *args, **kwargs)
            if not str(path).endswith(".sock"):
                return st
            fields = list(st[:10])
            fields[2] += 1  # st_dev: same inode number, another device
            return os.stat_result(fields)

        monkeypatch.setattr(os, "stat", other_device)
        assert not doorbell.bound()
