"""Incremental snapshots: a snapshot costs what changed since the last one, not
the whole cache, and late joiners still see exactly every acknowledged key
(after several deltas, after a merge into a new base, past a planted garbage
delta, and after the snapshot writer was killed in the middle of one)."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.records import FrameReader

from .helpers import FAST

# A writer in its own process: JSON commands on stdin, one JSON line out for each.
#   {"op": "set", "items": {key: value}}  set them (1,000 gathered at a time)
#   {"op": "delete", "keys": [...]}        delete them
#   {"op": "covered"}                      wait until a snapshot covers every
#                                          write so far, none being written
# Every write is acknowledged (its line printed) only once every call returned.
_WRITER = """
    import asyncio, json, sys, time
    from ivip_ipc_async import AsyncCache, AsyncIPC

    async def main() -> None:
        options = json.loads(sys.argv[2])
        async with AsyncIPC(sys.argv[1], **options) as ipc:
            cache = AsyncCache(ipc)
            snaps = ipc._backend._snapshots
            peer = ipc.stats()["peer"]
            loop = asyncio.get_running_loop()
            stdin = asyncio.StreamReader(limit=64 << 20)
            await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin
            )
            print(json.dumps({"ready": ipc.stats()["snapshot_holder"]}), flush=True)
            while line := await stdin.readline():
                cmd = json.loads(line)
                if cmd["op"] == "set":
                    items = list(cmd["items"].items())
                    for i in range(0, len(items), 1000):
                        await asyncio.gather(
                            *(cache.set(k, v, 0) for k, v in items[i : i + 1000])
                        )
                elif cmd["op"] == "delete":
                    await asyncio.gather(*(cache.delete(k) for k in cmd["keys"]))
                elif cmd["op"] == "covered":
                    target = snaps._own.seq
                    deadline = time.monotonic() + 30
                    while not (
                        snaps.positions.of(peer)[2] >= target
                        and (snaps.task is None or snaps.task.done())
                    ):
                        assert time.monotonic() < deadline, "no snapshot covers the writes"
                        await asyncio.sleep(0.005)
                print(json.dumps({"done": cmd["op"]}), flush=True)

    asyncio.run(main())
"""


class Writer:
    """`_WRITER` in its own process."""

    def __init__(self, path: Path, env: dict[str, str] | None = None, **options: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_WRITER), str(path), json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.holder = self._read()["ready"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the writer ended (exit {self.proc.poll()})"
        out: dict[str, Any] = json.loads(line)
        return out

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def ask(self, **command: Any) -> None:
        self.send(**command)
        assert self._read() == {"done": command["op"]}

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def snapshot_files(ns: Path) -> dict[tuple[str, int], int]:
    """(name, inode) -> size of every snapshot file (base and deltas)."""
    out = {}
    for entry in os.scandir(ns):
        if entry.name.startswith("snapshot.") and entry.name != "snapshot.lock":
            st = entry.stat(follow_symlinks=False)
            out[(entry.name, st.st_ino)] = st.st_size
    return out


def deltas(ns: Path) -> list[str]:
    return sorted(n for n in os.listdir(ns) if n.endswith(".delta"))


async def joined_state(ipc_dir: Path, **options: Any) -> dict[Any, Any]:
    """Everything a late joiner's cache holds once started."""
    async with AsyncIPC(ipc_dir, **options) as joiner:
        cache: AsyncCache[Any] = AsyncCache(joiner)
        return await cache.get_many(await cache.keys())


def value(j: int) -> dict[str, Any]:
    return {"id": j, "name": "x" * 40}


async def test_a_snapshot_after_a_few_writes_costs_what_changed(ipc_dir: Path) -> None:
    """50,000 keys, then rounds of a few writes, each covered by a snapshot: the
    snapshots of those rounds write bytes in proportion to the few keys that
    changed, not to the 50,000 (before: each rewrote the whole state, ~5 MB), and
    a late joiner then holds exactly every acknowledged key."""
    ns = ipc_dir / "default"
    expected: dict[Any, Any] = {f"k{j}": value(j) for j in range(50_000)}
    writer = Writer(ipc_dir, snapshot_interval=0.05, rescan_interval=0.05)
    try:
        writer.ask(op="set", items=expected)
        writer.ask(op="covered")
        state_bytes = max(snapshot_files(ns).values())  # the state, written whole once
        assert state_bytes > 4_000_000
        costs = []
        for r in range(12):
            files = snapshot_files(ns)
            items = {f"k{r * 7 + i}": {"round": r, "i": i} for i in range(6)}
            items[f"new{r}"] = r
            writer.ask(op="set", items=items)
            writer.ask(op="delete", keys=[f"k{40_000 + r}"])
            expected.update(items)
            del expected[f"k{40_000 + r}"]
            writer.ask(op="covered")
            now = snapshot_files(ns)
            costs.append(sum(size for f, size in now.items() if f not in files))
        # At most one merge into a new base among the rounds; each other round
        # writes a few KB.
        assert statistics.median(costs) < 64 << 10, costs
        assert sum(costs) < 1.5 * state_bytes, costs
        assert await joined_state(ipc_dir) == expected
    finally:
        writer.kill()


