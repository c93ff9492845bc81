"""Resources: nothing leaks across create/destroy cycles; readers' fds stay bounded."""

from __future__ import annotations

import asyncio
import os
import resource
import threading
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC

CYCLES = int(os.environ.get("IVIP_TEST_CYCLES", "1000"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def test_create_destroy_cycles_leak_nothing(ipc_dir: Path, until: Any) -> None:
    # Warm up once (imports, the default executor used for snapshots).
    async with AsyncIPC(ipc_dir, watch_step=5) as warm:
        await AsyncCache(warm).set("k", 0)
    fds, threads, tasks = _fds(), threading.active_count(), asyncio.all_tasks()
    rss = _rss_kib()
    for i in range(CYCLES):
        # A namespace per cycle: a start is then O(1), not a replay of every
        # earlier cycle's segments (those are kept for the retention window).
        ipc = AsyncIPC(ipc_dir, namespace=f"n{i % 50}-{i}", watch_step=5)
        await ipc.start()
        if i % 10 == 0:
            await ipc.notify("e", i)
        await ipc.destroy()
    # The watcher's inotify fd is closed at once; where the watchfiles thread is
    # the watcher, its Rust watcher hands its fds back from its own thread a
    # moment after it stops: wait for that, with a deadline.
    await until(lambda: _fds() <= fds, timeout=5)
    assert threading.active_count() == threads
    assert asyncio.all_tasks() == tasks
    assert _rss_kib() - rss < 32 * 1024  # KiB: no growth with the cycle count


@pytest.mark.once_per_ci  # the kernel's fd limit and 300 dead peers: no Python-version path
async def test_many_dead_peers_do_not_exhaust_a_readers_fds(ipc_dir: Path, until: Any) -> None:
    async with AsyncIPC(ipc_dir, rescan_interval=0.02) as reader:
        got: list[int] = []
        reader.on("e", got.append)
        fds = _fds()
        for i in range(300):
            async with AsyncIPC(ipc_dir, watch_step=5) as short_lived:
                await short_lived.notify("e", i)
        await until(lambda: len(got) == 300)
        assert sorted(got) == list(range(300))
        # Open segments are capped, and those of dead writers read to the end are
        # closed once the liveness check has seen them die.
        await until(lambda: _fds() <= fds + 10, timeout=15)
