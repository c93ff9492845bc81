"""Reading other writers' segments: garbage, foreign files, a slice at a time."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.records import HEADER_SIZE, Kind, Record, encode_frame, encode_key

from .helpers import FAST, Peer, message, write_segment

FAKE_PEER = "00000000deadbeef"


async def test_garbage_in_a_segment_is_skipped_and_delivery_continues(
    ipc: AsyncIPC, ipc_dir: Path, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[Any] = []
    ipc.on("e", got.append)
    seg = write_segment(ipc_dir, f"{FAKE_PEER}-00000001.seg", b"")
    with caplog.at_level(logging.WARNING, logger="ivip_ipc_async"):
        with seg.open("ab") as f:
            f.write(message("e", b"1", 1) + os.urandom(300) + b"\xa9\x1c" * 10)
            f.write(message("e", b"2", 2))
        await until(lambda: got == [1, 2])
        assert ipc.stats()["garbage_bytes"] >= 300
    assert "unreadable bytes" in caplog.text


async def test_a_cache_record_with_a_forged_key_costs_only_itself(
    ipc: AsyncIPC, ipc_dir: Path, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache record whose key no process could have encoded, with valid
    checksums, made the read pass raise: the rest of what was read with it was
    never delivered. It is ignored (and logged); what follows arrives."""
    got: list[Any] = []
    ipc.on("e", got.append)
    forged = [
        encode_frame(Record(Kind.CACHE_SET, "default", key, b"1", hlc=1, node=7), seq)
        for seq, key in enumerate((b"s\xff", b"ix", b"k"), start=2)
    ]
    data = message("e", b"1", 1) + b"".join(forged) + message("e", b"2", 5)
    with caplog.at_level(logging.WARNING, logger="ivip_ipc_async"):
        write_segment(ipc_dir, f"{FAKE_PEER}-00000001.seg", data)
        await until(lambda: got == [1, 2])
        await AsyncCache(ipc).set("after", 1)
        assert await AsyncCache(ipc).get("after") == 1
    assert ipc.mirror.rejected == 3
    assert "is not a cache key" in caplog.text


async def test_a_forged_length_on_an_unheard_event_swallows_nothing(
    ipc: AsyncIPC, ipc_dir: Path, until: Any
) -> None:
    """Messages of events nobody here listens to are skipped unread; a forged
    header of such an event, whose length covers real frames behind it, must
    not take them along: its body is still checked, and the reader resyncs."""
    got: list[Any] = []
    ipc.on("e", got.append)
    behind = message("e", b"2", 3) + message("e", b"3", 4)
    cover = Record(Kind.MESSAGE, "x", b"", b"y" * (len(behind) - 1))
    forged = encode_frame(cover, 2)[:HEADER_SIZE]  # a valid header, its body the real frames
    write_segment(ipc_dir, f"{FAKE_PEER}-00000001.seg", message("e", b"1", 1) + forged + behind)
    await until(lambda: got == [1, 2, 3])


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


async def test_cache_record_encoding_roundtrip_through_directory(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any
) -> None:
    raw = encode_key("k")
    assert raw == b"sk"
    await AsyncCache(ipc, name="n").set("k", [1, 2], 0)
    await until(lambda: peer_ipc.mirror.lookup("n", "k") is not None)


async def test_a_huge_batch_is_dispatched_a_slice_at_a_time(ipc_dir: Path, until: Any) -> None:
    """One notify_many of 100,000 messages from another process reaches the
    handler over many loop iterations, never in one callback."""
    writer = Peer(ipc_dir)
    ticks = 0
    seen_at: set[int] = set()

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    try:
        async with AsyncIPC(ipc_dir, **FAST) as reader:
            got = 0

            def handler(message: Any) -> None:
                nonlocal got
                got += 1
                seen_at.add(ticks)

            reader.on("e", handler)
            ticker = asyncio.get_running_loop().create_task(tick())
            script = {"op": "notify_many", "event": "e", "count": 100_000}
            assert await writer.ask(**script) == {"acked": 100_000}
            await until(lambda: got == 100_000, 20)
            ticker.cancel()
    finally:
        writer.close()
    assert len(seen_at) > 20