async def test_late_joiners_after_deltas_a_merge_and_a_planted_delta(
    ipc_dir: Path, until: Any
) -> None:
    ns = ipc_dir / "default"
    expected: dict[Any, Any] = {f"k{j}": j for j in range(3000)}
    writer = Writer(ipc_dir, **FAST)
    try:
        writer.ask(op="set", items=expected)
        writer.ask(op="covered")
        for r in range(4):  # small rounds: deltas
            items = {f"k{r * 10 + i}": -r for i in range(10)}
            writer.ask(op="set", items=items)
            writer.ask(op="delete", keys=[f"k{2000 + r}"])
            expected.update(items)
            del expected[f"k{2000 + r}"]
            writer.ask(op="covered")
        assert len(deltas(ns)) >= 2
        assert await joined_state(ipc_dir) == expected
        base = os.stat(ns / "snapshot.bin").st_ino
        for r in range(3):  # every key again: merged into a new base
            items = {k: [r, k] for k in expected}
            writer.ask(op="set", items=items)
            expected.update(items)
            writer.ask(op="covered")
        assert os.stat(ns / "snapshot.bin").st_ino != base
        assert await joined_state(ipc_dir) == expected
        # A garbage delta planted after the last one: skipped with a warning, the
        # joiner still holds everything; the holder writes a new base.
        writer.ask(op="set", items={"before-plant": 1})
        expected["before-plant"] = 1
        writer.ask(op="covered")
        head = (ns / "snapshot.bin").read_bytes()[:65536]
        meta = json.loads(FrameReader(16 << 20).feed(head)[0].data)
        numbers = [int(re.split(r"\.", n)[2]) for n in deltas(ns) if meta["base"] in n]
        planted = ns / f"snapshot.{meta['base']}.{max(numbers, default=0) + 1:08d}.delta"
        planted.write_bytes(os.urandom(5000))
        os.chmod(planted, 0o600)
        async with AsyncIPC(ipc_dir, rescan_interval=60) as joiner:
            cache: AsyncCache[Any] = AsyncCache(joiner)
            assert await cache.get_many(await cache.keys()) == expected
            assert joiner.stats()["snapshots_damaged"] >= 1
        await until(lambda: not planted.exists(), 10)  # the holder wrote a new base
        writer.ask(op="set", items={"after-plant": 2})
        expected["after-plant"] = 2
        writer.ask(op="covered")
        assert await joined_state(ipc_dir) == expected
    finally:
        writer.kill()


async def test_a_snapshot_writer_killed_in_the_middle_of_a_delta(ipc_dir: Path, until: Any) -> None:
    """The writer is paused in every snapshot write (a test-only fault point),
    killed while a delta's temporary file is open: a joiner holds every
    acknowledged key, takes over the snapshots (collecting the leftover), and a
    later joiner, after the dead writer's segments are gone, still does."""
    ns = ipc_dir / "default"
    expected: dict[Any, Any] = {f"k{j}": j for j in range(2000)}
    writer = Writer(ipc_dir, env={"IVIP_IPC_FAULT_DELAYS": "snapshot_write=0.3"}, **FAST)
    try:
        writer.ask(op="set", items=expected)
        writer.ask(op="covered")
        items = {f"k{i}": "changed" for i in range(20)}
        writer.ask(op="set", items=items)
        expected.update(items)
        await until(lambda: any(n.endswith(".tmp") for n in os.listdir(ns)), 10)
        writer.kill()
        async with AsyncIPC(ipc_dir, **FAST) as joiner:
            cache: AsyncCache[Any] = AsyncCache(joiner)
            assert await cache.get_many(await cache.keys()) == expected
            await until(lambda: not any(n.endswith(".tmp") for n in os.listdir(ns)), 10)
            # The dead writer's segments go after the retention window (1 s).
            await until(
                lambda: (
                    not os.listdir(ns / "log")
                    or all(n.startswith(joiner.stats()["peer"]) for n in os.listdir(ns / "log"))
                ),
                10,
            )
            await until(lambda: joiner.stats()["snapshots_written"] >= 1, 10)
            assert await joined_state(ipc_dir) == expected
    finally:
        writer.kill()
