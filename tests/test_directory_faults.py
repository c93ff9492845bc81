"""The directory backend under hostile faults (issue #10), across real processes.

Each test here failed on the code before its fix: forked helpers and ended event
loops that kept locks, planted files, forged frames, damaged snapshots, leftovers
of killed writers, the size cap and long loop stalls.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC

FAST = {"rescan_interval": 0.1, "retention": 1.0, "snapshot_interval": 0.1}


class Script:
    """A Python program in its own process that prints JSON lines."""

    def __init__(self, code: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(self, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"no line from the script within {timeout}s")
        text = self.proc.stdout.readline()
        if not text:
            raise AssertionError(f"the script ended (exit {self.proc.wait()})")
        out: dict[str, Any] = json.loads(text)
        return out

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def scripts() -> Iterator[list[Script]]:
    started: list[Script] = []
    yield started
    for script in started:
        script.kill()


def lockable(path: Path) -> bool:
    """Whether nobody holds the flock on `path` (we take it and give it back)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


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
