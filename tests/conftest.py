"""Shared fixtures: an isolated shared directory per test, and started instances."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC

_BASE = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`.ci/run` runs the suite on each supported Python and sets IVIP_CI_REPEAT=1
    after the first: tests marked `once_per_ci` (their behaviour does not depend
    on the interpreter) then skip, which keeps CI within its time budget."""
    if os.environ.get("IVIP_CI_REPEAT") != "1":
        return
    skip = pytest.mark.skip(reason="once_per_ci: ran on CI's first interpreter (IVIP_CI_REPEAT=1)")
    for item in items:
        if item.get_closest_marker("once_per_ci") is not None:
            item.add_marker(skip)


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    """A fresh shared directory (memory-backed where possible), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ivip-test-", dir=_BASE))
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def ipc(ipc_dir: Path) -> AsyncIterator[AsyncIPC]:
    """A started `AsyncIPC` on `ipc_dir`."""
    async with AsyncIPC(ipc_dir) as instance:
        yield instance


@pytest.fixture
async def peer_ipc(ipc_dir: Path) -> AsyncIterator[AsyncIPC]:
    """A second started `AsyncIPC` on the same directory (another peer in-process)."""
    async with AsyncIPC(ipc_dir) as instance:
        yield instance


@pytest.fixture
async def cache(ipc: AsyncIPC) -> AsyncCache:
    return AsyncCache(ipc)


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.002
) -> None:
    """Poll `predicate` until true, failing the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await asyncio.sleep(interval)


@pytest.fixture
def until() -> Callable[..., Any]:
    """`await until(lambda: cond)`: wait for a condition with a deadline."""
    return wait_until
