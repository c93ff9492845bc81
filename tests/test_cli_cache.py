"""`ivip-ipc cache ls|get|set|del|clear [--cache NAME]` against a running peer
process, on both backends (issue #25)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from .processes import reap
from .test_backends import medium  # noqa: F401 - the parametrized fixture

# A running peer: a named cache and the default one; answers {"op": "state"}
# with both caches' contents, and sets keys when told.
PEER = r"""
import asyncio, json, os, sys
from ivip_ipc_async import AsyncCache, AsyncIPC

async def main():
    path, namespace = sys.argv[1], sys.argv[2]
    async with AsyncIPC(path, namespace=namespace) as ipc:
        caches = {"sessions": AsyncCache(ipc, name="sessions"), "default": AsyncCache(ipc)}
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print(json.dumps({"ready": os.getpid()}), flush=True)
        while line := await reader.readline():
            command = json.loads(line)
            if command["op"] == "set":
                await caches[command["cache"]].set(command["key"], command["value"], 0)
                print(json.dumps({"ok": True}), flush=True)
            elif command["op"] == "state":
                state = {}
                for name, cache in caches.items():
                    keys = sorted(await cache.keys(), key=repr)
                    state[name] = [[k, await cache.get(k)] for k in keys]
                print(json.dumps(state), flush=True)

asyncio.run(main())
"""


class Peer:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ask(self, command: dict[str, Any]) -> Any:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()
        return json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 30))

    async def state_until(self, accept: Any, timeout: float = 20) -> dict[str, Any]:
        """The peer's caches, once `accept(state)` holds (fails past the deadline)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            state = await self.ask({"op": "state"})
            if accept(state):
                return dict(state)
            assert loop.time() < deadline, state
            await asyncio.sleep(0.02)


async def ivip(*args: str) -> tuple[int, str, str]:
    """The CLI as a real process: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ivip_ipc_async", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await reap(proc)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def where(medium: str) -> list[str]:  # noqa: F811
    path, _, namespace = medium.partition("#")
    return ["--dir", path, "--namespace", namespace or "default"]


async def test_cache_commands_reach_a_running_peer(medium: str) -> None:  # noqa: F811
    path, _, namespace = medium.partition("#")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PEER, path, namespace or "default",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    peer = Peer(proc)
    try:
        assert proc.stdout is not None
        assert "ready" in json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        await peer.ask({"op": "set", "cache": "sessions", "key": "a", "value": 1})
        await peer.ask({"op": "set", "cache": "default", "key": "b", "value": 2})
        at = where(medium)

        code, out, _ = await ivip("cache", "ls", "--cache", "sessions", *at)
        assert code == 0
        assert [json.loads(line) for line in out.splitlines()] == [{"key": "a", "value": 1}]
        code, out, _ = await ivip("cache", "ls", *at)  # the default cache: its own keys
        assert [json.loads(line) for line in out.splitlines()] == [{"key": "b", "value": 2}]

        code, _, _ = await ivip("cache", "set", "--cache", "sessions", "c", '{"x": 1}', *at)
        assert code == 0
        await peer.state_until(lambda s: ["c", {"x": 1}] in s["sessions"])
        code, out, _ = await ivip("cache", "get", "c", "--cache", "sessions", *at)
        assert (code, json.loads(out)) == (0, {"x": 1})

        code, _, _ = await ivip("cache", "del", "a", "--cache", "sessions", *at)
        assert code == 0
        await peer.state_until(lambda s: s["sessions"] == [["c", {"x": 1}]])
        code, _, err = await ivip("cache", "del", "a", "--cache", "sessions", *at)
        assert code == 1
        assert "not found" in err

        code, _, err = await ivip("cache", "clear", "--cache", "sessions", *at)
        assert code == 0
        assert "deleted 1 key" in err
        state = await peer.state_until(lambda s: s["sessions"] == [])
        assert state["default"] == [["b", 2]]  # another cache: untouched
        code, out, _ = await ivip("cache", "ls", "--cache", "sessions", *at)
        assert (code, out) == (0, "")

        code, _, _ = await ivip("cache", "clear", *at)
        assert code == 0
        await peer.state_until(lambda s: s["default"] == [])
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        await reap(proc)


@pytest.mark.parametrize(("old", "new"), [("list", "ls"), ("delete", "del")])
async def test_the_old_names_still_work(old: str, new: str, ipc_dir: Path) -> None:
    at = ["--dir", str(ipc_dir)]
    assert (await ivip("cache", "set", "k", "1", *at))[0] == 0
    code, out, _ = await ivip("cache", old, *(["k"] if old == "delete" else []), *at)
    assert code == 0
    if old == "list":
        assert json.loads(out) == {"key": "k", "value": 1}
    code, out, _ = await ivip("cache", "--help")
    assert code == 0
    assert f"{new} ({old})" in out  # the help names both
