"""The namespace's directories removed or moved under running peers.

`rm -rf <namespace>/peers/`, the whole namespace removed (a logout may clear
`$XDG_RUNTIME_DIR`), or renamed away: every peer notices, says so in `health()`,
re-creates the layout with the usual checks, announces itself again and goes on
in the directory at the path, where joiners look. Each peer is a real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncIPC, LossCause

_CHAT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from ivip_ipc_async import AsyncCache, AsyncIPC

    def say(obj):
        print(json.dumps(obj), flush=True)

    async def main():
        root, namespace, name, options = sys.argv[1:5]
        options = {"rescan_interval": 0.5, "retention": 1.0, "snapshot_interval": 0.1,
                   **json.loads(options)}
        ipc = AsyncIPC(root, namespace=namespace, **options)
        cache = AsyncCache(ipc)
        got = {}  # sender: [numbers], per event
        def on(event):
            def handler(msg):
                got.setdefault(event, {}).setdefault(msg["from"], []).append(msg["i"])
            return handler
        ipc.on("chat", on("chat"))
        ipc.on("probe", on("probe"))
        loop = asyncio.get_running_loop()
        lines = asyncio.Queue()
        buffered = b""
        def on_stdin():
            nonlocal buffered
            chunk = os.read(0, 65536)
            if not chunk:
                lines.put_nowait(b'{"op": "exit"}')
                return
            buffered += chunk
            *complete, buffered = buffered.split(b"\\n")
            for line in complete:
                lines.put_nowait(line)
        async with ipc:
            loop.add_reader(0, on_stdin)
            say({"ready": os.getpid()})
            while True:
                command = json.loads(await lines.get())
                op = command["op"]
                if op == "send":
                    acked = 0
                    errors = []
                    for i in range(command["first"], command["first"] + command["count"]):
                        try:
                            await ipc.notify(command["event"], {"from": name, "i": i})
                            acked += 1
                        except OSError as exc:
                            errors.append(str(exc))
                    say({"acked": acked, "errors": errors})
                elif op == "set":
                    for key in command["keys"]:
                        await cache.set(key, name)
                    say({"ok": True})
                elif op == "look":
                    stats = ipc.stats()
                    say({"got": got, "health": ipc.health(), "keys": sorted(await cache.keys()),
                         "stats": {
                        k: v for k, v in stats.items() if isinstance(v, (int, str, bool))
                    }})
                elif op == "lock":
                    lock = ipc.lock(command["name"], timeout=command["timeout"])
                    try:
                        await lock.acquire(command["timeout"])
                        say({"held": True})
                    except TimeoutError:
                        say({"held": False})
                    except OSError as exc:
                        say({"error": str(exc)})
                elif op == "exit":
                    loop.remove_reader(0)
                    break

    asyncio.run(main())
    """
)


