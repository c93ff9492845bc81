"""Faults: disk errors, a dying watcher or task, a reader that falls behind."""

from __future__ import annotations

import asyncio
import errno
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.backends.directory import reader, segments
from ivip_ipc_async.ipc import GAP_EVENT


async def test_disk_full_raises_to_the_caller_and_recovers(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    got: list[Any] = []
    peer_ipc.on("e", got.append)
    await ipc.notify("e", "before")
    real_write = segments._write_to_segment

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segments, "_write_to_segment", full)
    with pytest.raises(OSError, match="No space left"):
        await ipc.notify("e", "lost")
    with pytest.raises(OSError, match="No space left"):
        await AsyncCache(ipc).set("k", "lost")
    assert await AsyncCache(ipc).get("k") is None  # not applied locally either
    monkeypatch.setattr(segments, "_write_to_segment", real_write)
    await ipc.notify("e", "after")
    await until(lambda: got == ["before", "after"])
    assert ipc.stats()["write_errors"] == 2


async def test_half_written_batch_is_never_delivered(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    got: list[Any] = []
    peer_ipc.on("e", got.append)
    real_write = segments._write_to_segment
    calls = 0

    def half_then_full(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, data[: len(data) // 2])  # a short write ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(segments, "_write_to_segment", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        await ipc.notify("e", "x" * 1000)
    monkeypatch.setattr(segments, "_write_to_segment", real_write)
    await ipc.notify("e", "next")
    await until(lambda: got == ["next"])
    # The torn half is skipped (the writer moved on to a new segment), never
    # parsed as garbage nor delivered.
    assert peer_ipc.stats()["garbage_bytes"] == 0
    assert ipc.stats()["write_errors"] == 1


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


async def test_maintenance_task_that_dies_is_logged_and_restarted(
    ipc_dir: Path, until: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failures = 0
    real = reader.LogReader.safety_rescan

    def flaky(self: reader.LogReader, full: bool) -> None:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RuntimeError("injected")
        real(self, full)

    monkeypatch.setattr(reader.LogReader, "safety_rescan", flaky)
    with caplog.at_level(logging.ERROR, logger="ivip_ipc_async"):
        async with AsyncIPC(ipc_dir, rescan_interval=0.02) as ipc:
            await until(lambda: ipc.stats()["task_failures"] == 1)
            rescans = ipc.stats()["rescans"]
            await until(lambda: ipc.stats()["rescans"] > rescans + 2)
    assert "died, restarting it" in caplog.text


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


async def test_notify_cancelled_while_batched_leaves_no_partial_record(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any
) -> None:
    got: list[Any] = []
    peer_ipc.on("c", got.append)
    # Many concurrent notifies: the tail joins a batch; cancel some of them.
    tasks = [asyncio.create_task(ipc.notify("c", i)) for i in range(200)]
    await asyncio.sleep(0)
    for task in tasks[100:150]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    acknowledged = [i for i, r in enumerate(results) if r is None]
    await until(lambda: set(acknowledged) <= set(got))
    await ipc.notify("c", "end")
    await until(lambda: got[-1:] == ["end"])
    assert got[:-1] == sorted(got[:-1])  # in order, whole records only
    assert peer_ipc.stats()["garbage_bytes"] == 0


async def test_cancelled_sets_leave_every_mirror_equal(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any
) -> None:
    mine, theirs = AsyncCache(ipc), AsyncCache(peer_ipc)
    # 200 concurrent sets of one key: the tail waits in a batch; cancel some of it.
    tasks = [asyncio.create_task(mine.set("k", i, 0)) for i in range(200)]
    await asyncio.sleep(0)
    for task in tasks[100:]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    acknowledged = [i for i, r in enumerate(results) if r is None]
    cancelled = [i for i, r in enumerate(results) if isinstance(r, asyncio.CancelledError)]
    assert cancelled  # the test cancelled some while they waited
    assert await mine.get("k") == acknowledged[-1]
    await until(lambda: peer_ipc.stats()["records_read"] >= len(acknowledged))
    await mine.set("marker", 1)
    await until(lambda: peer_ipc.mirror.lookup("default", "marker") is not None)
    # A cancelled set happened nowhere: the peer holds what this process holds.
    assert await theirs.get("k") == await mine.get("k") == acknowledged[-1]
    assert peer_ipc.stats()["records_read"] == len(acknowledged) + 1


async def test_a_set_cancelled_after_its_write_still_applies_here(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any
) -> None:
    mine, theirs = AsyncCache(ipc), AsyncCache(peer_ipc)
    # 40 concurrent sets: past the first 16, they wait for the group write at the
    # end of the loop iteration. Once it is written, and before their tasks resume,
    # cancel them: each caller gets CancelledError, though its write is stored.
    tasks = [asyncio.create_task(mine.set("k", i, 0)) for i in range(40)]
    await asyncio.sleep(0)  # the tasks run: 16 written at once, 24 queued
    await asyncio.sleep(0)  # the end-of-iteration write: the 24 futures resolve
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[-1], asyncio.CancelledError)  # cancelled, yet written
    assert await mine.get("k") == 39  # this process applied it ...
    await until(lambda: peer_ipc.stats()["records_read"] == 40)
    assert await theirs.get("k") == 39  # ... as every peer did


async def test_subscribe_and_wait_for_cancelled_while_waiting_leave_nothing(
    ipc: AsyncIPC, until: Any
) -> None:
    async def consume() -> None:
        async for _ in ipc.subscribe("s"):
            pass

    tasks = [asyncio.create_task(consume()), asyncio.create_task(ipc.wait_for("s"))]
    await until(lambda: ipc.listener_count("s") == 2)
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert ipc.listener_count() == 0
    await ipc.notify("s", 1, include_self=True)  # nobody left to get it, and no error


async def test_a_handler_that_never_returns_does_not_stop_others(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any
) -> None:
    stuck: list[int] = []
    others: list[int] = []
    other_events: list[int] = []

    async def never_returns(message: int) -> None:
        stuck.append(message)
        await asyncio.Event().wait()

    peer_ipc.on("e", never_returns)
    peer_ipc.on("e", others.append)
    peer_ipc.on("f", other_events.append)
    for i in range(50):
        await ipc.notify("e", i)
        await ipc.notify("f", i)
    await until(lambda: len(others) == 50 and len(other_events) == 50)
    assert stuck == others == other_events == list(range(50))
    await peer_ipc.destroy()  # cancels the stuck handlers and returns
    assert peer_ipc.stats()["started"] is False


async def test_health_names_the_problems(ipc_dir: Path, until: Any) -> None:
    ipc = AsyncIPC(ipc_dir)
    assert ipc.health() == {
        "healthy": False,
        "problems": ["not started"],
        "peers": 0,
        "lag_bytes": 0,
        "errors": dict.fromkeys(
            [
                "handler_errors",
                "write_errors",
                "task_failures",
                "garbage_bytes",
                "torn_tails",
                "gaps",
            ],
            0,
        ),
    }
    async with ipc, AsyncIPC(ipc_dir):
        await until(lambda: ipc.health()["peers"] == 1)
        health = ipc.health()
        assert health["healthy"] is True
        assert health["problems"] == []


FILE_SIZE_LIMITED = textwrap.dedent(
    """
    import asyncio, resource, signal, sys
    from ivip_ipc_async import AsyncIPC

    async def main():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of dying
        async with AsyncIPC(sys.argv[1], segment_bytes=1 << 20) as ipc:
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
            acked = 0
            try:
                while True:
                    await ipc.notify("fill", {"n": acked, "pad": "x" * 1000})
                    acked += 1
            except OSError as exc:
                print(f"error {exc.errno} after {acked}", flush=True)
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space is back
            await ipc.notify("fill", {"n": "after"})
            print("recovered", flush=True)
            await asyncio.to_thread(sys.stdin.readline)

    asyncio.run(main())
    """
)


async def test_file_size_limit_gives_a_clear_error_and_recovers(ipc_dir: Path, until: Any) -> None:
    async with AsyncIPC(ipc_dir) as reader:
        got: list[Any] = []
        reader.on("fill", lambda m: got.append(m["n"]))
        child = subprocess.Popen(
            [sys.executable, "-c", FILE_SIZE_LIMITED, str(ipc_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdin is not None
            first = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)
            assert first.startswith(f"error {errno.EFBIG} after "), first
            acked = int(first.split()[-1])
            assert acked > 10
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)
            assert line.strip() == "recovered"
            await until(lambda: got[-1:] == ["after"])
            assert got == [*range(acked), "after"]  # nothing half-written got through
            assert reader.stats()["garbage_bytes"] == 0
        finally:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(timeout=10)
            if child.stdout is not None:
                child.stdout.close()


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


async def test_destroy_during_a_burst_loses_nothing_acknowledged(ipc_dir: Path, until: Any) -> None:
    async with AsyncIPC(ipc_dir) as reader:
        got: list[int] = []
        reader.on("b", got.append)
        sender = AsyncIPC(ipc_dir)
        await sender.start()
        acked: list[int] = []

        async def burst() -> None:
            for i in range(100_000):
                try:
                    await sender.notify("b", i)
                except (ConnectionAbortedError, OSError):
                    return
                acked.append(i)
                if len(acked) == 2000:
                    await asyncio.sleep(0)

        task = asyncio.create_task(burst())
        await until(lambda: len(acked) >= 2000)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await sender.destroy()
        assert loop.time() - started < 1.0  # promptly
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sender.destroy()
        await until(lambda: set(acked) <= set(got))


async def test_a_batch_is_all_or_nothing(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    got: list[Any] = []
    peer_ipc.on("e", got.append)
    real_write = segments._write_to_segment
    failing = True

    def torn_batches(fd: int, data: bytes) -> int:
        if failing and len(data) > 5000:  # only the group write of a batch is this big
            real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(segments, "_write_to_segment", torn_batches)
    results = await asyncio.gather(
        *(ipc.notify("e", i) for i in range(200)), return_exceptions=True
    )
    acked = [i for i, r in enumerate(results) if r is None]
    failed = [i for i, r in enumerate(results) if isinstance(r, OSError)]
    assert acked
    assert failed
    assert len(acked) + len(failed) == 200
    failing = False
    await ipc.notify("e", "next")
    await until(lambda: got[-1:] == ["next"])
    assert got == [*acked, "next"]  # no record of the torn batch was delivered
