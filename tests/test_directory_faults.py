"""The directory backend under hostile faults (issue #10), across real processes.

Each test here failed on the code before its fix: forked helpers and ended event
loops that kept locks, planted files, forged frames, damaged snapshots, leftovers
of killed writers, the size cap and long loop stalls.
"""

from __future__ import annotations

import asyncio
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


FAKE = "00000000deadbeef"


def _ticker_gaps() -> tuple[asyncio.Task[None], list[float]]:
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


async def test_planted_fifos_hang_nobody(ipc_dir: Path, until: Any) -> None:
    """FIFOs under a segment name, snapshot.bin and a peer's lock name: nobody's
    loop freezes, joiners start, messages flow."""
    ns = ipc_dir / "default"
    for sub in ("log", "peers"):
        (ns / sub).mkdir(parents=True, mode=0o700)
    os.chmod(ns, 0o700)
    os.mkfifo(ns / "log" / f"{FAKE}-00000001.seg", 0o600)
    os.mkfifo(ns / "snapshot.bin", 0o600)
    os.mkfifo(ns / "peers" / f"{FAKE}.lock", 0o600)
    ticker, gaps = _ticker_gaps()
    try:
        async with asyncio.timeout(10):
            async with AsyncIPC(ipc_dir, **FAST) as a, AsyncIPC(ipc_dir, **FAST) as b:
                got: list[Any] = []
                b.on("e", got.append)
                await asyncio.sleep(0.5)  # several maintenance rounds look at the FIFOs
                await a.notify("e", 1)
                await until(lambda: got == [1], 5)
    finally:
        ticker.cancel()
    assert max(gaps) < 0.5


async def test_doorbell_never_follows_a_symlink(ipc_dir: Path, until: Any, tmp_path: Path) -> None:
    import socket

    outside = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    outside.bind(str(tmp_path / "outside.sock"))
    outside.setblocking(False)
    try:
        async with AsyncIPC(ipc_dir, **FAST) as a, AsyncIPC(ipc_dir, **FAST) as b:
            os.symlink(tmp_path / "outside.sock", ipc_dir / "default" / "peers" / f"{FAKE}.sock")
            got: list[Any] = []
            b.on("e", got.append)
            await asyncio.sleep(0.1)  # the planted name is seen by the next refresh
            for i in range(5):
                await a.notify("e", i)
            await until(lambda: len(got) == 5)
            assert a.stats()["doorbells_sent"] > 0
        with pytest.raises(BlockingIOError):
            outside.recv(64)
    finally:
        outside.close()


async def test_snapshot_never_writes_through_a_planted_link(ipc_dir: Path, until: Any) -> None:
    victim = ipc_dir / "victim.txt"
    victim.write_text("precious")
    async with AsyncIPC(ipc_dir, **FAST) as ipc:
        peer = ipc.stats()["peer"]
        os.link(victim, ipc_dir / "default" / f".snapshot.{peer}.tmp")
        cache = AsyncCache(ipc)
        for i in range(3):
            await cache.set(f"k{i}", i)
            written = ipc.stats()["snapshots_written"]
            await until(lambda: ipc.stats()["snapshots_written"] > written, 5)  # noqa: B023
    assert victim.read_text() == "precious"


_PEER = str(Path(__file__).parent / "peer.py")


