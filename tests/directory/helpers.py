"""Helpers shared by the directory backend's tests: scripts and peers in their own
processes, planted segments, other users."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async.records import Kind, Record, encode_frame

FAST = {"rescan_interval": 0.1, "retention": 1.0, "snapshot_interval": 0.1}


FAKE = "00000000deadbeef"


class Script:
    """A Python program in its own process that prints JSON lines."""

    def __init__(self, code: str, *args: str) -> None:
        # Unbuffered: a buffered reader could read two lines at once, and the
        # select below would then wait for a second line already read.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            stdout=subprocess.PIPE,
            bufsize=0,
        )

    def line(self, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"no line from the script within {timeout}s")
        text = self.proc.stdout.readline()  # unbuffered: reads up to the newline only
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


def ticker_gaps() -> tuple[asyncio.Task[None], list[float]]:
    """A task that ticks every ms and records the longest gaps between ticks."""
    gaps: list[float] = []

    async def tick() -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.001)
            now = loop.time()
            gaps.append(now - last)
            last = now

    return asyncio.get_running_loop().create_task(tick()), gaps


PEER_SCRIPT = str(Path(__file__).parent.parent / "peer.py")


class Peer:
    """tests/peer.py in its own process: JSON commands in, JSON answers out."""

    def __init__(self, path: Path, *options: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, PEER_SCRIPT, str(path), *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.read()["ready"]

    def read(self) -> Any:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    async def ask(self, **command: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return await asyncio.to_thread(self.read)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def namespace_bytes(ns: Path) -> int:
    total = 0
    for where in (ns, ns / "log"):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(where):
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
    return total


def write_segment(ipc_dir: Path, name: str, data: bytes) -> Path:
    log = ipc_dir / "default" / "log"
    log.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = log / name
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def message(event: str, data: bytes, seq: int) -> bytes:
    return encode_frame(Record(Kind.MESSAGE, event, b"", data), seq)


NOBODY = 65534


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a child process as another local user."""
    # Import first: after the switch, root's Python installation may be unreadable.
    prelude = f"import os, socket\nos.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
    )
