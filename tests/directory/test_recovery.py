"""Frames that are not whole (torn, forged, half-written by a killed writer), and gaps."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import GAP_EVENT, AsyncCache, AsyncIPC, LossCause
from ivip_ipc_async.records import Kind, Record, encode_frame

from .helpers import FAST, Peer, message, write_segment

FAKE_PEER = "00000000deadbeef"


async def test_torn_tail_of_a_dead_writer_is_skipped(
    ipc_dir: Path, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    whole = message("e", b"1", 1)
    torn = message("e", b'"never complete"', 2)[:-5]
    # A writer with no lock file is dead: its torn tail is dropped, with a warning.
    write_segment(ipc_dir, f"{FAKE_PEER}-00000001.seg", b"")
    async with AsyncIPC(ipc_dir, rescan_interval=0.05) as ipc:
        got: list[Any] = []
        ipc.on("e", got.append)
        with caplog.at_level(logging.WARNING, logger="ivip_ipc_async"):
            with (ipc_dir / "default" / "log" / f"{FAKE_PEER}-00000001.seg").open("ab") as f:
                f.write(whole + torn)
            await until(lambda: ipc.stats()["torn_tails"] == 1)
        assert got == [1]
        assert "torn record" in caplog.text


async def test_forged_frame_header_costs_no_record(ipc_dir: Path, until: Any) -> None:
    """52 forged bytes (a header with a valid checksum, 8 MiB long) in a live
    writer's segment: every record written after it is still delivered."""
    writer = Peer(ipc_dir)
    try:
        async with AsyncIPC(ipc_dir, **FAST) as reader:
            got: list[Any] = []
            reader.on("e", got.append)
            await writer.ask(op="notify", event="e", messages=[-1])
            await until(lambda: got == [-1])
            forged = encode_frame(Record(Kind.MESSAGE, "e", b"", b"x" * (8 << 20)), 99)[:52]
            own = reader.stats()["peer"]
            (segment,) = [
                p for p in (ipc_dir / "default" / "log").glob("*.seg") if own not in p.name
            ]
            with segment.open("ab") as f:
                f.write(forged)
            assert await writer.ask(op="notify", event="e", messages=list(range(970))) == {
                "acked": 970
            }
            await until(lambda: len(got) == 971, 10)
            assert got == [-1, *range(970)]
            assert reader.stats()["garbage_bytes"] == 52
            assert reader.stats()["records_lost"] == 0
    finally:
        writer.close()


TORN_WRITER = textwrap.dedent(
    """
    import fcntl, json, os, signal, sys
    from ivip_ipc_async.records import Kind, Record, encode_frame

    ns, peer = sys.argv[1], "00000000000beef1"
    lock = os.open(f"{ns}/peers/.{peer}.lock.tmp", os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.write(lock, json.dumps({"pid": os.getpid()}).encode())
    os.rename(f"{ns}/peers/.{peer}.lock.tmp", f"{ns}/peers/{peer}.lock")
    seg = os.open(f"{ns}/log/{peer}-00000001.seg", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    big = encode_frame(Record(Kind.MESSAGE, "big", b"", b'"' + b"x" * 200_000 + b'"'), 2)
    os.write(seg, encode_frame(Record(Kind.MESSAGE, "big", b"", b'"small"'), 1))
    os.write(seg, big[: len(big) // 2])  # the first half of a large record ...
    print("half", flush=True)
    sys.stdin.readline()
    os.kill(os.getpid(), signal.SIGKILL)  # ... and the writer dies before the second
    """
)


