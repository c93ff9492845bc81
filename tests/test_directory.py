"""The shared-directory backend: permissions, refusals, garbage, snapshots, retention."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC, UnsafeDirectoryError
from ivip_ipc_async.records import Kind, Record, encode_frame, encode_key

FAKE_PEER = "00000000deadbeef"


async def test_everything_created_is_private(ipc_dir: Path, until: Any) -> None:
    async with (
        AsyncIPC(ipc_dir, rescan_interval=0.05, snapshot_interval=0.05) as a,
        AsyncIPC(ipc_dir) as b,
    ):
        await AsyncCache(a).set("k", "v")
        await a.notify("e", 1)
        await until(lambda: a.stats()["snapshots_written"] >= 1)
        seen = []
        for path in [ipc_dir / "default", *(ipc_dir / "default").rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            seen.append(path.name)
            if path.is_dir():
                assert mode == 0o700, path
            else:
                assert mode == 0o600, (path, oct(mode))
        assert "snapshot.bin" in seen
        assert any(name.endswith(".sock") for name in seen)
        assert b.started


async def test_symlinked_directory_is_refused(ipc_dir: Path) -> None:
    real = ipc_dir / "real"
    real.mkdir(mode=0o700)
    link = ipc_dir / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafeDirectoryError, match="symlink"):
        await AsyncIPC(link).start()
    # a symlinked namespace inside a good root is refused too
    (ipc_dir / "root").mkdir(mode=0o700)
    (ipc_dir / "root" / "ns").symlink_to(real)
    with pytest.raises(UnsafeDirectoryError, match="symlink"):
        await AsyncIPC(ipc_dir / "root", namespace="ns").start()


async def test_group_or_world_writable_directory_is_refused(ipc_dir: Path) -> None:
    for mode in (0o777, 0o770, 0o702):
        target = ipc_dir / f"open{mode:o}"
        target.mkdir()
        os.chmod(target, mode)
        with pytest.raises(UnsafeDirectoryError, match="group or others can write"):
            await AsyncIPC(ipc_dir, namespace=target.name).start()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a directory's owner needs root")
async def test_directory_of_another_user_is_refused(ipc_dir: Path) -> None:
    theirs = ipc_dir / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UnsafeDirectoryError, match="owned by uid 65534"):
        await AsyncIPC(ipc_dir, namespace="theirs").start()


def _write_segment(ipc_dir: Path, name: str, data: bytes) -> Path:
    log = ipc_dir / "default" / "log"
    log.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = log / name
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def _message(event: str, data: bytes, seq: int) -> bytes:
    return encode_frame(Record(Kind.MESSAGE, event, b"", data), seq)


async def test_garbage_in_a_segment_is_skipped_and_delivery_continues(
    ipc: AsyncIPC, ipc_dir: Path, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[Any] = []
    ipc.on("e", got.append)
    seg = _write_segment(ipc_dir, f"{FAKE_PEER}-00000001.seg", b"")
    with caplog.at_level(logging.WARNING, logger="ivip_ipc_async"):
        with seg.open("ab") as f:
            f.write(_message("e", b"1", 1) + os.urandom(300) + b"\xa9\x1c" * 10)
            f.write(_message("e", b"2", 2))
        await until(lambda: got == [1, 2])
        assert ipc.stats()["garbage_bytes"] >= 300
    assert "unreadable bytes" in caplog.text


async def test_files_that_are_not_segments_are_ignored(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, ipc_dir: Path, until: Any
) -> None:
    log = ipc_dir / "default" / "log"
    (log / "notes.txt").write_text("hello")
    (log / "zz-1.seg").write_bytes(os.urandom(100))
    got: list[Any] = []
    peer_ipc.on("e", got.append)
    await ipc.notify("e", 1)
    await until(lambda: got == [1])


async def test_torn_tail_of_a_dead_writer_is_skipped(
    ipc_dir: Path, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    whole = _message("e", b"1", 1)
    torn = _message("e", b'"never complete"', 2)[:-5]
    # A writer with no lock file is dead: its torn tail is dropped, with a warning.
    _write_segment(ipc_dir, f"{FAKE_PEER}-00000001.seg", b"")
    async with AsyncIPC(ipc_dir, rescan_interval=0.05) as ipc:
        got: list[Any] = []
        ipc.on("e", got.append)
        with caplog.at_level(logging.WARNING, logger="ivip_ipc_async"):
            with (ipc_dir / "default" / "log" / f"{FAKE_PEER}-00000001.seg").open("ab") as f:
                f.write(whole + torn)
            await until(lambda: ipc.stats()["torn_tails"] == 1)
        assert got == [1]
        assert "torn record" in caplog.text


async def test_late_joiner_loads_snapshot_and_log(ipc_dir: Path, until: Any) -> None:
    async with AsyncIPC(ipc_dir, snapshot_interval=0.05, rescan_interval=0.05) as writer:
        cache = AsyncCache(writer)
        for i in range(200):
            await cache.set(i, {"i": i}, 0)
        await cache.delete(5)
        await until(lambda: writer.stats()["snapshots_written"] >= 1)
        await cache.set("after-snapshot", True, 0)
        async with AsyncIPC(ipc_dir) as joiner:
            late = AsyncCache(joiner)
            assert len(late) == 200
            assert await late.get(199) == {"i": 199}
            assert await late.get(5) is None
            assert await late.get("after-snapshot") is True


async def test_corrupt_snapshot_falls_back_to_the_log(
    ipc_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with AsyncIPC(ipc_dir) as writer:
        await AsyncCache(writer).set("k", "v", 0)
        snap = ipc_dir / "default" / "snapshot.bin"
        snap.write_bytes(os.urandom(1000))
        os.chmod(snap, 0o600)
        with caplog.at_level(logging.WARNING, logger="ivip_ipc_async"):
            async with AsyncIPC(ipc_dir) as joiner:
                assert await AsyncCache(joiner).get("k") == "v"


async def test_retention_deletes_old_segments_and_keeps_footprint(
    ipc_dir: Path, until: Any
) -> None:
    async with AsyncIPC(
        ipc_dir,
        segment_bytes=64 * 1024,
        max_footprint=512 * 1024,
        retention=0.0,
        rescan_interval=0.02,
    ) as ipc:
        payload = "x" * 1000
        for _ in range(1000):
            await ipc.notify("bulk", payload)
        # a maintenance round later, only the budget remains
        await until(lambda: ipc.stats()["footprint_bytes"] <= 512 * 1024)
        stats = ipc.stats()
        assert stats["segments_deleted"] > 0
        assert stats["footprint_bytes"] <= 512 * 1024


async def test_cache_record_encoding_roundtrip_through_directory(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any
) -> None:
    raw = encode_key("k")
    assert raw == b"sk"
    await AsyncCache(ipc, name="n").set("k", [1, 2], 0)
    await until(lambda: peer_ipc.mirror.lookup("n", "k") is not None)
