"""Workers that start together hear each other (README guarantee 1).

Every test runs real processes (tests/directory/startup_worker.py) on one
namespace. Each notifies every few ms once its `start()` has returned; every
worker must receive every message another sent after its own `start()` returned
(what was sent while it restored the log may count as history), once each and
in order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

WORKER = str(Path(__file__).with_name("startup_worker.py"))
PREFILL = """
import asyncio, sys
from ivip_ipc_async import AsyncIPC

async def main():
    async with AsyncIPC(sys.argv[1], retention=300) as ipc:
        for i in range(int(sys.argv[2]) // 1000):
            await ipc.notify_many("m", [{"from": "old", "n": n, "t": 0} for n in range(1000)])

asyncio.run(main())
"""


class Workers:
    """startup_worker.py processes, fired (one byte on stdin) when the test says."""

    def __init__(self, path: Path, out: Path, names: list[str], **config: Any) -> None:
        self.path, self.out, self.names = path, out, names
        self.config = {"path": str(path), "out": str(out), "peers": names, **config}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, **extra: Any) -> None:
        config = {**self.config, "name": name, **extra}
        self.procs[name] = subprocess.Popen(
            [sys.executable, WORKER, json.dumps(config)], stdin=subprocess.PIPE
        )

    def ready(self, timeout: float = 30.0) -> None:
        """Wait until every worker has imported the library and waits for the gun."""
        deadline = time.monotonic() + timeout
        while not all((self.out / f"{n}.ready").exists() for n in self.procs):
            assert time.monotonic() < deadline, "the workers did not get ready"
            time.sleep(0.01)

    def fire(self, name: str) -> None:
        stdin = self.procs[name].stdin
        assert stdin is not None
        stdin.write(b"g")
        stdin.close()

    def wait(self, timeout: float = 45.0) -> None:
        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            code = proc.wait(max(0.1, deadline - time.monotonic()))
            assert code == 0, f"worker {name} exited with {code}"

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()

    def missing(self) -> dict[str, dict[str, int]]:
        """For each receiver, how many messages each sender sent after the
        receiver's start returned that it did not receive; asserts that what
        it received came once each and in order."""
        sent = {n: json.loads((self.out / f"{n}.sent").read_text()) for n in self.names}
        missing: dict[str, dict[str, int]] = {}
        for receiver in self.names:
            result = json.loads((self.out / f"{receiver}.json").read_text())
            for sender, numbers in result["received"].items():
                assert numbers == sorted(set(numbers)), f"{receiver} got {sender}'s twice or late"
            for sender in self.names:
                if sender == receiver:
                    continue
                due = {n for n, t in sent[sender] if t > result["started"]}
                assert due, f"{sender} sent nothing after {receiver} started"
                lost = len(due - set(result["received"].get(sender, ())))
                if lost:
                    missing.setdefault(receiver, {})[sender] = lost
        return missing


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Workers]]:
    made: list[Workers] = []
    yield made
    for group in made:
        group.kill()


def prefill(path: Path, records: int) -> None:
    """A retained log of `records` messages, by a writer that has left."""
    subprocess.run([sys.executable, "-c", PREFILL, str(path), str(records)], check=True)


def test_workers_started_at_the_same_moment_all_hear_each_other(
    tmp_path: Path, workers: list[Workers]
) -> None:
    """12 processes fired together over a small retained log (each restores it
    while the others start and send): every one hears every other one."""
    path, out = tmp_path / "ns", tmp_path / "out"
    out.mkdir()
    prefill(path, 10_000)
    names = [f"w{i:02d}" for i in range(12)]
    group = Workers(path, out, names, count=10, interval=0.05, options={"retention": 300})
    workers.append(group)
    for name in names:
        group.spawn(name)
    group.ready()
    for name in names:
        group.fire(name)
    group.wait()
    assert group.missing() == {}


def test_workers_started_one_after_another_over_a_long_log_all_hear_each_other(
    tmp_path: Path, workers: list[Workers]
) -> None:
    """Eight workers fired 150 ms apart over a long retained log: each restores
    it while later ones start; every one hears every other one."""
    path, out = tmp_path / "ns", tmp_path / "out"
    out.mkdir()
    prefill(path, 60_000)
    names = [f"w{i}" for i in range(8)]
    group = Workers(path, out, names, count=10, interval=0.05, options={"retention": 300})
    workers.append(group)
    for name in names:
        group.spawn(name)
    group.ready()
    for name in names:
        group.fire(name)
        time.sleep(0.15)  # the schedule itself: a start every 150 ms
    group.wait()
    assert group.missing() == {}


def test_a_sender_started_during_a_slow_restore_is_heard(
    tmp_path: Path, workers: list[Workers]
) -> None:
    """The receiver's restore is held until it has found a sender that started
    during it: all 50 messages that sender sends after the receiver's start
    returned arrive (before: 0 of 50)."""
    path, out = tmp_path / "ns", tmp_path / "out"
    out.mkdir()
    prefill(path, 5_000)
    names = ["receiver", "sender"]
    group = Workers(path, out, names, count=50, interval=0.01, options={"retention": 300})
    workers.append(group)
    group.spawn("receiver", slow_restore=True)
    group.spawn("sender")
    group.ready()
    group.fire("receiver")
    deadline = time.monotonic() + 20
    while not (out / "receiver.restoring").exists():
        assert time.monotonic() < deadline, "the receiver never began its restore"
        time.sleep(0.01)
    group.fire("sender")
    group.wait()
    restoring = json.loads((out / "receiver.restoring").read_text())
    assert len(restoring["known"]) == 1  # the writer that filled the log, not the sender
    assert group.missing() == {}


async def test_a_restored_log_of_messages_is_not_decoded(
    ipc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #20, item 8: a joiner restores the log of the writers present at its
    start as history (their messages are never dispatched), so it must not pay
    to copy their topics and bodies either, even for an event it listens to:
    they reach the sink as skipped records (before: decoded, 1,000 of 1,000)."""
    from ivip_ipc_async import AsyncIPC
    from ivip_ipc_async.ipc import _Sink
    from ivip_ipc_async.records import Kind, Record

    kinds: list[Kind] = []
    restore = _Sink.restore

    def spy(self: _Sink, records: Any) -> None:
        kinds.extend(rec.kind for rec in records)
        restore(self, records)

    async with AsyncIPC(ipc_dir) as writer:
        await writer.notify_many("m", [{"n": i, "pad": "x" * 60} for i in range(1000)])
        monkeypatch.setattr(_Sink, "restore", spy)
        joiner = AsyncIPC(ipc_dir)
        heard: list[Record] = []
        joiner.on("m", heard.append)
        async with joiner:
            assert kinds.count(Kind.MESSAGE) == 0, kinds.count(Kind.MESSAGE)
            assert kinds.count(Kind.SKIPPED) == 1000
        assert heard == []  # history: never dispatched