async def test_writer_killed_between_the_halves_of_a_large_record(
    ipc_dir: Path, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with AsyncIPC(ipc_dir, rescan_interval=0.02) as reader, AsyncIPC(ipc_dir) as other:
        got: list[Any] = []
        reader.on("big", got.append)
        ns = ipc_dir / "default"
        writer = subprocess.Popen(
            [sys.executable, "-c", TORN_WRITER, str(ns)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert writer.stdout is not None
            assert writer.stdin is not None
            line = await asyncio.wait_for(asyncio.to_thread(writer.stdout.readline), 30)
            assert line.strip() == "half"
            await until(lambda: got == ["small"])
            # While the writer lives, half a record is waited for, not skipped.
            assert reader.stats()["torn_tails"] == 0
            with caplog.at_level(logging.WARNING, logger="ivip_ipc_async"):
                writer.stdin.write("die\n")
                writer.stdin.flush()
                await asyncio.to_thread(writer.wait, 10)
                await until(lambda: reader.stats()["torn_tails"] == 1)
            assert "torn record" in caplog.text
            assert got == ["small"]  # never delivered as valid
            await other.notify("big", "next")
            await until(lambda: got == ["small", "next"])
        finally:
            if writer.poll() is None:
                writer.kill()
            writer.wait()
            for stream in (writer.stdin, writer.stdout):
                if stream is not None:
                    stream.close()


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from ivip_ipc_async import AsyncIPC, AsyncCache

    async def main():
        async with AsyncIPC(sys.argv[1], segment_bytes=16384, max_footprint=65536,
                            retention=0.0, rescan_interval=0.02,
                            snapshot_interval=0.02) as ipc:
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            cache = AsyncCache(ipc)
            for i in range(3000):
                await ipc.notify("bulk", "x" * 200)
                if i % 100 == 0:
                    await cache.set("progress", i, 0)
                    await asyncio.sleep(0)
            await cache.set("final", "done", 0)
            # Wait until retention has deleted what the stuck reader has not read.
            while ipc.stats()["segments_deleted"] < 20:
                await asyncio.sleep(0.02)
            print("sent", flush=True)
            await asyncio.to_thread(sys.stdin.readline)

    asyncio.run(main())
    """
)


async def test_reader_that_falls_behind_reports_the_gap_and_resyncs_its_cache(
    ipc_dir: Path, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(ipc_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdin is not None
        assert writer.stdout.readline().strip() == "ready"
        async with AsyncIPC(ipc_dir, rescan_interval=0.02) as reader:
            gaps: list[dict[str, Any]] = []
            reader.on(GAP_EVENT, gaps.append)
            stuck = asyncio.Event()

            def blocking_handler(_: Any) -> None:
                if not stuck.is_set():
                    stuck.set()
                    # Block this process far longer than the writer's retention.
                    deadline = time.monotonic() + 20
                    writer.stdin.write("go\n")  # type: ignore[union-attr]
                    writer.stdin.flush()  # type: ignore[union-attr]
                    while time.monotonic() < deadline:
                        line = writer.stdout.readline()  # type: ignore[union-attr]
                        if line.strip() == "sent":
                            break

            reader.on("bulk", blocking_handler)
            reader.on("kick", blocking_handler)
            async with AsyncIPC(ipc_dir) as kicker:
                with caplog.at_level(logging.WARNING, logger="ivip_ipc_async"):
                    await kicker.notify("kick", 1)
                    await until(lambda: gaps != [], timeout=20)
                    cache = AsyncCache(reader)
                    await until(lambda: cache.ipc.mirror.lookup("default", "final") is not None)
            assert await cache.get("final") == "done"
            assert await cache.get("progress") == 2900
            stats = reader.stats()
            assert stats["gaps"] >= 1
            assert stats["records_lost"] > 0
            # Counted by cause, each counter named from `LossCause` (the cap, or
            # the retention window here), together every record lost.
            by_cause = {k: v for k, v in stats.items() if k.startswith("records_lost_")}
            assert set(by_cause) <= {c.counter for c in LossCause}, by_cause
            assert set(by_cause) & {LossCause.CAP.counter, LossCause.RETENTION.counter}
            assert sum(by_cause.values()) == stats["records_lost"]
            assert gaps[0]["lost"] > 0
            assert "gap in the records" in caplog.text
    finally:
        if writer.stdin is not None:
            writer.stdin.close()
        try:
            writer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            writer.kill()
            writer.wait()
        if writer.stdout is not None:
            writer.stdout.close()
