"""The contract across real OS processes (each peer is `python tests/peer.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from .processes import reap

PEER = str(Path(__file__).with_name("peer.py"))


class Peer:
    """A peer process driven by JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    async def read(self, timeout: float = 15) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise EOFError(f"peer {self.pid} exited ({self.proc.returncode})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, timeout: float = 15, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.read(timeout)

    async def state(self) -> dict[str, Any]:
        return await self.ask(op="state")

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(EOFError, TimeoutError, ConnectionError, ValueError):
                await self.ask(op="exit", timeout=2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
        await reap(self.proc)


StartPeer = Callable[..., Coroutine[Any, Any, Peer]]


@pytest.fixture
async def start_peer(ipc_dir: Path) -> AsyncIterator[StartPeer]:
    peers: list[Peer] = []

    async def start(
        *args: str,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        default_instance: bool = False,
    ) -> Peer:
        """A peer on `ipc_dir` (or on `args`); with `default_instance`, the
        package's default `IPC`, with IVIP_IPC_DIR removed from its environment."""
        argv = [] if default_instance else (list(args) or [str(ipc_dir)])
        environ = dict(os.environ)
        if default_instance:
            environ.pop("IVIP_IPC_DIR", None)
        environ.update(env or {})
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            PEER,
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=environ,
            cwd=cwd,
            limit=1 << 24,
        )
        peer = Peer(proc)
        peers.append(peer)
        assert "ready" in await peer.read()
        return peer

    yield start
    await asyncio.gather(*(p.close() for p in peers))


async def eventually(check: Callable[[], Coroutine[Any, Any, bool]], timeout: float = 15) -> None:
    """Poll an async condition until true, with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def received(peer: Peer, event: str) -> list[Any]:
    state = await peer.state()
    return list(state["received"].get(event, []))


async def test_point_to_point_in_order(start_peer: StartPeer) -> None:
    sender, receiver = await start_peer(), await start_peer()
    await receiver.ask(op="listen", event="e")
    assert await sender.ask(op="notify", event="e", messages=list(range(300))) == {"acked": 300}

    async def all_in() -> bool:
        return await received(receiver, "e") == list(range(300))

    await eventually(all_in)


async def test_fan_out_to_several_receivers(start_peer: StartPeer) -> None:
    sender = await start_peer()
    receivers = [await start_peer() for _ in range(3)]
    for r in receivers:
        await r.ask(op="listen", event="fan")
    await sender.ask(op="notify", event="fan", messages=[{"n": i} for i in range(200)])

    async def all_in() -> bool:
        got = [await received(r, "fan") for r in receivers]
        return all(g == [{"n": i} for i in range(200)] for g in got)

    await eventually(all_in)
    assert await received(sender, "fan") == []  # not to itself


async def test_many_senders_keep_their_own_order(start_peer: StartPeer) -> None:
    receiver = await start_peer()
    await receiver.ask(op="listen", event="m")
    senders = [await start_peer() for _ in range(3)]
    await asyncio.gather(
        *(
            s.ask(op="notify", event="m", messages=[[i, q] for q in range(150)])
            for i, s in enumerate(senders)
        )
    )

    async def all_in() -> bool:
        return len(await received(receiver, "m")) == 450

    await eventually(all_in)
    got = await received(receiver, "m")
    for i in range(3):
        assert [q for s, q in got if s == i] == list(range(150))


async def test_cache_set_delete_ttl_and_key_types(start_peer: StartPeer) -> None:
    a, b = await start_peer(), await start_peer()
    await a.ask(op="set", key="user:7", value={"name": "Ana"}, ttl=60)
    await a.ask(op="set", key=1, value="int one", ttl=0)
    await a.ask(op="set", key="1", value="str one", ttl=0)
    await a.ask(op="set", key="brief", value=True, ttl=0.5)

    async def visible() -> bool:
        return (await b.ask(op="get", key="user:7"))["found"]

    await eventually(visible)
    assert (await b.ask(op="get", key=1))["value"] == "int one"
    assert (await b.ask(op="get", key="1"))["value"] == "str one"
    assert (await a.ask(op="delete", key="user:7")) == {"existed": True}

    async def deleted() -> bool:
        return not (await b.ask(op="get", key="user:7"))["found"]

    await eventually(deleted)

    async def expired() -> bool:
        return not (await b.ask(op="get", key="brief"))["found"]

    await eventually(expired, timeout=5)


async def test_late_joiner_after_the_writer_exited(start_peer: StartPeer) -> None:
    writer = await start_peer()
    for i in range(50):
        await writer.ask(op="set", key=f"k{i}", value=i, ttl=0)
    await writer.ask(op="delete", key="k7")
    await writer.close()
    joiner = await start_peer()
    state = await joiner.state()
    cache = dict((k, v) for k, v in state["cache"])
    assert len(cache) == 49
    assert "k7" not in cache
    assert cache["k49"] == 49


async def test_late_joiner_while_the_writer_lives(start_peer: StartPeer) -> None:
    writer = await start_peer()
    await writer.ask(op="set", key="present", value=[1, 2, 3], ttl=0)
    joiner = await start_peer()
    assert (await joiner.ask(op="get", key="present"))["value"] == [1, 2, 3]


async def test_concurrent_writers_converge(start_peer: StartPeer) -> None:
    peers = [await start_peer() for _ in range(3)]

    async def write(i: int, peer: Peer) -> None:
        for round_ in range(30):
            for k in range(5):
                await peer.ask(op="set", key=f"k{k}", value=f"p{i}r{round_}", ttl=0)

    await asyncio.gather(*(write(i, p) for i, p in enumerate(peers)))

    async def equal() -> bool:
        states = [json.dumps((await p.state())["cache"]) for p in peers]
        return len(set(states)) == 1 and len(json.loads(states[0])) == 5

    await eventually(equal)


async def test_sigkill_mid_burst_loses_nothing_acknowledged(
    start_peer: StartPeer, ipc_dir: Path
) -> None:
    receivers = [await start_peer(str(ipc_dir), "--retention", "0.5") for _ in range(2)]
    for r in receivers:
        await r.ask(op="listen", event="burst")
    sender = await start_peer()
    assert sender.proc.stdin is not None
    sender.proc.stdin.write(
        json.dumps(
            {"op": "notify", "event": "burst", "messages": list(range(100_000)), "report_each": 1}
        ).encode()
        + b"\n"
    )
    await sender.proc.stdin.drain()
    acked: list[int] = []
    while len(acked) < 3000:  # in the middle of the burst ...
        acked.append((await sender.read())["acked_one"])
    sender.proc.send_signal(signal.SIGKILL)  # ... it dies
    await sender.proc.wait()
    assert sender.proc.stdout is not None
    while line := await sender.proc.stdout.readline():  # acks printed before death
        if b"acked_one" in line:
            acked.append(json.loads(line)["acked_one"])

    async def all_acked_delivered() -> bool:
        got = [set(await received(r, "burst")) for r in receivers]
        return all(set(acked) <= g for g in got)

    await eventually(all_acked_delivered)
    # the survivors keep working
    await receivers[0].ask(op="listen", event="after")
    await receivers[1].ask(op="notify", event="after", messages=["still here"])

    async def after() -> bool:
        return await received(receivers[0], "after") == ["still here"]

    await eventually(after)
    # and the dead sender's files are collected by the living
    peers_dir, log_dir = ipc_dir / "default" / "peers", ipc_dir / "default" / "log"

    def files_of_dead() -> list[str]:
        alive = set()
        for lock in peers_dir.glob("*.lock"):
            try:
                if json.loads(lock.read_text())["pid"] != sender.pid:
                    alive.add(lock.stem)
            except (OSError, ValueError):
                continue
        return [p.name for p in log_dir.glob("*.seg") if p.name.split("-")[0] not in alive] + [
            p.name for p in peers_dir.glob("*.lock") if p.stem not in alive
        ]

    async def collected() -> bool:
        return files_of_dead() == []

    await eventually(collected, timeout=20)


async def test_default_instances_meet_through_ivip_ipc_dir(
    start_peer: StartPeer, ipc_dir: Path
) -> None:
    env = {"IVIP_IPC_DIR": str(ipc_dir)}
    a = await start_peer(env=env, default_instance=True)
    b = await start_peer(env=env, default_instance=True)
    a_default = await start_peer()  # explicit path, same directory: same namespace
    await b.ask(op="listen", event="hi")
    await a.ask(op="notify", event="hi", messages=["from a"])
    await a_default.ask(op="notify", event="hi", messages=["from explicit"])

    async def both() -> bool:
        return sorted(await received(b, "hi")) == ["from a", "from explicit"]

    await eventually(both)


async def test_zero_configuration_meets_by_working_directory(start_peer: StartPeer) -> None:
    runtime = tempfile.mkdtemp(prefix="ivip-runtime-")
    app, other_app = tempfile.mkdtemp(prefix="ivip-app-"), tempfile.mkdtemp(prefix="ivip-app-")
    env = {"XDG_RUNTIME_DIR": runtime}
    try:
        worker1 = await start_peer(env=env, cwd=app, default_instance=True)
        worker2 = await start_peer(env=env, cwd=app, default_instance=True)
        stranger = await start_peer(env=env, cwd=other_app, default_instance=True)
        await worker2.ask(op="listen", event="hello")
        await stranger.ask(op="listen", event="hello")
        await worker1.ask(op="notify", event="hello", messages=["same app"])
        await stranger.ask(op="notify", event="hello", messages=["other app"])

        async def met() -> bool:
            return await received(worker2, "hello") == ["same app"]

        await eventually(met)
        # the stranger heard nothing of the app, and the app nothing of it
        assert await received(stranger, "hello") == []
        await worker1.ask(op="notify", event="hello", messages=["second"])

        async def second() -> bool:
            return await received(worker2, "hello") == ["same app", "second"]

        await eventually(second)
        assert await received(stranger, "hello") == []
        assert len(list(Path(runtime, "ivip-ipc").iterdir())) == 2  # two namespaces
    finally:
        for path in (runtime, app, other_app):
            shutil.rmtree(path, ignore_errors=True)
