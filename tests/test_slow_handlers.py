"""Slow handlers: a sync handler that holds the loop is named in a warning,
rate-limited, and counted in `stats()` (issue #25)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncIPC

from .processes import reap

# A child process: a receiver whose sync handler time.sleep()s, a sender on the
# same directory (another peer), the package's warnings on stderr.
CHILD = r"""
import asyncio, json, logging, sys, time
from ivip_ipc_async import AsyncIPC

logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(message)s")
path, threshold, interval, mode = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]

class Worker:
    def __init__(self):
        self.seen = 0

    def blocking(self, message):
        self.seen += 1
        time.sleep(0.12)

def quick(message):
    pass

async def main():
    worker = Worker()
    receiver = AsyncIPC(path, slow_handler_threshold=threshold or None)
    receiver.slow_handler_log_interval = interval
    async with receiver, AsyncIPC(path) as sender:
        if mode == "two":
            receiver.on("tick", quick)
        receiver.on("tick", worker.blocking)
        deadline = time.monotonic() + 20

        async def send(i):
            await sender.notify("tick", i)
            while worker.seen <= i and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

        for i in range(3):
            await send(i)  # one at a time: each its own dispatch
        if mode == "again":
            await asyncio.sleep(interval)  # past the rate limit's interval
            await send(3)
        print(json.dumps({"seen": worker.seen, "stats": receiver.stats()}), flush=True)

asyncio.run(main())
"""


async def run_child(
    path: Path, threshold: float, interval: float, mode: str = "once"
) -> tuple[dict[str, Any], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(path), str(threshold), str(interval), mode,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await reap(proc)
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1]), err.decode()


def slow_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "held the event loop" in line]


async def test_a_blocking_handler_is_named_once_per_interval(ipc_dir: Path) -> None:
    result, stderr = await run_child(ipc_dir, 0.05, 60.0)
    assert result["seen"] == 3
    lines = slow_lines(stderr)
    assert len(lines) == 1, stderr  # three slow calls, one warning
    assert lines[0].startswith("WARNING")
    assert "__main__.Worker.blocking" in lines[0], lines[0]
    assert "'tick'" in lines[0], lines[0]
    stats = result["stats"]
    assert stats["slow_handlers"] == 3
    assert stats["dispatch_seconds"] >= 3 * 0.12


async def test_the_next_warning_counts_the_suppressed_ones(ipc_dir: Path) -> None:
    result, stderr = await run_child(ipc_dir, 0.05, 0.5, "again")
    assert result["seen"] == 4
    lines = slow_lines(stderr)
    assert len(lines) == 2, stderr
    assert "2 similar messages suppressed" in lines[1], lines[1]
    assert result["stats"]["slow_handlers"] == 4


async def test_switched_off_it_says_nothing_but_still_counts_time(ipc_dir: Path) -> None:
    result, stderr = await run_child(ipc_dir, 0.0, 60.0)
    assert slow_lines(stderr) == [], stderr
    assert result["stats"]["slow_handlers"] == 0
    assert result["stats"]["dispatch_seconds"] >= 3 * 0.12


async def test_of_two_handlers_the_slow_one_is_named_next_time(ipc_dir: Path) -> None:
    """Both handlers of the event ran in the slow dispatch: both are named, then
    each call is timed, and the next slow one is named alone."""
    result, stderr = await run_child(ipc_dir, 0.05, 60.0, "two")
    lines = slow_lines(stderr)
    assert len(lines) == 2, stderr
    assert "__main__.Worker.blocking for 'tick'" in lines[0], lines[0]
    assert "__main__.quick for 'tick'" in lines[0], lines[0]
    assert "timing each call" in lines[0], lines[0]
    assert "handler __main__.Worker.blocking for event 'tick' held" in lines[1], lines[1]
    assert "quick" not in lines[1], lines[1]
    assert result["stats"]["slow_handlers"] == 3


def test_threshold_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IVIP_IPC_SLOW_HANDLER", "0.2")
    assert AsyncIPC("/tmp/unused").slow_handler_threshold == 0.2
    monkeypatch.setenv("IVIP_IPC_SLOW_HANDLER", "off")
    assert AsyncIPC("/tmp/unused").slow_handler_threshold is None
    monkeypatch.setenv("IVIP_IPC_SLOW_HANDLER", "soon")
    with pytest.raises(ValueError, match="IVIP_IPC_SLOW_HANDLER"):
        AsyncIPC("/tmp/unused")
    monkeypatch.delenv("IVIP_IPC_SLOW_HANDLER")
    assert AsyncIPC("/tmp/unused").slow_handler_threshold == 0.05
    assert AsyncIPC("/tmp/unused", slow_handler_threshold=0).slow_handler_threshold is None


async def test_timing_each_call_ends_after_the_interval(ipc_dir: Path) -> None:
    """After a slow dispatch of several handlers, calls are timed one by one for
    `slow_handler_log_interval` seconds only; then dispatches are timed whole again."""
    async with AsyncIPC(ipc_dir, slow_handler_threshold=0.05) as ipc:
        ipc.slow_handler_log_interval = 0.2
        emitter = ipc._emitter
        emitter.held_loop(0.3, {("a", print): 1, ("b", repr): 1})
        assert emitter.timing
        await asyncio.sleep(0.25)  # the interval passes (a wait on time itself)
        got: list[int] = []
        ipc.on("x", got.append)
        await ipc.notify("x", 1, include_self=True)
        assert got == [1]
        assert emitter.timing is False
