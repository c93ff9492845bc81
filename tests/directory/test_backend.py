"""The backend's life: locks let go after a fork or an ended loop, the maintenance
task, destroy mid-burst."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.backends.directory import reader

from .helpers import FAST, Script, lockable

_WRITER = """
    import asyncio, json, multiprocessing, sys, time
    from ivip_ipc_async import AsyncCache, AsyncIPC

    def helper() -> None:
        time.sleep(120)  # a plain forked helper: it never touches the library

    async def main() -> None:
        ipc = AsyncIPC(sys.argv[1], **json.loads(sys.argv[2]))
        await ipc.start()
        cache = AsyncCache(ipc)
        for i in range(int(sys.argv[3])):
            await cache.set(f"k{i}", i)
        peer = ipc.stats()["peer"]
        if sys.argv[4] == "fork":
            child = multiprocessing.get_context("fork").Process(target=helper)
            child.start()
            print(json.dumps({"peer": peer, "child": child.pid}), flush=True)
            await asyncio.sleep(3600)
        # "ended": return without destroy(), then go on with synchronous work
        print(json.dumps({"peer": peer}), flush=True)

    asyncio.run(main())
    if sys.argv[4] == "ended":
        print(json.dumps({"ended": True}), flush=True)
        time.sleep(3600)
"""


@pytest.mark.parametrize("how", ["fork", "ended"])
async def test_locks_do_not_outlive_their_instance(
    ipc_dir: Path, scripts: list[Script], until: Any, how: str
) -> None:
    """A forked helper of a killed peer, or an instance whose loop ended, holds no
    lock: the survivor takes over snapshots and collects it; joiners see every key."""
    keys = 2000
    victim = Script(_WRITER, str(ipc_dir), json.dumps(FAST), str(keys), how)
    scripts.append(victim)
    info = victim.line()
    child = info.get("child")
    try:
        async with AsyncIPC(ipc_dir, **FAST) as survivor:
            assert not survivor.stats()["snapshot_holder"]  # the victim holds it
            if how == "fork":
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait()
            else:
                assert victim.line() == {"ended": True}
            namespace = ipc_dir / "default"
            await until(lambda: lockable(namespace / "peers" / f"{info['peer']}.lock"), 5)
            await until(lambda: survivor.stats()["snapshot_holder"], 5)
            await until(lambda: not (namespace / "peers" / f"{info['peer']}.lock").exists(), 10)
            assert not list((namespace / "log").glob(f"{info['peer']}-*"))
        async with AsyncIPC(ipc_dir, **FAST) as joiner:
            assert len(await AsyncCache(joiner).keys()) == keys
    finally:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


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
