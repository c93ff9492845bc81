"""Own segments: the write path, group commit, torn and failed writes, the size cap,
retention."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.backends.directory import cap, segments, snapshots
from ivip_ipc_async.errors import BackendFullError

from .helpers import FAST, namespace_bytes


def footprint(ns: Path) -> tuple[int, int]:
    """(bytes of history in log/, bytes of the whole namespace)"""
    history = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(ns / "log"):
            with contextlib.suppress(FileNotFoundError):
                history += entry.stat(follow_symlinks=False).st_size
    return history, namespace_bytes(ns)


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
    # The documented `BackendFullError` (as on Redis), still the OSError it was.
    with pytest.raises(BackendFullError, match="No space left") as raised:
        await ipc.notify("e", "lost")
    assert isinstance(raised.value, OSError)
    assert raised.value.errno == errno.ENOSPC
    with pytest.raises(BackendFullError, match="No space left"):
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
    with pytest.raises(BackendFullError, match="No space left"):
        await ipc.notify("e", "x" * 1000)
    monkeypatch.setattr(segments, "_write_to_segment", real_write)
    await ipc.notify("e", "next")
    await until(lambda: got == ["next"])
    # The torn half is skipped (the writer moved on to a new segment), never
    # parsed as garbage nor delivered.
    assert peer_ipc.stats()["garbage_bytes"] == 0
    assert ipc.stats()["write_errors"] == 1


@pytest.fixture
def group_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every append joins the end-of-iteration batch. Without this, concurrent
    tasks each write at once (only a task that writes many times in a row in
    one loop iteration is made to wait for the batch)."""
    monkeypatch.setattr(segments, "_WRITE_THROUGH_PER_TICK", 0)


async def test_concurrent_tasks_write_at_once_a_tight_loop_yields(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any
) -> None:
    """Tasks notifying together each write at once (no batch, no suspension);
    one task notifying in a tight loop is made to yield every
    `_WRITE_THROUGH_PER_TICK` writes, so other tasks get to run."""
    got: list[Any] = []
    peer_ipc.on("e", got.append)
    before = ipc.stats()["batches_written"]
    await asyncio.gather(*(ipc.notify("e", i) for i in range(100)))
    assert ipc.stats()["batches_written"] - before == 100  # one write each
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    for i in range(100, 100 + 10 * segments._WRITE_THROUGH_PER_TICK):
        await ipc.notify("e", i)
    task.cancel()
    assert ticks >= 9  # the loop ran between the tight loop's runs of writes
    await until(lambda: len(got) == 100 + 10 * segments._WRITE_THROUGH_PER_TICK)
    assert got == list(range(len(got)))


async def test_a_task_at_its_share_of_the_iteration_keeps_its_place(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any
) -> None:
    """Appends stay in call order across tasks: a task that has used its share
    of writes in this loop iteration and must let the others run is written
    before a later call of another task (and before `destroy` closes)."""
    got: list[Any] = []
    peer_ipc.on("e", got.append)
    share = segments._WRITE_THROUGH_PER_TICK

    async def tight() -> None:
        for i in range(share + 1):  # the last call is past this iteration's share
            await ipc.notify("e", i)

    async def later() -> None:
        await ipc.notify("e", "later")

    await asyncio.gather(tight(), later())  # `later` runs while `tight` yields
    await until(lambda: len(got) == share + 2)
    assert got == [*range(share + 1), "later"]


async def test_a_batch_is_all_or_nothing(
    ipc: AsyncIPC,
    peer_ipc: AsyncIPC,
    until: Any,
    monkeypatch: pytest.MonkeyPatch,
    group_commit: None,
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
    for i in range(10):  # small batches: written whole
        await ipc.notify("e", i)
    # One batch of 200, torn: none of its records is acknowledged or delivered.
    results = await asyncio.gather(
        *(ipc.notify("e", i) for i in range(10, 210)), return_exceptions=True
    )
    assert all(isinstance(r, BackendFullError) for r in results)
    acked = list(range(10))
    failing = False
    await ipc.notify("e", "next")
    await until(lambda: got[-1:] == ["next"])
    assert got == [*acked, "next"]  # no record of the torn batch was delivered


async def test_notify_cancelled_while_batched_leaves_no_partial_record(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any, group_commit: None
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
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any, group_commit: None
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
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any, group_commit: None
) -> None:
    mine, theirs = AsyncCache(ipc), AsyncCache(peer_ipc)
    # 40 concurrent sets wait for the group write at the end of the loop
    # iteration. Once it is written, and before their tasks resume, cancel
    # them: each caller gets CancelledError, though its write is stored.
    tasks = [asyncio.create_task(mine.set("k", i, 0)) for i in range(40)]
    await asyncio.sleep(0)  # the tasks run: all 40 queued
    await asyncio.sleep(0)  # the end-of-iteration write: the 24 futures resolve
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[-1], asyncio.CancelledError)  # cancelled, yet written
    assert await mine.get("k") == 39  # this process applied it ...
    await until(lambda: peer_ipc.stats()["records_read"] == 40)
    assert await theirs.get("k") == 39  # ... as every peer did