async def test_records_out_of_order_in_one_read_take_the_careful_path(
    ipc: AsyncIPC, ipc_dir: Path, until: Any
) -> None:
    """A read whose first and last sequence numbers look contiguous but whose
    middle is not (here 1, 3, 2, 4: only a damaged or forged segment does this)
    is handled record by record: 2 is older than 3, so it is not delivered, and
    the jump from 1 to 3 is a gap."""
    got: list[Any] = []
    ipc.on("e", got.append)
    frames = b"".join(message("e", b"%d" % seq, seq) for seq in (1, 3, 2, 4))
    write_segment(ipc_dir, f"{FAKE_PEER}-00000001.seg", frames)
    await until(lambda: got == [1, 3, 4])
    assert ipc.stats()["gaps"] == 1


async def test_in_order_reads_deliver_everything_without_gaps(
    ipc: AsyncIPC, ipc_dir: Path, until: Any
) -> None:
    got: list[Any] = []
    ipc.on("e", got.append)
    seg = write_segment(ipc_dir, f"{FAKE_PEER}-00000001.seg", b"")
    with seg.open("ab") as f:
        f.write(b"".join(message("e", b"%d" % seq, seq) for seq in range(1, 101)))
    await until(lambda: len(got) == 100)
    with seg.open("ab") as f:  # then an old one again (a re-read), then new ones
        f.write(b"".join(message("e", b"%d" % seq, seq) for seq in (100, 101, 102)))
    await until(lambda: len(got) == 102)
    assert got == list(range(1, 103))
    assert ipc.stats()["gaps"] == 0


async def test_messages_nobody_listens_to_are_skipped_without_a_gap(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any
) -> None:
    """A process reads every writer's records but decodes only the messages of
    events it listens to; the others still count in the sequence, so no gap."""
    got: list[Any] = []
    peer_ipc.on("wanted", got.append)
    cache = AsyncCache(ipc)
    for i in range(50):
        await ipc.notify("unwanted", i)
        await ipc.notify("wanted", i)
    await cache.set("k", "v", 0)
    await until(lambda: len(got) == 50 and peer_ipc.mirror.lookup("default", "k") is not None)
    assert got == list(range(50))
    assert peer_ipc.stats()["gaps"] == 0
    late: list[Any] = []
    peer_ipc.on("unwanted", late.append)  # listening from now on
    await ipc.notify("unwanted", "after")
    await until(lambda: late == ["after"])


@pytest.mark.parametrize("when", ["restore at start", "live"])
async def test_due_timers_run_between_any_two_slices_of_reading(
    ipc_dir: Path, until: Any, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A 0.1 ms timer gets its turn after every full slice of reading (restoring
    the log at start, or reading a huge batch live), not after every second one,
    as it did when slices yielded with `asyncio.sleep(0)`."""
    from ivip_ipc_async.backends.directory.pacing import SLICE
    from ivip_ipc_async.backends.directory.reader import LogReader

    events: list[tuple[str, float]] = []
    read_writer = LogReader._read_writer

    def timed(self: LogReader, w: Any, deadline: float) -> bool:
        started = time.perf_counter()
        try:
            return read_writer(self, w, deadline)
        finally:
            events.append(("slice", time.perf_counter() - started))

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.0001)
            events.append(("tick", 0.0))

    monkeypatch.setattr(LogReader, "_read_writer", timed)
    # No snapshot from the writer: one would cover its messages, leaving nothing to read.
    writer = Peer(ipc_dir, "--snapshot-interval", "3600")
    script = {"op": "notify_many", "event": "e", "count": 100_000}
    ticker = asyncio.get_running_loop().create_task(tick())
    try:
        if when == "restore at start":
            assert await writer.ask(**script) == {"acked": 100_000}
            events.clear()
            async with AsyncIPC(ipc_dir, **FAST) as reader:
                assert reader.stats()["records_read"] == 100_000
        else:
            async with AsyncIPC(ipc_dir, **FAST) as reader:
                got = 0

                def handler(message: Any) -> None:
                    nonlocal got
                    got += 1

                reader.on("e", handler)
                events.clear()
                assert await writer.ask(**script) == {"acked": 100_000}
                await until(lambda: got == 100_000, 20)
    finally:
        ticker.cancel()
        writer.close()
    full = [i for i, (what, took) in enumerate(events) if what == "slice" and took >= SLICE]
    assert len(full) > 10  # the workload is many slices long
    back_to_back = [i for i in full if i + 1 < len(events) and events[i + 1][0] == "slice"]
    assert back_to_back == [], f"{len(back_to_back)} of {len(full)} full slices ran back to back"