class Chat:
    """One peer in its own process: sends numbered messages, says what it got."""

    def __init__(
        self, root: Path, namespace: str, name: str, watcher: str = "", **options: Any
    ) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHAT, str(root), namespace, name, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "IVIP_IPC_WATCHER": watcher},
        )
        self.pid = self._read()["ready"]

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"peer {self.name} ended (exit {self.proc.wait()})")
        return json.loads(line)

    async def ask(self, **command: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return await asyncio.to_thread(self._read)

    async def send(self, count: int, first: int = 0, event: str = "chat") -> Any:
        return await self.ask(op="send", event=event, count=count, first=first)

    async def look(self) -> Any:
        return await self.ask(op="look")

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def chats(root: Path, *names: str, namespace: str = "ns", watcher: str = "", **options: Any) -> Any:
    started: list[Chat] = []
    try:
        for name in names:
            started.append(Chat(root, namespace, name, watcher, **options))
        yield started
    finally:
        for chat in started:
            chat.close()


async def eventually(check: Any, timeout: float, what: str) -> Any:
    """Await `check()` until it returns something true; fail after `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what() if callable(what) else what}")
        await asyncio.sleep(0.05)


async def hear_each_other(peers: list[Chat], timeout: float = 10.0) -> None:
    """Each peer probes (one message per try) until every peer heard every other."""
    tries = 0

    async def all_heard() -> bool:
        nonlocal tries
        for peer in peers:
            await peer.send(1, first=tries, event="probe")
        tries += 1
        await asyncio.sleep(0.05)
        for peer in peers:
            got = (await peer.look())["got"].get("probe", {})
            if any(other.name not in got for other in peers if other is not peer):
                return False
        return True

    names = [p.name for p in peers]
    await eventually(all_heard, timeout, f"{names} hear each other")


async def all_delivered(
    peers: list[Chat], count: int, timeout: float = 3.0, spread: int = 1, first: int = 0
) -> None:
    """Every peer sends `count` chat messages (in `spread` parts 0.1 s apart: over
    several maintenance rounds); every other peer gets all, in order, within
    `timeout` s of the last (doorbells take a millisecond; the full re-scan, the
    last resort, comes every 5 s with these peers' `rescan_interval`)."""
    part = count // spread
    for start in range(first, first + count, part):
        for peer in peers:
            answer = await peer.send(part, first=start)
            assert answer == {"acked": part, "errors": []}
        await asyncio.sleep(0.1)
    wanted = list(range(first + count))

    missing: dict[str, int] = {}

    async def delivered() -> bool:
        missing.clear()
        for peer in peers:
            got = (await peer.look())["got"].get("chat", {})
            for other in peers:
                if other is not peer and got.get(other.name, []) != wanted:
                    missing[f"{other.name}->{peer.name}"] = len(wanted) - len(
                        got.get(other.name, [])
                    )
        return not missing

    await eventually(
        delivered, timeout, lambda: f"{count} messages from each reach every other: {missing}"
    )


async def healthy(peer: Chat) -> Any:
    look = await peer.look()
    return look if look["health"]["healthy"] and not look["health"]["problems"] else None


async def test_peers_directory_removed_under_two_live_peers(ipc_dir: Path) -> None:
    """`rm -rf peers/`: both re-announce themselves; 100 later messages each way
    all arrive (before: 20 of 100 never arrived, 0 gaps, healthy)."""
    with chats(ipc_dir, "a", "b") as peers:
        await hear_each_other(peers)
        shutil.rmtree(ipc_dir / "ns" / "peers")
        await all_delivered(peers, 100, spread=20)
        names = {p.name: (await p.look())["stats"]["peer"] for p in peers}
        assert sorted(os.listdir(ipc_dir / "ns" / "peers")) == sorted(
            f"{peer}.{ext}" for peer in names.values() for ext in ("lock", "sock")
        )
        for peer in peers:
            look = await eventually(lambda p=peer: healthy(p), 10, f"{peer.name} healthy")
            assert look["stats"]["gaps"] == 0
            assert look["stats"]["layout_repairs"] >= 1


async def test_namespace_removed_under_two_peers_then_a_joiner(ipc_dir: Path) -> None:
    """The whole namespace removed: the two running peers and a joiner that
    starts afterwards all hear each other (before: two groups that never did)."""
    with chats(ipc_dir, "a", "b") as peers:
        await hear_each_other(peers)
        shutil.rmtree(ipc_dir / "ns")
        with chats(ipc_dir, "c") as joiner:
            everyone = peers + joiner
            await hear_each_other(everyone)
            await all_delivered(everyone, 50)
            for peer in everyone:
                await eventually(lambda p=peer: healthy(p), 10, f"{peer.name} healthy")
            for peer in peers:
                assert (await peer.look())["stats"]["layout_repairs"] >= 1


@pytest.mark.parametrize("watcher", ["inotify", "watchfiles"])
async def test_namespace_renamed_away_under_two_peers_then_a_joiner(
    ipc_dir: Path, watcher: str
) -> None:
    """Renamed away: the peers follow the path, not the moved directory; noticed
    by the inotify watcher at once, else by the maintenance round."""
    with chats(ipc_dir, "a", "b", watcher=watcher) as peers:
        await hear_each_other(peers)
        os.rename(ipc_dir / "ns", ipc_dir / "moved")
        with chats(ipc_dir, "c") as joiner:
            everyone = peers + joiner
            await hear_each_other(everyone)
            await all_delivered(everyone, 50)
            for peer in everyone:
                await eventually(lambda p=peer: healthy(p), 10, f"{peer.name} healthy")


async def test_health_reports_the_breakage_while_it_lasts(ipc_dir: Path) -> None:
    """While the namespace cannot be re-created (a symlink planted at its path,
    which is refused, never followed), every peer says so in `health()`; once
    the path is free again they re-create it and hear each other."""
    outside = ipc_dir / "outside"
    outside.mkdir(mode=0o700)
    with chats(ipc_dir, "a", "b") as peers:
        await hear_each_other(peers)
        shutil.rmtree(ipc_dir / "ns")
        os.symlink(outside, ipc_dir / "ns")
        for peer in peers:

            async def broken(p: Chat = peer) -> Any:
                health = (await p.look())["health"]
                return health if not health["healthy"] else None

            health = await eventually(broken, 10, f"{peer.name} reports the breakage")
            assert any(str(ipc_dir / "ns") in problem for problem in health["problems"])
        # Meanwhile the running peers still hear each other through the segments
        # they hold open; what is written there is counted once they rejoin.
        await all_delivered(peers, 20)
        for peer in peers:
            assert not (await peer.look())["health"]["healthy"]
        assert os.listdir(outside) == []
        os.unlink(ipc_dir / "ns")
        await hear_each_other(peers)
        await all_delivered(peers, 20, first=20)
        for peer in peers:
            look = await eventually(lambda p=peer: healthy(p), 10, f"{peer.name} healthy")
            assert look["stats"]["records_stranded"] >= 20
        assert os.listdir(outside) == []


async def test_records_written_in_the_old_place_are_reported_as_a_gap(
    ipc_dir: Path, until: Any
) -> None:
    """A writer that goes on in the moved namespace while a reader has rejoined
    the path: what the reader could not read (a segment the writer started
    there) is a gap named "displaced" on the reader's side, and counted on the
    writer's (each step runs in one go here: no maintenance round between)."""
    from .helpers import FAST

    async with AsyncIPC(ipc_dir, **FAST) as a, AsyncIPC(ipc_dir, **FAST) as b:
        got: list[int] = []
        b.on("chat", got.append)
        await a.notify("chat", 0)
        await until(lambda: got == [0])
        os.rename(ipc_dir / "default", ipc_dir / "moved")
        assert b.medium.backend._rejoin.check(wait=False)  # type: ignore[union-attr]
        for i in (1, 2, 3):
            await a.notify("chat", i)  # in the segment the reader holds open
        a.medium.backend._segments.rotate()  # type: ignore[union-attr]
        for i in (4, 5, 6):
            await a.notify("chat", i)  # in a segment the reader never sees
        assert a.medium.backend._rejoin.check(wait=False)  # type: ignore[union-attr]
        for i in (7, 8, 9):
            await a.notify("chat", i)
        await until(lambda: got[-1:] == [9])
        assert got == [0, 1, 2, 3, 7, 8, 9]
        stats = b.stats()
        lost = stats[LossCause.DISPLACED.counter]  # "records_lost_displaced", a stable name
        assert (stats["gaps"], stats["records_lost"], lost) == (1, 3, 3)
        assert a.stats()["records_stranded"] >= 6
        assert a.stats()["layout_repairs"] == b.stats()["layout_repairs"] == 1


async def test_locks_work_again_after_the_namespace_was_removed(ipc_dir: Path) -> None:
    """After the rejoin, a running peer's locks are taken in the new locks/, so
    a joiner is excluded (before: every lock attempt raised FileNotFoundError)."""
    with chats(ipc_dir, "a") as (old,):
        assert await old.ask(op="lock", name="before", timeout=1) == {"held": True}
        shutil.rmtree(ipc_dir / "ns")

        async def rejoined() -> bool:
            return bool((await old.look())["stats"]["layout_repairs"])

        await eventually(rejoined, 10, "the peer rejoined")
        with chats(ipc_dir, "c") as (joiner,):
            assert await old.ask(op="lock", name="x", timeout=1) == {"held": True}
            assert await joiner.ask(op="lock", name="x", timeout=0.3) == {"held": False}


async def test_a_joiner_after_the_rejoin_gets_the_cache_state(ipc_dir: Path) -> None:
    """The snapshot went with the removed directory: the first peer to rejoin
    takes snapshot.lock at the new place and writes one at once, so a joiner
    gets the keys written before the removal (before: none, until the next
    maintenance round; here 10 s away)."""
    keys = [f"k{i}" for i in range(100)]
    with chats(ipc_dir, "a", rescan_interval=10.0) as (old,):
        await old.ask(op="set", keys=keys)
        shutil.rmtree(ipc_dir / "ns")

        last: dict[str, Any] = {}

        async def rejoined_with_a_snapshot() -> bool:
            stats = (await old.look())["stats"]
            last.update(stats)
            return stats["layout_repairs"] == stats["snapshots_written"] == 1

        await eventually(
            rejoined_with_a_snapshot, 3, lambda: f"rejoined, and wrote a snapshot: {last}"
        )
        with chats(ipc_dir, "c", rescan_interval=10.0) as (joiner,):
            assert (await joiner.look())["keys"] == sorted(keys)


async def test_a_rejoin_whose_new_segment_fails_still_counts_what_was_stranded(
    ipc_dir: Path, until: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """log/ removed under a writer, and the new segment cannot be opened at the
    rejoin (`OSError`, injected once): the records written since the layout was
    last seen in place are still counted as stranded and the lock file still
    names the segment (before: the directories were swapped, so the next look
    found all in place, and neither was ever recorded). Writing goes on."""
    import errno

    from .helpers import FAST

    async with AsyncIPC(ipc_dir, **FAST) as a, AsyncIPC(ipc_dir, **FAST) as b:
        got: list[int] = []
        b.on("chat", got.append)
        backend = a.medium.backend
        assert backend is not None
        rejoin, segments = backend._rejoin, backend._segments  # type: ignore[attr-defined]
        assert rejoin.check(wait=False)
        for i in (1, 2, 3):
            await a.notify("chat", i)
        last = segments.own.head.number
        shutil.rmtree(ipc_dir / "default" / "log")
        real = segments.open_segment
        failures = []

        def fail_once(number: int) -> None:
            if not failures:
                failures.append(number)
                raise OSError(errno.ENOSPC, "injected: no space left")
            real(number)

        monkeypatch.setattr(segments, "open_segment", fail_once)
        assert not rejoin.check(wait=False)  # the new segment could not be opened
        assert failures
        assert rejoin.check(wait=False)  # the rest of the rejoin done
        assert rejoin.problem == ""
        stats = a.stats()
        assert (stats["records_stranded"], stats["layout_repairs"]) == (3, 1)
        assert backend._liveness._note.get("displaced_through") == last  # type: ignore[attr-defined]
        await a.notify("chat", 4)  # the next write opens the new segment
        await until(lambda: got[-1:] == [4])
