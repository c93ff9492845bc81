"""Faults of an instance: cancelled waits, a stuck handler, health (the directory
backend's own faults are in tests/directory/)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ivip_ipc_async import AsyncIPC


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
