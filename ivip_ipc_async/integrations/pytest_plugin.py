"""pytest plugin: an isolated shared directory per test, started instances, real peers.

Installed with the package (entry point `pytest11`), so the fixtures are there
in any test suite. Every fixture name starts with `ivip_`:

* `ivip_dir`: a fresh private directory (in /dev/shm when it exists), removed after.
* `ivip_ipc`: an `AsyncIPC` started on `ivip_dir`, destroyed after the test.
* `ivip_cache`: an `AsyncCache` on `ivip_ipc`.
* `ivip_defaults`: points the default `IPC` / `Cache` at `ivip_dir` (through
  `IVIP_IPC_DIR`) and destroys them after the test.
* `ivip_peer`: starts a real peer process (`python -c CODE` or a script) with
  `IVIP_IPC_DIR` set, and kills it after the test.

Example:
    A test using them (pytest-asyncio)::

        async def test_price_update_reaches_workers(ivip_ipc, ivip_peer):
            peer = ivip_peer('''
                import asyncio
                from ivip_ipc_async import IPC
                async def main():
                    print(await IPC.wait_for("price", timeout=10), flush=True)
                asyncio.run(main())
            ''')
            await peer.wait_ready(ivip_ipc)
            await ivip_ipc.notify("price", 42)
            assert await peer.read_line() == "42"
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ivip_ipc_async import AsyncCache, AsyncIPC

try:  # strict mode needs pytest-asyncio's decorator; auto mode takes either
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # pragma: no cover - pytest-asyncio is how async tests run
    _async_fixture = pytest.fixture  # type: ignore[assignment]

__all__ = ["Peer"]


@pytest.fixture
def ivip_dir() -> Iterator[Path]:
    """A private, empty shared directory for one test (0700), removed afterwards."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="ivip-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@_async_fixture
async def ivip_ipc(ivip_dir: Path) -> AsyncIterator[AsyncIPC]:
    """An `AsyncIPC` started on `ivip_dir`."""
    from ivip_ipc_async import AsyncIPC

    async with AsyncIPC(ivip_dir) as ipc:
        yield ipc


@pytest.fixture
def ivip_cache(ivip_ipc: AsyncIPC) -> AsyncCache[Any]:
    """An `AsyncCache` (name "default") on `ivip_ipc`."""
    from ivip_ipc_async import AsyncCache

    return AsyncCache(ivip_ipc)


@_async_fixture
async def ivip_defaults(ivip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Path]:
    """Point the default `IPC` and `Cache` at `ivip_dir` for one test."""
    from ivip_ipc_async import IPC

    await IPC.destroy()  # a previous test's instance must not leak in
    monkeypatch.setenv("IVIP_IPC_DIR", str(ivip_dir))
    yield ivip_dir
    await IPC.destroy()


class Peer:
    """A real peer process started by `ivip_peer`; its stdout is read line by line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    async def read_line(self, timeout: float = 10.0) -> str:
        """The next line the peer prints (without the newline)."""
        from ivip_ipc_async.waiting import wait_for  # 3.11's asyncio.wait_for loses cancellations

        assert self.proc.stdout is not None
        line = await wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        if not line:
            raise EOFError(f"peer exited with status {self.proc.poll()} before printing")
        return line.rstrip("\n")

    async def wait_ready(self, ipc: AsyncIPC, timeout: float = 10.0) -> None:
        """Wait until the peer has joined `ipc`'s directory (it shows as a live peer)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pid = self.proc.pid
        while not _has_peer(ipc, pid):
            if self.proc.poll() is not None:
                raise RuntimeError(f"peer exited with status {self.proc.returncode}")
            if loop.time() > deadline:
                raise TimeoutError("the peer process did not join in time")
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        """Terminate the peer (kill it if it does not go) and close its pipes."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stdin):
            if stream is not None:
                stream.close()


def _has_peer(ipc: AsyncIPC, pid: int) -> bool:
    import json

    path = getattr(ipc.medium.backend, "path", None)
    if path is None:
        return False
    for lock in Path(path, "peers").glob("*.lock"):
        try:
            if json.loads(lock.read_text()).get("pid") == pid:
                return True
        except (OSError, ValueError):
            continue
    return False


@pytest.fixture
def ivip_peer(ivip_dir: Path) -> Iterator[Callable[..., Peer]]:
    """Start real peer processes on `ivip_dir`: `ivip_peer(code)` or `ivip_peer(path, *args)`."""
    started: list[Peer] = []

    def start(code_or_script: str | Path, *args: str, **env: str) -> Peer:
        target = str(code_or_script)
        if target.endswith(".py") and Path(target).exists():
            command = [sys.executable, target, *args]
        else:
            command = [sys.executable, "-c", textwrap.dedent(target), *args]
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "IVIP_IPC_DIR": str(ivip_dir), **env},
        )
        peer = Peer(proc)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "ivip_ipc_async: tests using the ivip_ipc_async fixtures (informational)"
    )