class Peer:
    """tests/peer.py in its own process: JSON commands in, JSON answers out."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, _PEER, str(path)],
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


async def test_forged_frame_header_costs_no_record(ipc_dir: Path, until: Any) -> None:
    """52 forged bytes (a header with a valid checksum, 8 MiB long) in a live
    writer's segment: every record written after it is still delivered."""
    from ivip_ipc_async.records import Kind, Record, encode_frame

    writer = Peer(ipc_dir)
    try:
        async with AsyncIPC(ipc_dir, **FAST) as reader:
            got: list[Any] = []
            reader.on("e", got.append)
            await writer.ask(op="notify", event="e", messages=[-1])
            await until(lambda: got == [-1])
            forged = encode_frame(Record(Kind.MESSAGE, "e", b"", b"x" * (8 << 20)), 99)[:52]
            own = reader.stats()["peer"]
            (segment,) = [
                p for p in (ipc_dir / "default" / "log").glob("*.seg") if own not in p.name
            ]
            with segment.open("ab") as f:
                f.write(forged)
            assert await writer.ask(op="notify", event="e", messages=list(range(970))) == {
                "acked": 970
            }
            await until(lambda: len(got) == 971, 10)
            assert got == [-1, *range(970)]
            assert reader.stats()["garbage_bytes"] == 52
            assert reader.stats()["records_lost"] == 0
    finally:
        writer.close()


