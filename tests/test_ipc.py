"""The AsyncIPC contract, with two peers in one process (separate processes: test_processes)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncIPC, IPCClosedError, MessageStream


async def test_notify_reaches_other_peer_not_self(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any
) -> None:
    mine: list[Any] = []
    theirs: list[Any] = []
    ipc.on("user:updated", mine.append)
    peer_ipc.on("user:updated", theirs.append)
    await ipc.notify("user:updated", {"id": 7})
    await until(lambda: theirs == [{"id": 7}])
    assert mine == []


async def test_include_self_reaches_own_handlers(ipc: AsyncIPC) -> None:
    got: list[Any] = []
    ipc.on("x", got.append)
    await ipc.notify("x", 1, include_self=True)
    assert got == [1]


async def test_order_of_one_sender_is_kept(ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any) -> None:
    got: list[int] = []
    peer_ipc.on("n", got.append)
    await asyncio.gather(*(ipc.notify("n", i) for i in range(500)))
    for i in range(500, 700):
        await ipc.notify("n", i)
    await until(lambda: len(got) == 700)
    assert got == list(range(700))


async def test_once_off_and_stop(ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any) -> None:
    once: list[int] = []
    always: list[int] = []
    stopped: list[int] = []
    removed: list[int] = []
    peer_ipc.once("e", once.append)
    peer_ipc.on("e", always.append)
    sub = peer_ipc.on("e", stopped.append)
    peer_ipc.on("e", removed.append)
    sub.stop()
    sub.stop()  # idempotent
    assert peer_ipc.off("e", removed.append) == 1
    await ipc.notify("e", 1)
    await ipc.notify("e", 2)
    await until(lambda: always == [1, 2])
    assert once == [1]
    assert stopped == []
    assert removed == []
    assert peer_ipc.off("e") == 1
    assert peer_ipc.listener_count("e") == 0


async def test_handlers_registered_before_start(ipc_dir: Path, ipc: AsyncIPC, until: Any) -> None:
    late = AsyncIPC(ipc_dir)
    got: list[Any] = []
    late.on("hello", got.append)  # before start: just registers
    assert not late.started
    async with late:
        await ipc.notify("hello", "world")
        await until(lambda: got == ["world"])


async def test_raising_handler_is_logged_and_others_run(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[Any] = []

    def bad(_: Any) -> None:
        raise RuntimeError("boom")

    async def bad_async(_: Any) -> None:
        raise RuntimeError("async boom")

    peer_ipc.on("evt", bad)
    peer_ipc.on("evt", bad_async)
    peer_ipc.on("evt", got.append)
    with caplog.at_level(logging.ERROR, logger="ivip_ipc_async"):
        await ipc.notify("evt", 1)
        await ipc.notify("evt", 2)
        await until(lambda: got == [1, 2] and peer_ipc.stats()["handler_errors"] == 4)
    assert "'evt'" in caplog.text
    assert "boom" in caplog.text


async def test_a_lone_handler_gets_the_same_treatment(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """One listener per event is the common case, and has its own fast path:
    errors counted and logged, async handlers started, `once` fired once, and a
    listener added by a handler hears the very next record."""
    later: list[Any] = []
    once: list[Any] = []
    started: list[Any] = []

    def bad(message: Any) -> None:
        if message == 1:
            peer_ipc.on("bad", later.append)
        raise RuntimeError("lone boom")

    async def bad_async(message: Any) -> None:
        started.append(message)
        raise RuntimeError("lone async boom")

    peer_ipc.on("bad", bad)
    peer_ipc.on("async", bad_async)
    peer_ipc.once("once", once.append)
    with caplog.at_level(logging.ERROR, logger="ivip_ipc_async"):
        await ipc.notify_many("bad", [1, 2])
        await ipc.notify_many("async", [1, 2])
        await ipc.notify_many("once", [1, 2])
        await until(lambda: started == [1, 2] and peer_ipc.stats()["handler_errors"] == 4)
    await until(lambda: once == [1] and later == [2])
    assert "lone boom" in caplog.text
    assert "lone async boom" in caplog.text
    assert peer_ipc.listener_count("once") == 0


async def test_async_handler_does_not_block_later_records(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any
) -> None:
    release = asyncio.Event()
    started: list[int] = []
    sync_seen: list[int] = []

    async def slow(message: int) -> None:
        started.append(message)
        await release.wait()

    peer_ipc.on("s", slow)
    peer_ipc.on("s", sync_seen.append)
    for i in range(3):
        await ipc.notify("s", i)
    await until(lambda: sync_seen == [0, 1, 2] and started == [0, 1, 2])
    release.set()


async def test_handlers_get_their_own_copy(ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any) -> None:
    seen: list[Any] = []

    def mutate(message: dict[str, Any]) -> None:
        message["mutated"] = True

    peer_ipc.on("m", mutate)
    peer_ipc.on("m", seen.append)
    await ipc.notify("m", {"a": 1})
    await until(lambda: len(seen) == 1)
    assert seen == [{"a": 1}]


async def test_wait_for_and_timeout(ipc: AsyncIPC, peer_ipc: AsyncIPC) -> None:
    waiter = asyncio.create_task(peer_ipc.wait_for("ready", timeout=10))
    await asyncio.sleep(0)  # let it register
    await ipc.notify("ready", {"ok": True})
    assert await waiter == {"ok": True}
    assert peer_ipc.listener_count("ready") == 0
    with pytest.raises(TimeoutError):
        await peer_ipc.wait_for("never", timeout=0.05)
    assert peer_ipc.listener_count("never") == 0


async def test_wait_for_cancelled_leaves_no_listener(ipc: AsyncIPC) -> None:
    task = asyncio.create_task(ipc.wait_for("x"))
    await asyncio.sleep(0.01)
    assert ipc.listener_count("x") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ipc.listener_count("x") == 0


async def test_wait_for_raises_when_destroyed(ipc_dir: Path) -> None:
    ipc = AsyncIPC(ipc_dir)
    await ipc.start()
    task = asyncio.create_task(ipc.wait_for("x"))
    await asyncio.sleep(0.01)
    await ipc.destroy()
    with pytest.raises(IPCClosedError):
        await task


async def test_subscribe_iterates_and_unsubscribes_on_break(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any
) -> None:
    stream = peer_ipc.subscribe("ticks")
    assert peer_ipc.listener_count("ticks") == 1
    for i in range(5):
        await ipc.notify("ticks", i)
    got = []
    async for message in stream:
        got.append(message)
        if len(got) == 5:
            break
    assert got == [0, 1, 2, 3, 4]
    # The iterator is finalised on break (asyncio closes it within a few loop
    # iterations); the stream unsubscribes.
    await until(lambda: peer_ipc.listener_count("ticks") == 0, timeout=2)
    assert stream.closed


async def test_subscribe_context_manager_and_overflow(ipc: AsyncIPC, peer_ipc: AsyncIPC) -> None:
    async with peer_ipc.subscribe("burst", maxsize=10) as stream:
        assert isinstance(stream, MessageStream)
        got: list[int] = []
        await asyncio.gather(*(ipc.notify("burst", i) for i in range(50)))
        got.append(await asyncio.wait_for(stream.get(), 5))
        while len(got) < 10 and stream.dropped + len(got) < 50:
            got.append(await asyncio.wait_for(stream.get(), 5))
        # the oldest were dropped, the newest kept, in order
        assert got == sorted(got)
        assert got[-1] == 49
        assert stream.dropped == 50 - len(got) - len(stream._buffer)
    assert peer_ipc.listener_count("burst") == 0


async def test_subscribe_ends_when_destroyed(ipc_dir: Path) -> None:
    ipc = AsyncIPC(ipc_dir)
    await ipc.start()
    stream = ipc.subscribe("x")

    async def consume() -> list[Any]:
        return [m async for m in stream]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    await ipc.destroy()
    assert await asyncio.wait_for(task, 5) == []


async def test_start_is_idempotent_and_concurrent(ipc_dir: Path) -> None:
    ipc = AsyncIPC(ipc_dir)
    try:
        results = await asyncio.gather(ipc.start(), ipc.start(), ipc.start())
        assert all(r is ipc for r in results)
        assert len(list((ipc_dir / "default" / "peers").glob("*.lock"))) == 1
    finally:
        await ipc.destroy()
    await ipc.destroy()  # idempotent


async def test_destroy_drops_listeners_and_releases_files(ipc_dir: Path) -> None:
    ipc = AsyncIPC(ipc_dir)
    ipc.on("a", print)
    await ipc.start()
    await ipc.destroy()
    assert ipc.listener_count() == 0
    assert not ipc.started
    assert list((ipc_dir / "default" / "peers").glob("*.sock")) == []


async def test_namespaces_are_isolated(ipc_dir: Path, until: Any) -> None:
    async with (
        AsyncIPC(ipc_dir, namespace="a") as a1,
        AsyncIPC(ipc_dir, namespace="a") as a2,
        AsyncIPC(ipc_dir, namespace="b") as b,
    ):
        in_a: list[Any] = []
        in_b: list[Any] = []
        a2.on("e", in_a.append)
        b.on("e", in_b.append)
        await a1.notify("e", 1)
        await until(lambda: in_a == [1])
        await b.notify("x", 0)  # b is alive and reading
        assert in_b == []


async def test_unserializable_message_is_refused_before_writing(ipc: AsyncIPC) -> None:
    before = ipc.stats()["records_written"]
    with pytest.raises(TypeError):
        await ipc.notify("e", object())
    circular: list[Any] = []
    circular.append(circular)
    with pytest.raises(TypeError):
        await ipc.notify("e", circular)
    with pytest.raises(TypeError):
        await ipc.notify(42, "x")  # type: ignore[arg-type]
    assert ipc.stats()["records_written"] == before


async def test_oversized_record_is_refused(ipc_dir: Path) -> None:
    async with AsyncIPC(ipc_dir, max_record_size=4096) as ipc:
        with pytest.raises(ValueError, match="over the limit of 4096"):
            await ipc.notify("big", "x" * 5000)
        with pytest.raises(ValueError, match="too long"):
            await ipc.notify("e" * 70_000, 1)
        await ipc.notify("small", "x" * 1000)
        assert ipc.stats()["records_written"] == 1


async def test_notify_many_keeps_order_and_refuses_bad_input_before_writing(
    ipc_dir: Path, until: Any
) -> None:
    async with AsyncIPC(ipc_dir, max_record_size=4096) as a, AsyncIPC(ipc_dir) as b:
        got: list[Any] = []
        mine: list[Any] = []
        b.on("n", got.append)
        a.on("n", mine.append)
        with pytest.raises(TypeError):
            await a.notify_many("n", [1, object()])
        with pytest.raises(ValueError, match="over the limit of 4096"):
            await a.notify_many("n", [1, "x" * 5000])
        assert a.stats()["records_written"] == 0
        # 300 messages of ~100 bytes do not fit one 4 KiB record: written in parts.
        messages = [{"i": i, "pad": "x" * 80} for i in range(300)]
        await a.notify_many("n", iter(messages), include_self=True)
        assert a.stats()["batches_written"] > 1
        assert mine == messages
        await until(lambda: len(got) == 300)
        assert got == messages
        await a.notify_many("n", [])  # nothing to send is fine
        assert a.stats()["records_written"] == 300


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="namespace"):
        AsyncIPC("/tmp/x", namespace="../etc")
    with pytest.raises(ValueError, match="namespace"):
        AsyncIPC("/tmp/x", namespace="a/b")
    with pytest.raises(ValueError, match="max_record_size"):
        AsyncIPC("/tmp/x", max_record_size=10)


async def test_unsupported_url_scheme(ipc_dir: Path) -> None:
    with pytest.raises(ValueError, match="unsupported backend URL scheme"):
        await AsyncIPC("ftp://example.com/x").start()


async def test_file_url_is_a_directory(ipc_dir: Path, until: Any) -> None:
    async with AsyncIPC(f"file://{ipc_dir}") as a, AsyncIPC(ipc_dir) as b:
        got: list[Any] = []
        b.on("e", got.append)
        await a.notify("e", 1)
        await until(lambda: got == [1])


async def test_stats_report_health(ipc: AsyncIPC, peer_ipc: AsyncIPC, until: Any) -> None:
    await ipc.notify("e", 1)
    stats = ipc.stats()
    assert stats["started"] is True
    assert stats["watcher_alive"] is True
    assert stats["records_written"] == 1
    await until(lambda: peer_ipc.stats()["records_read"] >= 1)
    await until(lambda: len(ipc.stats()["peers"]) == 1)


@pytest.mark.parametrize("watcher", ["default", "watchfiles"])
async def test_destroy_leaves_no_thread_or_task_and_holds_no_anyio_token(
    ipc_dir: Path, monkeypatch: pytest.MonkeyPatch, watcher: str
) -> None:
    import sys
    import threading

    import anyio.to_thread

    if watcher == "watchfiles":
        monkeypatch.setenv("IVIP_IPC_WATCHER", "watchfiles")
    threaded = watcher == "watchfiles" or sys.platform != "linux"
    before_tasks = asyncio.all_tasks()
    ipc = AsyncIPC(ipc_dir)
    await ipc.start()
    # On Linux the watcher is an inotify fd on the event loop: no thread.
    assert any(t.name == "ivip-ipc-watch" for t in threading.enumerate()) is threaded
    # The watchfiles fallback runs in our own thread, not through anyio's shared
    # limiter (FastAPI's sync endpoints use that one).
    assert anyio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    await ipc.destroy()
    assert loop.time() - started < 1.0
    assert not any(t.name == "ivip-ipc-watch" for t in threading.enumerate())
    assert asyncio.all_tasks() == before_tasks


async def test_processes_may_mix_json_and_orjson(ipc_dir: Path, until: Any) -> None:
    async with (
        AsyncIPC(ipc_dir, codec="orjson") as fast,
        AsyncIPC(ipc_dir, codec="json") as std,
    ):
        got_fast: list[Any] = []
        got_std: list[Any] = []
        fast.on("e", got_fast.append)
        std.on("e", got_std.append)
        await fast.notify("e", {"from": "orjson"})
        await std.notify("e", {"from": "json"})
        await until(lambda: got_fast == [{"from": "json"}] and got_std == [{"from": "orjson"}])


async def test_codec_from_the_environment(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ivip_ipc_async import OrjsonCodec

    monkeypatch.setenv("IVIP_IPC_CODEC", "orjson")
    assert isinstance(AsyncIPC(ipc_dir).codec, OrjsonCodec)
    monkeypatch.setenv("IVIP_IPC_CODEC", "nope")
    with pytest.raises(ValueError, match="unknown codec"):
        AsyncIPC(ipc_dir)


async def test_notify_keeps_the_size_of_short_event_names_only(ipc: AsyncIPC) -> None:
    """`notify` checks a name once and keeps its size, for names of up to 256
    bytes: 1,024 names of 64 KiB would otherwise hold 64 MiB."""
    await ipc.notify("short", 1)
    await ipc.notify("x" * 300, 1)
    assert set(ipc._event_sizes) == {"short"}
    with pytest.raises(TypeError):
        await ipc.notify(b"bytes", 1)  # type: ignore[arg-type]
