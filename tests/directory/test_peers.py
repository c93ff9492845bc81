"""Peers: announcing, liveness, collection of the dead and their leftovers."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC

from .helpers import FAST

FAKE_PEER = "00000000cafef00d"


async def test_short_lived_peers_leave_nothing_behind(ipc_dir: Path, until: Any) -> None:
    """Two long-lived peers beside 60 short-lived ones: both forget every dead
    writer (not only the one that collected it), and so does the snapshot header."""
    async with AsyncIPC(ipc_dir, **FAST) as first, AsyncIPC(ipc_dir, **FAST) as second:
        for i in range(60):
            async with AsyncIPC(ipc_dir, **FAST) as short:
                await AsyncCache(short).set(f"k{i}", i)
        for ipc in (first, second):
            await until(lambda: len(AsyncCache(ipc)) == 60, 10)  # noqa: B023
        await until(lambda: first.stats()["writers"] == second.stats()["writers"] == 1, 15)
        holder = first if first.stats()["snapshot_holder"] else second
        await AsyncCache(holder).set("last", True)
        written = holder.stats()["snapshots_written"]
        await until(lambda: holder.stats()["snapshots_written"] > written, 5)
        ns = ipc_dir / "default"
        newest = max(ns.glob("snapshot.*.delta"), default=ns / "snapshot.bin")  # (one base)
        head = newest.read_bytes()[52:4096]
        positions = json.loads(head[: head.index(b"}}") + 2])["positions"]
        assert sorted(positions) == sorted([first.stats()["peer"], second.stats()["peer"]])
        assert not list((ipc_dir / "default" / "peers").glob(".*"))


async def test_start_never_fails_because_a_peer_looked_at_its_lock(
    ipc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ivip_ipc_async.backends.directory import liveness

    real = fcntl.flock
    calls = 0

    def busy_once(fd: int, op: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # as if a peer's liveness check held it for a moment
            raise BlockingIOError
        real(fd, op)

    monkeypatch.setattr(liveness.fcntl, "flock", busy_once)
    async with AsyncIPC(ipc_dir, **FAST) as ipc:
        assert ipc.started
    assert calls >= 2


async def test_a_peer_cannot_make_another_delete_files_outside(
    ipc_dir: Path, tmp_path: Path, until: Any
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data").write_text("precious")
    async with AsyncIPC(ipc_dir, retention=0.0, rescan_interval=0.02):
        peers = ipc_dir / "default" / "peers"
        # A dead peer whose lock file is real but whose "segments" are symlinks
        # and oddly named files: collection must only unlink names in log/.
        lock = peers / f"{FAKE_PEER}.lock"
        lock.write_text("{}")
        os.chmod(lock, 0o600)
        (ipc_dir / "default" / "log" / f"{FAKE_PEER}-00000001.seg").symlink_to(victim / "data")
        await until(lambda: not lock.exists())
    assert (victim / "data").read_text() == "precious"


@pytest.mark.parametrize(
    "garbage",
    [b"[" * 4000, b'{"a":' * 800, b'{"capped_through": Infinity}', b"\xff\xfe", b"[1]"],
)
def test_a_planted_peer_lock_file_reads_as_no_note(ipc_dir: Path, garbage: bytes) -> None:
    """Another peer's lock file is read when a gap's cause is named (inside a read
    pass): garbage in it (nested 4000 deep: a RecursionError, not a ValueError;
    an infinite number) reads as "nothing noted", never an exception."""
    from ivip_ipc_async.backends.directory.layout import Dirs
    from ivip_ipc_async.backends.directory.peerfiles import CAPPED, DISPLACED, read_note

    dirs = Dirs(ipc_dir / "ns")
    dirs.open()
    try:
        (ipc_dir / "ns" / "peers" / f"{FAKE_PEER}.lock").write_bytes(garbage)
        assert read_note(dirs.fds["peers"], FAKE_PEER, CAPPED) == 0
        assert read_note(dirs.fds["peers"], FAKE_PEER, DISPLACED) == 0
    finally:
        dirs.close()
