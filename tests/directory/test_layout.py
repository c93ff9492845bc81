"""Where the directory is and how files are opened: permissions, refusals, planted
files, other users."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC, UnsafeDirectoryError

from .helpers import FAKE, FAST, as_nobody, needs_root, ticker_gaps

FAKE_PEER = "00000000cafef00d"


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


async def test_planted_fifos_hang_nobody(ipc_dir: Path, until: Any) -> None:
    """FIFOs under a segment name, snapshot.bin and a peer's lock name: nobody's
    loop freezes, joiners start, messages flow."""
    ns = ipc_dir / "default"
    for sub in ("log", "peers"):
        (ns / sub).mkdir(parents=True, mode=0o700)
    os.chmod(ns, 0o700)
    os.mkfifo(ns / "log" / f"{FAKE}-00000001.seg", 0o600)
    os.mkfifo(ns / "snapshot.bin", 0o600)
    os.mkfifo(ns / "peers" / f"{FAKE}.lock", 0o600)
    ticker, gaps = ticker_gaps()
    try:
        async with asyncio.timeout(10):
            async with AsyncIPC(ipc_dir, **FAST) as a, AsyncIPC(ipc_dir, **FAST) as b:
                got: list[Any] = []
                b.on("e", got.append)
                await asyncio.sleep(0.5)  # several maintenance rounds look at the FIFOs
                await a.notify("e", 1)
                await until(lambda: got == [1], 5)
    finally:
        ticker.cancel()
    assert max(gaps) < 0.5


@needs_root
async def test_another_user_can_neither_read_nor_inject(ipc: AsyncIPC, ipc_dir: Path) -> None:
    await ipc.notify("secret", {"token": "s3cr3t"})
    await AsyncCache(ipc).set("k", "v")
    os.chmod(ipc_dir, 0o755)  # even with the outer directory open to all ...
    ns = ipc_dir / "default"
    result = as_nobody(
        f"""
        ns = {str(ns)!r}
        for attempt in (
            lambda: os.listdir(ns),
            lambda: os.listdir(ns + "/log"),
            lambda: open(ns + "/snapshot.bin", "rb").read(),
            lambda: open(ns + "/log/{FAKE_PEER}-00000001.seg", "wb").write(b"x"),
        ):
            try:
                attempt()
                print("ALLOWED")
            except PermissionError:
                print("denied")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["denied"] * 4


async def test_symlinks_planted_in_the_directory_are_not_followed(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, ipc_dir: Path, tmp_path: Path, until: Any
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    log = ipc_dir / "default" / "log"
    peers = ipc_dir / "default" / "peers"
    # A "segment" and a "dead peer's lock" that point outside the directory.
    (log / f"{FAKE_PEER}-00000001.seg").symlink_to(outside)
    (peers / f"{FAKE_PEER}.lock").symlink_to(outside)
    got: list[Any] = []
    peer_ipc.on("e", got.append)
    await ipc.notify("e", 1)
    await until(lambda: got == [1])
    await until(lambda: ipc.stats()["rescans"] >= 2)
    assert outside.read_text() == "keep me"  # never written, truncated or deleted
