"""Snapshots: late joiners, damage detected and repaired, planted links, leftovers."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.records import FrameReader, Kind

from .helpers import FAKE, FAST, Peer


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


async def test_snapshot_never_writes_through_a_planted_link(ipc_dir: Path, until: Any) -> None:
    victim = ipc_dir / "victim.txt"
    victim.write_text("precious")
    async with AsyncIPC(ipc_dir, **FAST) as ipc:
        peer = ipc.stats()["peer"]
        os.link(victim, ipc_dir / "default" / f".snapshot.{peer}.tmp")
        cache = AsyncCache(ipc)
        for i in range(3):
            await cache.set(f"k{i}", i)
            written = ipc.stats()["snapshots_written"]
            await until(lambda: ipc.stats()["snapshots_written"] > written, 5)  # noqa: B023
    assert victim.read_text() == "precious"


async def test_damaged_snapshot_is_detected_and_rewritten_while_idle(
    ipc_dir: Path, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    holder = Peer(ipc_dir)
    try:
        for i in range(300):
            await holder.ask(op="set", key=f"k{i}", value=i)
        snapshot = ipc_dir / "default" / "snapshot.bin"

        def complete() -> bool:
            # The holder's snapshot (its base and the deltas of that base) holds
            # all 300 keys, each file whole (with its closing count).
            if not snapshot.exists():
                return False
            base = re.search(rb'"base": "([0-9a-f]{16})"', snapshot.read_bytes()[:4096])
            files = [snapshot]
            if base is not None:
                files += snapshot.parent.glob(f"snapshot.{base[1].decode()}.*.delta")
            keys = set()
            for f in files:
                records = FrameReader(16 << 20).feed(f.read_bytes())
                if not records or b'"count"' not in records[-1].data:
                    return False
                keys |= {r.key for r in records if r.kind is Kind.CACHE_SET}
            return len(keys) == 300

        await until(complete, 10)
        for damage in (
            lambda: os.truncate(snapshot, snapshot.stat().st_size // 2),
            lambda: os.truncate(snapshot, 0),
        ):
            damage()
            async with AsyncIPC(ipc_dir, **FAST) as joiner:
                late = AsyncCache(joiner)
                await until(lambda: len(late) == 300, 10)  # noqa: B023
                assert joiner.stats()["snapshots_damaged"] >= 1
            await until(complete, 10)  # rewritten by its holder, although idle
        assert "damaged" in caplog.text
    finally:
        holder.close()


async def test_snapshot_leftovers_are_counted_then_collected(ipc_dir: Path, until: Any) -> None:
    ns = ipc_dir / "default"
    ns.mkdir(mode=0o700)
    leftover = ns / f".snapshot.{FAKE}.1234abcd.tmp"
    leftover.write_bytes(b"\0" * 1_500_000)
    async with AsyncIPC(ipc_dir, **FAST) as ipc:
        await until(lambda: not leftover.exists(), 5)
        assert ipc.stats()["footprint_bytes"] < 1_500_000
        # A second peer (not the holder) counts one in the footprint meanwhile.
        leftover.write_bytes(b"\0" * 1_500_000)
        async with AsyncIPC(ipc_dir, **{**FAST, "rescan_interval": 60}) as other:
            assert other.stats()["footprint_bytes"] >= 1_500_000


async def test_a_new_snapshot_with_the_old_timestamp_is_still_read(
    ipc_dir: Path, until: Any
) -> None:
    """A process that does not write snapshots learns what the current one covers
    whenever it is a new file: same size and timestamp or not (coarse or set
    timestamps), since those positions gate deleting the writers' segments."""
    async with (
        AsyncIPC(ipc_dir, snapshot_interval=0.05, rescan_interval=0.05) as holder,
        AsyncIPC(ipc_dir, rescan_interval=60) as other,
    ):
        cache = AsyncCache(holder)
        await cache.set("a", 1, 0)
        await until(lambda: holder.stats()["snapshots_written"] >= 1)
        mine = holder.medium.backend._snapshots  # type: ignore[union-attr]
        theirs = other.medium.backend._snapshots  # type: ignore[union-attr]
        assert theirs.lock_fd is None  # `other` only reads snapshots
        theirs._read_positions()
        assert theirs.positions == mine.positions
        snap = ipc_dir / "default" / "snapshot.bin"
        first = os.stat(snap)
        written = holder.stats()["snapshots_written"]
        await cache.set("b", 2, 0)
        await until(lambda: holder.stats()["snapshots_written"] > written)
        os.utime(snap, ns=(first.st_atime_ns, first.st_mtime_ns))  # as a coarse clock would
        assert theirs.positions != mine.positions
        theirs._read_positions()
        assert theirs.positions == mine.positions


@pytest.mark.parametrize(
    "header",
    [
        b"[" * 5000,
        b'{"positions": {"p": [Infinity, 1, 1]}}',
        b'{"records": Infinity}',
        b'{"count": Infinity}',
    ],
)
def test_a_garbled_snapshot_header_or_end_reads_as_unknown(header: bytes) -> None:
    """The snapshot's JSON frames are untrusted: nested 5000 deep (a RecursionError)
    or holding an infinite number, they read as no positions and no end."""
    from ivip_ipc_async.backends.directory.joining import _positions, _snapshot_end

    assert _positions(header) == {}
    assert _snapshot_end(header) == -1