async def test_a_write_no_snapshot_makes_room_for_is_refused_as_full(
    ipc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At its share of `max_footprint`, with no snapshot to make room, a cache
    write waits, then is refused with `BackendFullError` (errno ENOSPC)."""
    monkeypatch.setattr(cap, "ROOM_WAIT", 0.2)
    monkeypatch.setattr(snapshots.Snapshots, "request", lambda self: None)
    async with AsyncIPC(ipc_dir, segment_bytes=64 * 1024, max_footprint=512 * 1024) as ipc:
        cache = AsyncCache(ipc)

        async def fill() -> None:
            for i in range(1000):
                await cache.set(f"k{i}", "x" * 4000, 0)

        with pytest.raises(BackendFullError, match="max_footprint") as raised:
            await fill()
        assert raised.value.errno == errno.ENOSPC


FILE_SIZE_LIMITED = textwrap.dedent(
    """
    import asyncio, resource, signal, sys
    from ivip_ipc_async import AsyncIPC
    from ivip_ipc_async.errors import BackendFullError

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
            except BackendFullError as exc:  # an OSError, errno EFBIG
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


_BURST = """
    import asyncio, json, sys
    from ivip_ipc_async import AsyncCache, AsyncIPC

    async def main() -> None:
        options = json.loads(sys.argv[2])
        async with AsyncIPC(sys.argv[1], **options) as ipc:
            print(json.dumps({"ready": True}), flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            cache = AsyncCache(ipc)
            n, kind, me = int(sys.argv[3]), sys.argv[4], sys.argv[5]
            if kind == "notify":
                await asyncio.gather(*(ipc.notify("e", "x" * 2000) for _ in range(n)))
            elif kind == "set":
                for i in range(n):  # the log grows past the cap, the state stays small
                    await cache.set(f"{me}-{i % 1000}", i, 0)
            else:  # "state": gathered 2 KB values over 300 keys: a state of 600 KB
                for first in range(0, n, 1000):
                    await asyncio.gather(
                        *(cache.set(f"{me}-{i % 300}", f"{i}:" + "x" * 2000, 0)
                          for i in range(first, first + 1000))
                    )
            print(json.dumps({"acked": n}), flush=True)
            await asyncio.to_thread(sys.stdin.readline)

    asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("kind", "writers", "count"),
    [("notify", 1, 20_000), ("set", 3, 30_000), ("state", 1, 20_000)],
)
async def test_size_cap_holds_at_every_instant(
    ipc_dir: Path, until: Any, kind: str, writers: int, count: int
) -> None:
    """Sampled every 50 ms from another process, the history (log/) never holds
    more than max_footprint plus one segment per writer, and the namespace no
    more than that plus the snapshot and its next copy (the live state, bounded
    apart by max_state_bytes); every acknowledged cache write reaches a late
    joiner. ("state": a state that is a large part of the cap, growing faster
    than snapshots are written.)"""
    cap, segment = 2 << 20, 256 << 10
    options = {**FAST, "max_footprint": cap, "segment_bytes": segment, "retention": 30.0}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(_BURST),
                str(ipc_dir),
                json.dumps(options),
                str(count),
                kind,
                f"w{n}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(writers)
    ]
    ns = ipc_dir / "default"
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert json.loads(await asyncio.to_thread(proc.stdout.readline)) == {"ready": True}
        samples: list[tuple[int, int]] = []  # (history, namespace)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()

        async def acked(proc: subprocess.Popen[str]) -> Any:
            assert proc.stdout is not None
            return json.loads(await asyncio.to_thread(proc.stdout.readline))

        done = asyncio.gather(*(acked(p) for p in procs))
        while not done.done():
            samples.append(await asyncio.to_thread(footprint, ns))
            await asyncio.sleep(0.05)
        assert await done == [{"acked": count}] * writers
        samples.append(footprint(ns))
        assert len(samples) > 3
        history = max(h for h, _ in samples)
        assert history <= cap + writers * segment, history
        # The live state of "state" (the largest): 300 keys of ~2 KB, ~620 KB;
        # on disk, the snapshot and its next copy while it is written.
        total = max(t for _, t in samples)
        assert total <= cap + writers * segment + 2 * 700_000, total
        if kind == "state":
            async with AsyncIPC(ipc_dir, **options) as joiner:
                late = AsyncCache(joiner)
                assert len(await late.keys()) == 300
                last = max(i for i in range(count) if i % 300 == 7)
                assert await late.get("w0-7") == f"{last}:" + "x" * 2000
        if kind == "set":
            async with AsyncIPC(ipc_dir, **options) as joiner:
                late = AsyncCache(joiner)
                assert len(await late.keys()) == writers * 1000
                assert await late.get("w0-7") == count - 1000 + 7
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
