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

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.records import FrameReader

from .helpers import FAST

# A writer in its own process: JSON commands on stdin, one JSON line out for each.
#   {"op": "set", "items": {key: value}}  set them (1,000 gathered at a time)
#   {"op": "delete", "keys": [...]}        delete them
#   {"op": "covered"}                      wait until a snapshot covers every
#                                          cache write so far, none being written
# Each answer names the segment being written after it.
#   {"op": "pad", "bytes": n}              n bytes of messages (segments move on)
#   {"op": "holder"}                       wait until it holds snapshot.lock
# Every write is acknowledged (its line printed) only once every call returned.
_WRITER = """
    import asyncio, json, sys, time
    from ivip_ipc_async import AsyncCache, AsyncIPC

    async def main() -> None:
        options = json.loads(sys.argv[2])
        async with AsyncIPC(sys.argv[1], **options) as ipc:
            cache = AsyncCache(ipc)
            snaps = ipc.medium.backend._snapshots
            peer = ipc.stats()["peer"]
            loop = asyncio.get_running_loop()
            stdin = asyncio.StreamReader(limit=64 << 20)
            await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin
            )
            print(json.dumps({"ready": peer}), flush=True)
            written = 0  # the sequence number of the last cache write
            while line := await stdin.readline():
                cmd = json.loads(line)
                if cmd["op"] == "set":
                    items = list(cmd["items"].items())
                    for i in range(0, len(items), 1000):
                        await asyncio.gather(
                            *(cache.set(k, v, 0) for k, v in items[i : i + 1000])
                        )
                    written = snaps._own.seq
                elif cmd["op"] == "delete":
                    await asyncio.gather(*(cache.delete(k) for k in cmd["keys"]))
                    written = snaps._own.seq
                elif cmd["op"] == "pad":
                    for _ in range(cmd["bytes"] // 4000):
                        await ipc.notify("pad", "x" * 4000)
                elif cmd["op"] == "holder":
                    while not ipc.stats()["snapshot_holder"]:
                        await asyncio.sleep(0.005)
                elif cmd["op"] == "covered":
                    target = written
                    deadline = time.monotonic() + 30
                    while not (
                        snaps.positions.of(peer)[2] >= target
                        and (snaps.task is None or snaps.task.done())
                    ):
                        assert time.monotonic() < deadline, "no snapshot covers the writes"
                        await asyncio.sleep(0.005)
                segment = snaps._own.head.number
                print(json.dumps({"done": cmd["op"], "segment": segment}), flush=True)

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
        self.peer = self._read()["ready"]

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

    def ask(self, **command: Any) -> int:
        """Run `command`; the number of the segment being written after it."""
        self.send(**command)
        out = self._read()
        assert out["done"] == command["op"]
        return int(out["segment"])

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


@pytest.mark.once_per_ci  # ~5 s, and the same on every interpreter
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
        for r in range(8):
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
    """One process writes the snapshots, another the cache (small segments, one
    second of retention): once the writer's segments holding a round's writes
    are deleted, a late joiner learns them from the deltas alone, and holds
    exactly every acknowledged key: after several deltas, after a merge into a
    new base, and past a garbage delta planted after the last one."""
    ns = ipc_dir / "default"
    options = {**FAST, "segment_bytes": 64 << 10}
    holder = Writer(ipc_dir, **options)
    writer = None
    try:
        holder.ask(op="holder")
        writer = Writer(ipc_dir, **options)

        async def forget(segments: dict[Writer, int]) -> None:
            # Messages fill new segments, then one more cache write moves the
            # positions of the snapshot past them: each process's segments up
            # to the one named go (covered, past the retention).
            for who, segment in segments.items():
                who.ask(op="pad", bytes=150_000)
                who.ask(op="set", items={f"marker-{who.peer}": segment})
                expected[f"marker-{who.peer}"] = segment
                who.ask(op="covered")

            def gone() -> bool:
                names = os.listdir(ns / "log")
                return all(
                    min(int(n[17:25]) for n in names if n.startswith(who.peer)) > segment
                    for who, segment in segments.items()
                )

            await until(gone, 10)

        expected: dict[Any, Any] = {f"k{j}": j for j in range(3000)}
        writer.ask(op="set", items=expected)
        for r in range(4):  # small rounds: deltas (of the holder's own writes too)
            items = {f"k{r * 10 + i}": -r for i in range(10)}
            writer.ask(op="set", items=items)
            writer.ask(op="delete", keys=[f"k{2000 + r}"])
            holder.ask(op="set", items={f"h{r}": r, f"k{2500 + r}": "h"})
            expected.update(items)
            expected.update({f"h{r}": r, f"k{2500 + r}": "h"})
            del expected[f"k{2000 + r}"]
            segments = {writer: writer.ask(op="covered"), holder: holder.ask(op="covered")}
            writer.ask(op="pad", bytes=70_000)
        await forget(segments)
        assert len(deltas(ns)) >= 2
        assert await joined_state(ipc_dir) == expected
        async with AsyncIPC(ipc_dir, rescan_interval=60) as other:  # counted in the footprint
            assert other.stats()["footprint_bytes"] >= sum(snapshot_files(ns).values())
        base = os.stat(ns / "snapshot.bin").st_ino
        for r in range(3):  # every key again: merged into a new base
            items = {k: [r, k] for k in expected}
            writer.ask(op="set", items=items)
            expected.update(items)
            segment = writer.ask(op="covered")
        await forget({writer: segment})
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
        holder.kill()
        if writer is not None:
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
        (tmp,) = [n for n in os.listdir(ns) if n.endswith(".tmp")]
        assert os.stat(ns / tmp).st_size < 20_000  # a delta of 20 keys (the base: ~120 KB)
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