async def test_damaged_snapshot_is_detected_and_rewritten_while_idle(
    ipc_dir: Path, until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    holder = Peer(ipc_dir)
    try:
        for i in range(300):
            await holder.ask(op="set", key=f"k{i}", value=i)
        snapshot = ipc_dir / "default" / "snapshot.bin"

        def complete() -> bool:
            # The holder's snapshot holds all 300 keys (and its closing count).
            return snapshot.exists() and b'{"records": 300}' in snapshot.read_bytes()

        await until(complete, 10)
        for damage in (
            lambda: os.truncate(snapshot, snapshot.stat().st_size // 2),
            lambda: os.truncate(snapshot, 0),
        ):
            damage()
            async with AsyncIPC(ipc_dir, **FAST) as joiner:
                late = AsyncCache(joiner)
                await until(lambda: len(late) == 300, 10)  # noqa: B023
                assert joiner.stats()["snapshots_damaged"] >= 1
            await until(complete, 10)  # rewritten by its holder, although idle
        assert "damaged" in caplog.text
    finally:
        holder.close()


async def test_snapshot_leftovers_are_counted_then_collected(ipc_dir: Path, until: Any) -> None:
    ns = ipc_dir / "default"
    ns.mkdir(mode=0o700)
    leftover = ns / f".snapshot.{FAKE}.1234abcd.tmp"
    leftover.write_bytes(b"\0" * 1_500_000)
    async with AsyncIPC(ipc_dir, **FAST) as ipc:
        await until(lambda: not leftover.exists(), 5)
        assert ipc.stats()["footprint_bytes"] < 1_500_000
        # A second peer (not the holder) counts one in the footprint meanwhile.
        leftover.write_bytes(b"\0" * 1_500_000)
        async with AsyncIPC(ipc_dir, **{**FAST, "rescan_interval": 60}) as other:
            assert other.stats()["footprint_bytes"] >= 1_500_000


async def test_short_lived_peers_leave_nothing_behind(ipc_dir: Path, until: Any) -> None:
    async with AsyncIPC(ipc_dir, **FAST) as long_lived:
        cache = AsyncCache(long_lived)
        for i in range(200):
            async with AsyncIPC(ipc_dir, **FAST) as short:
                await AsyncCache(short).set(f"k{i}", i)
        await until(lambda: len(cache) == 200, 10)
        await until(lambda: long_lived.stats()["writers"] == 0, 15)
        await cache.set("last", True)
        written = long_lived.stats()["snapshots_written"]
        await until(lambda: long_lived.stats()["snapshots_written"] > written, 5)
        head = (ipc_dir / "default" / "snapshot.bin").read_bytes()[52:4096]
        positions = json.loads(head[: head.index(b"}}") + 2])["positions"]
        assert list(positions) == [long_lived.stats()["peer"]]
        assert not list((ipc_dir / "default" / "peers").glob(".*"))


async def test_start_never_fails_because_a_peer_looked_at_its_lock(
    ipc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ivip_ipc_async.backends.directory import peers

    real = fcntl.flock
    calls = 0

    def busy_once(fd: int, op: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # as if a peer's liveness check held it for a moment
            raise BlockingIOError
        real(fd, op)

    monkeypatch.setattr(peers.fcntl, "flock", busy_once)
    async with AsyncIPC(ipc_dir, **FAST) as ipc:
        assert ipc.started
    assert calls >= 2


async def test_a_huge_batch_is_dispatched_a_slice_at_a_time(ipc_dir: Path, until: Any) -> None:
    """One notify_many of 100,000 messages from another process reaches the
    handler over many loop iterations, never in one callback."""
    writer = Peer(ipc_dir)
    ticks = 0
    seen_at: set[int] = set()

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    try:
        async with AsyncIPC(ipc_dir, **FAST) as reader:
            got = 0

            def handler(message: Any) -> None:
                nonlocal got
                got += 1
                seen_at.add(ticks)

            reader.on("e", handler)
            ticker = asyncio.get_running_loop().create_task(tick())
            script = {"op": "notify_many", "event": "e", "count": 100_000}
            assert await writer.ask(**script) == {"acked": 100_000}
            await until(lambda: got == 100_000, 20)
            ticker.cancel()
    finally:
        writer.close()
    assert len(seen_at) > 20


_BURST = """
    import asyncio, json, sys
    from ivip_ipc_async import AsyncCache, AsyncIPC

    async def main() -> None:
        options = json.loads(sys.argv[2])
        async with AsyncIPC(sys.argv[1], **options) as ipc:
            print(json.dumps({"ready": True}), flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            cache = AsyncCache(ipc)
            n, kind, me = int(sys.argv[3]), sys.argv[4], sys.argv[5]
            if kind == "notify":
                await asyncio.gather(*(ipc.notify("e", "x" * 2000) for _ in range(n)))
            else:
                for i in range(n):  # the log grows past the cap, the state stays small
                    await cache.set(f"{me}-{i % 1000}", i, 0)
            print(json.dumps({"acked": n}), flush=True)
            await asyncio.to_thread(sys.stdin.readline)

    asyncio.run(main())
"""


def _namespace_bytes(ns: Path) -> int:
    total = 0
    for where in (ns, ns / "log"):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(where):
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
    return total


@pytest.mark.parametrize(("kind", "writers", "count"), [("notify", 1, 20_000), ("set", 3, 30_000)])
async def test_size_cap_holds_at_every_instant(
    ipc_dir: Path, until: Any, kind: str, writers: int, count: int
) -> None:
    """Sampled every 50 ms from another process, the namespace never holds more
    than max_footprint plus one segment per writer; every acknowledged cache
    write reaches a late joiner."""
    cap, segment = 2 << 20, 256 << 10
    options = {**FAST, "max_footprint": cap, "segment_bytes": segment, "retention": 30.0}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(_BURST),
                str(ipc_dir),
                json.dumps(options),
                str(count),
                kind,
                f"w{n}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(writers)
    ]
    ns = ipc_dir / "default"
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert json.loads(await asyncio.to_thread(proc.stdout.readline)) == {"ready": True}
        samples: list[int] = []
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()

        async def acked(proc: subprocess.Popen[str]) -> Any:
            assert proc.stdout is not None
            return json.loads(await asyncio.to_thread(proc.stdout.readline))

        done = asyncio.gather(*(acked(p) for p in procs))
        while not done.done():
            samples.append(await asyncio.to_thread(_namespace_bytes, ns))
            await asyncio.sleep(0.05)
        assert await done == [{"acked": count}] * writers
        samples.append(_namespace_bytes(ns))
        assert len(samples) > 3
        assert max(samples) <= cap + writers * segment, max(samples)
        if kind == "set":
            async with AsyncIPC(ipc_dir, **options) as joiner:
                late = AsyncCache(joiner)
                assert len(await late.keys()) == writers * 1000
                assert await late.get("w0-7") == count - 1000 + 7
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
