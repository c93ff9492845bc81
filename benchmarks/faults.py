"""The directory backend under faults, measured across real processes.

Run: `python -m benchmarks.faults [--quick] [--only NAME ...] [--out FILE.json]`, or, to
measure another checkout of the library, run this file by its path with that
checkout first on the path (the script's own directory, not the current one, is
then `sys.path[0]`)::

    PYTHONPATH=/path/to/checkout python benchmarks/faults.py --out before.json

Every role below runs in its own process (`python <this file> --role NAME ARGS`),
with the library of the checkout that the orchestrator imported (its root is put
first on `PYTHONPATH`), over a fresh directory in /dev/shm. Each situation is
bounded (a library that hangs or fails is recorded as such) and prints one row:
the situation, the measured figure and what was seen before the fixes. This
module imports nothing else of the suite, so that it runs against any checkout.

Situations (the loop stalls are the suite's `loop_stall` scenario, benchmarks/stalls.py):

- `cap-small`, `cap-large`, `cap-sets`, `cap-writers`: the size cap, sampled every
  50 ms by another process (bytes of the regular files in `log/` and in the namespace
  root): one process sending 100,000 x 2 KB `notify` (gathered 1,000 at a time); 150 x
  1 MiB `notify`; 100,000 cache sets of 2 KB values to 10,000 keys (`i % 10,000`: the
  state, ~20 MB, fits under the cap; the log, ~200 MB, does not), then a late joiner's
  keys; 20 writers at about 1 MB/s each (2 KB messages) for 10 s;
- `killed-holder`, `unclosed-peer`: a killed peer whose plain `fork` helper lives on,
  and a peer whose `asyncio.run()` returned without `destroy()`: seconds until the
  survivor holds the snapshot lock and collects it; a late joiner's keys of 10,001;
- `forged-frame`: 52 forged bytes (a frame header with a valid checksum claiming
  8 MiB) appended to a live writer's segment, then 970 messages;
- `fifo-snapshot`: a FIFO planted at `snapshot.bin`: does a joiner's `start()` return;
- `snapshot-half`, `snapshot-empty`: `snapshot.bin` truncated to half (and emptied)
  while the cache is idle;
- `short-lived-peers`: 300 short-lived peers beside a long-lived one: dead entries in
  its reader table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCRIPT = os.path.abspath(__file__)
MiB = 1 << 20
CAP = 64 * MiB  # the library's default max_footprint
SEGMENT = 2 * MiB  # the library's default segment_bytes
# Situations 2 and 6: small enough that the cap and collection act within seconds.
SMALL = {
    "max_footprint": 4 * MiB,
    "segment_bytes": 256 << 10,
    "retention": 2.0,
    "rescan_interval": 0.5,
}
STAT_KEYS = (
    "writers",
    "snapshot_holder",
    "snapshots_written",
    "snapshots_damaged",
    "records_lost",
    "garbage_bytes",
    "gaps",
    "segments_deleted",
    "footprint_bytes",
)


class Hang(Exception):
    """A child process said nothing within its deadline."""


# -- roles: each runs in its own process ------------------------------------------


def say(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


async def read_line() -> str:
    return await asyncio.to_thread(sys.stdin.readline)


async def until(condition: Callable[[], bool], timeout: float) -> None:
    """Poll `condition` every 10 ms until it holds or `timeout` s passed."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110 (polls stats)
        await asyncio.sleep(0.01)


def pick(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats[k] for k in STAT_KEYS if k in stats}


async def finish(ipc: Any) -> None:
    """Wait for the orchestrator's word (or EOF), then leave cleanly if the library lets us."""
    while await read_line() not in ("", "stop\n"):
        pass
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            await ipc.destroy()


def role_sampler(ns: str, interval: float) -> None:
    """Sample the namespace's bytes every `interval` s until told to stop."""
    root = Path(ns)
    samples: list[tuple[float, int]] = []
    largest: dict[str, int] = {}
    say({"ready": True})
    start = time.monotonic()
    nxt = start
    with selectors.DefaultSelector() as sel:
        sel.register(sys.stdin, selectors.EVENT_READ)
        while True:
            parts = namespace_parts(root)
            total = sum(parts.values())
            samples.append((round(time.monotonic() - start, 3), total))
            if total > sum(largest.values()):
                largest = parts
            nxt += interval
            if sel.select(max(0.0, nxt - time.monotonic())):
                break
    say({"samples": samples, "largest": largest})


def role_burst(
    path: str,
    options: dict[str, Any],
    kind: str,
    n: int = 0,
    size: int = 2000,
    chunk: int = 1000,
    deadline: float = 30.0,
    mod: int = 1,
    rate: int = 0,
    secs: float = 0.0,
    expect_file: str | None = None,
) -> None:
    """Write as told after "go": `notify` n messages, `set` n keys, or `rate` bytes/s."""

    async def main() -> None:
        from ivip_ipc_async import AsyncCache, AsyncIPC

        ipc = AsyncIPC(path, **options)
        await ipc.start()
        cache: Any = AsyncCache(ipc)
        say({"ready": True, "peer": ipc.stats().get("peer")})
        await read_line()
        acked = failed = 0
        errors: Counter[str] = Counter()
        expected: dict[str, int] = {}
        pad = "x" * size
        timed_out = False
        t0 = time.monotonic()

        def count(results: list[Any]) -> list[bool]:
            nonlocal acked, failed
            ok = []
            for r in results:
                if isinstance(r, BaseException):
                    failed += 1
                    errors[f"{type(r).__name__}: {r}"[:120]] += 1
                    ok.append(False)
                else:
                    acked += 1
                    ok.append(True)
            return ok

        try:
            async with asyncio.timeout(deadline):
                if kind == "notify":
                    for first in range(0, n, chunk):
                        k = min(chunk, n - first)
                        count(
                            await asyncio.gather(
                                *(ipc.notify("e", pad) for _ in range(k)), return_exceptions=True
                            )
                        )
                elif kind == "set":
                    for first in range(0, n, chunk):
                        idx = range(first, min(n, first + chunk))
                        oks = count(
                            await asyncio.gather(
                                *(cache.set(f"k{i % mod}", f"{i}:{pad}", 0) for i in idx),
                                return_exceptions=True,
                            )
                        )
                        for i, ok in zip(idx, oks, strict=True):
                            if ok:
                                expected[f"k{i % mod}"] = i
                else:  # rate: 2 KB messages, a tick every 100 ms
                    per_tick = max(1, rate // 10 // size)
                    tick = t0
                    while time.monotonic() - t0 < secs:
                        count(
                            await asyncio.gather(
                                *(ipc.notify("e", pad) for _ in range(per_tick)),
                                return_exceptions=True,
                            )
                        )
                        tick += 0.1
                        await asyncio.sleep(max(0.0, tick - time.monotonic()))
        except TimeoutError:
            timed_out = True
        if expect_file is not None:
            Path(expect_file).write_text(json.dumps(expected))
        say(
            {
                "acked": acked,
                "failed": failed,
                "errors": dict(errors.most_common(3)),
                "secs": round(time.monotonic() - t0, 2),
                "timed_out": timed_out,
            }
        )
        await finish(ipc)

    asyncio.run(main())


def role_joiner(
    path: str, options: dict[str, Any], wait: float = 0.0, expect_file: str | None = None
) -> None:
    """Start, say when start() returned, then the cache's keys (after `wait` s)."""

    async def main() -> None:
        from ivip_ipc_async import AsyncCache, AsyncIPC

        t0 = time.monotonic()
        ipc = AsyncIPC(path, **options)
        await ipc.start()
        say({"started_s": round(time.monotonic() - t0, 3)})
        cache: Any = AsyncCache(ipc)
        at_start = len(await cache.keys())
        await asyncio.sleep(wait)
        keys = await cache.keys()
        out: dict[str, Any] = {"keys_at_start": at_start, "keys": len(keys)}
        if expect_file is not None:
            expected = json.loads(Path(expect_file).read_text())
            correct = 0
            for key, i in expected.items():
                value = await cache.get(key)
                if isinstance(value, str) and value.split(":", 1)[0] == str(i):
                    correct += 1
            out.update(expected=len(expected), correct=correct)
        health = ipc.health()
        out.update(
            healthy=health.get("healthy"), problems=health.get("problems"), stats=pick(ipc.stats())
        )
        say(out)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await ipc.destroy()

    asyncio.run(main())


def _sleeping_helper() -> None:
    time.sleep(120)  # a plain forked helper: it never touches the library


def role_victim(path: str, options: dict[str, Any], how: str) -> None:
    """Take the snapshot lock, write a key, then fork a helper (and wait to be
    killed) or let `asyncio.run()` return without destroy() and go on sleeping."""

    async def main() -> None:
        import multiprocessing

        from ivip_ipc_async import AsyncCache, AsyncIPC

        ipc = AsyncIPC(path, **options)
        await ipc.start()
        await AsyncCache(ipc).set("victim", 1, 0)
        await until(lambda: ipc.stats()["snapshot_holder"], 10)
        info = {"peer": ipc.stats()["peer"], "holder": ipc.stats()["snapshot_holder"]}
        if how == "fork":
            child = multiprocessing.get_context("fork").Process(target=_sleeping_helper)
            child.start()
            say({**info, "child": child.pid})
            await asyncio.sleep(3600)
        say(info)

    asyncio.run(main())
    say({"ended": True})
    time.sleep(3600)


def role_survivor(
    path: str,
    options: dict[str, Any],
    victim: str,
    window: float,
    keys: int,
    filler: int,
    filler_size: int,
) -> None:
    """After "go": seconds until this peer holds the snapshot lock and the victim
    is collected; after a second "go": write `keys` keys, then `filler` messages."""

    async def main() -> None:
        from ivip_ipc_async import AsyncCache, AsyncIPC

        ipc = AsyncIPC(path, **options)
        await ipc.start()
        cache: Any = AsyncCache(ipc)
        say({"ready": True, "holder": ipc.stats()["snapshot_holder"]})
        await read_line()
        ns = Path(path) / "default"
        t0 = time.monotonic()
        holder_s = collected_s = None
        while time.monotonic() - t0 < window and (holder_s is None or collected_s is None):
            now = round(time.monotonic() - t0, 2)
            if holder_s is None and ipc.stats()["snapshot_holder"]:
                holder_s = now
            if collected_s is None and not (
                (ns / "peers" / f"{victim}.lock").exists()
                or any((ns / "log").glob(f"{victim}-*.seg"))
            ):
                collected_s = now
            await asyncio.sleep(0.02)
        say({"holder_s": holder_s, "collected_s": collected_s, "stats": pick(ipc.stats())})
        await read_line()
        acked = failed = 0
        for first in range(0, keys, 1000):
            results = await asyncio.gather(
                *(cache.set(f"s{i}", "y" * 100, 0) for i in range(first, min(keys, first + 1000))),
                return_exceptions=True,
            )
            failed += sum(isinstance(r, BaseException) for r in results)
            acked += sum(not isinstance(r, BaseException) for r in results)
        pad = "z" * filler_size
        results = await asyncio.gather(
            *(ipc.notify("f", pad) for _ in range(filler)), return_exceptions=True
        )
        say(
            {
                "acked": acked,
                "failed": failed,
                "filler_failed": sum(isinstance(r, BaseException) for r in results),
            }
        )
        await finish(ipc)

    asyncio.run(main())


def role_writer(path: str, options: dict[str, Any]) -> None:
    """Notify integers a..b-1 one at a time for each {"notify": [a, b]} line."""

    async def main() -> None:
        from ivip_ipc_async import AsyncIPC

        ipc = AsyncIPC(path, **options)
        await ipc.start()
        say({"peer": ipc.stats()["peer"]})
        while line := await read_line():
            a, b = json.loads(line)["notify"]
            for i in range(a, b):
                await ipc.notify("e", i)
            say({"acked": b - a})
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await ipc.destroy()

    asyncio.run(main())


def role_reader(path: str, options: dict[str, Any]) -> None:
    """Receive "e"; for each {"wait": n, "timeout": t} say what arrived by then."""

    async def main() -> None:
        from ivip_ipc_async import AsyncIPC

        ipc = AsyncIPC(path, **options)
        got: list[Any] = []
        gaps: list[Any] = []
        ipc.on("e", got.append)
        ipc.on("ivip:gap", gaps.append)
        await ipc.start()
        say({"ready": True})
        while line := await read_line():
            cmd = json.loads(line)
            await until(lambda: len(got) >= cmd["wait"], cmd["timeout"])  # noqa: B023
            say({"got": got[-cmd["wait"] :], "gaps": gaps[:5], "stats": pick(ipc.stats())})
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await ipc.destroy()

    asyncio.run(main())


def role_holder(path: str, options: dict[str, Any], keys: int) -> None:
    """Set `keys` keys, wait until snapshot.bin holds them all and the covered
    segments are deleted, then idle."""

    async def main() -> None:
        from ivip_ipc_async import AsyncCache, AsyncIPC
        from ivip_ipc_async.records import FrameReader, Kind

        ipc = AsyncIPC(path, **options)
        await ipc.start()
        cache: Any = AsyncCache(ipc)
        for i in range(keys):
            await cache.set(f"k{i}", i, 0)
        snapshot = Path(path) / "default" / "snapshot.bin"

        def complete() -> bool:
            with contextlib.suppress(OSError):
                records = FrameReader(max_body=64 << 20).feed(snapshot.read_bytes())
                return sum(r.kind == Kind.CACHE_SET for r in records) == keys
            return False

        await until(complete, 15)
        # Only the open segment stays: the snapshot is the one copy of the rest.
        await until(lambda: len(list((snapshot.parent / "log").glob("*.seg"))) <= 1, 15)
        say({"ready": True, "stats": pick(ipc.stats())})
        while await read_line() not in ("", "stop\n"):
            health = ipc.health()
            say({"stats": pick(ipc.stats()), "healthy": health.get("healthy")})
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await ipc.destroy()

    asyncio.run(main())


def role_longlived(path: str, options: dict[str, Any]) -> None:
    """Stay; for each {"watch": s} say its reader-table size every second for s s."""

    async def main() -> None:
        from ivip_ipc_async import AsyncCache, AsyncIPC

        ipc = AsyncIPC(path, **options)
        await ipc.start()
        cache: Any = AsyncCache(ipc)
        say({"ready": True, "peer": ipc.stats()["peer"]})
        while line := await read_line():
            seconds = json.loads(line)["watch"]
            writers = []
            for _ in range(int(seconds) + 1):
                writers.append(ipc.stats()["writers"])
                await asyncio.sleep(1)
            say({"writers": [*writers[:-1], ipc.stats()["writers"]], "keys": len(cache)})
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await ipc.destroy()

    asyncio.run(main())


def role_churn(path: str, options: dict[str, Any], n: int) -> None:
    """`n` short-lived instances in turn, each writing one key."""

    async def main() -> None:
        from ivip_ipc_async import AsyncCache, AsyncIPC

        t0 = time.monotonic()
        for i in range(n):
            async with AsyncIPC(path, **options) as short:
                await AsyncCache(short).set(f"c{i}", i, 0)
        say({"done": n, "secs": round(time.monotonic() - t0, 2)})

    asyncio.run(main())


def role_whoami() -> None:
    """Say which copy of the library this process imports."""
    import ivip_ipc_async

    say({"library": os.path.abspath(ivip_ipc_async.__file__)})


ROLES: dict[str, Callable[..., None]] = {
    "whoami": role_whoami,
    "sampler": role_sampler,
    "burst": role_burst,
    "joiner": role_joiner,
    "victim": role_victim,
    "survivor": role_survivor,
    "writer": role_writer,
    "reader": role_reader,
    "holder": role_holder,
    "longlived": role_longlived,
    "churn": role_churn,
}


# -- the orchestrator -----------------------------------------------------------


def namespace_parts(ns: Path) -> dict[str, int]:
    """Bytes of the regular files in the namespace root and in its log/, by kind:
    "segments" (log/), "snapshot.bin", "snapshot temp files" (.snapshot.*), "other"."""
    parts: Counter[str] = Counter()
    for where in (ns, ns / "log"):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(where):
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False):
                        if where != ns:
                            kind = "segments"
                        elif entry.name == "snapshot.bin":
                            kind = entry.name
                        elif entry.name.startswith(".snapshot."):
                            kind = "snapshot temp files"
                        else:
                            kind = "other"
                        parts[kind] += entry.stat(follow_symlinks=False).st_size
    return dict(parts)


def namespace_bytes(ns: Path) -> int:
    """Bytes of the regular files in the namespace root and in its log/."""
    return sum(namespace_parts(ns).values())


class Child:
    """One role in its own process: JSON lines in (stdin) and out (stdout)."""

    def __init__(self, env: dict[str, str], scratch: Path, role: str, **args: Any) -> None:
        self.role = role
        self.log = scratch / f"{role}-{time.monotonic_ns()}.log"
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, SCRIPT, "--role", role, json.dumps(args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=scratch,
            )
        self._buf = b""

    def poll_line(self, timeout: float) -> dict[str, Any] | None:
        """The next line, or None if none came within `timeout` s."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"{self.role} exited ({self.proc.wait()}): {' | '.join(tail)}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        return out

    def line(self, timeout: float, what: str) -> dict[str, Any]:
        out = self.poll_line(timeout)
        if out is None:
            raise Hang(f"{self.role}: {what} not within {timeout:g} s")
        return out

    def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)).encode())
            self.proc.stdin.write(b"\n")
            self.proc.stdin.flush()

    def stderr_text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self, grace: float = 12.0) -> None:
        """Let it leave (stdin closed), killing it after `grace` s."""
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()


class Run:
    """Shared settings of one run and the children it started."""

    def __init__(self, quick: bool) -> None:
        import ivip_ipc_async

        self.quick = quick
        self.library = os.path.abspath(ivip_ipc_async.__file__)
        root = str(Path(self.library).parent.parent)
        self.root = root
        rest = os.environ.get("PYTHONPATH", "")
        self.env = {**os.environ, "PYTHONPATH": root + (os.pathsep + rest if rest else "")}
        self.children: list[Child] = []
        self.pids: list[int] = []  # grandchildren to kill at the end (fork helpers)

    def child(self, scratch: Path, role: str, **args: Any) -> Child:
        c = Child(self.env, scratch, role, **args)
        self.children.append(c)
        return c

    def cleanup(self) -> None:
        for c in self.children:
            if c.proc.poll() is None:
                c.kill()
            for pipe in (c.proc.stdin, c.proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        self.children.clear()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def cap_situation(
    run: Run,
    scratch: Path,
    writers: list[dict[str, Any]],
    cap: int,
    deadline: float,
    joiner: bool = False,
) -> dict[str, Any]:
    """Writers burst while another process samples the namespace every 50 ms."""
    path = str(scratch / "ipc")
    ns = Path(path) / "default"
    burst = [run.child(scratch, "burst", path=path, deadline=deadline, **w) for w in writers]
    for b in burst:
        b.line(30, "start()")
    sampler = run.child(scratch, "sampler", ns=str(ns), interval=0.05)
    sampler.line(10, "sampler start")
    t0 = time.monotonic()
    for b in burst:
        b.send("go")
    results = [b.line(deadline + 20, "acknowledgements") for b in burst]
    burst_s = time.monotonic() - t0
    # Keep sampling until the namespace has been under the cap for 1 s (10 s at most).
    tail_end = time.monotonic() + 10
    under_since: float | None = None
    while time.monotonic() < tail_end:
        now = time.monotonic()
        if namespace_bytes(ns) <= cap:
            under_since = under_since or now
            if now - under_since >= 1.0:
                break
        else:
            under_since = None
        time.sleep(0.1)
    sampler.send("stop")
    sampled = sampler.line(10, "samples")
    samples = sampled["samples"]
    raw: dict[str, Any] = {"burst_s": round(burst_s, 2), "writers": results}
    raw["largest_sample"] = sampled["largest"]
    sizes = [s for _, s in samples]
    slack = cap + len(writers) * SEGMENT
    above = [i for i, s in enumerate(sizes) if s > cap]
    raw.update(
        samples=len(sizes),
        max_bytes=max(sizes),
        above_cap=len(above),
        above_cap_plus_slack=sum(s > slack for s in sizes),
        seconds_above_cap=round(0.05 * len(above), 2),
    )
    acked = sum(r["acked"] for r in results)
    failed = sum(r["failed"] for r in results)
    parts = sorted(sampled["largest"].items(), key=lambda kv: -kv[1])
    largest = ", ".join(f"{k} {mib(v)}" for k, v in parts if v >= MiB // 20)
    text = (
        f"max {mib(max(sizes))}; above the cap in {len(above)} of {len(sizes)} samples "
        f"({100 * len(above) / len(sizes):.0f} %, ~{raw['seconds_above_cap']} s), above cap + "
        f"{len(writers)} x {SEGMENT // MiB} MiB in {raw['above_cap_plus_slack']}; "
        f"{acked:,} acked in {burst_s:.1f} s"
    )
    if any(w["kind"] == "rate" for w in writers):
        size = writers[0]["size"]
        text += f" ({acked * size / burst_s / len(writers) / 1e6:.2f} MB/s per writer)"
    if failed:
        text += f", {failed:,} failed ({', '.join(k for r in results for k in r['errors'])[:100]})"
    if any(r["timed_out"] for r in results):
        text += f" (deadline {deadline:g} s reached)"
    text += f"; largest sample: {largest}"
    if joiner:
        expect = writers[0]["expect_file"]
        j = run.child(
            scratch, "joiner", path=path, options=writers[0]["options"], expect_file=expect
        )
        j.line(30, "joiner start()")
        got = j.line(60, "joiner keys")
        raw["joiner"] = got
        text += (
            f"; late joiner: {got['keys']:,} of {got['expected']:,} acked keys, "
            f"{got['correct']:,} with the last acked value"
        )
        j.close()
    for b in burst:
        b.close()
    return {"measured": text, "raw": raw}


def cap_small_messages(run: Run, scratch: Path) -> dict[str, Any]:
    n = 20_000 if run.quick else 100_000
    w = {"options": {}, "kind": "notify", "n": n, "size": 2000, "chunk": 1000}
    return cap_situation(run, scratch, [w], CAP, 30)


def cap_large_messages(run: Run, scratch: Path) -> dict[str, Any]:
    n = 50 if run.quick else 150
    w = {"options": {}, "kind": "notify", "n": n, "size": MiB, "chunk": 10}
    return cap_situation(run, scratch, [w], CAP, 30)


def cap_cache_sets(run: Run, scratch: Path) -> dict[str, Any]:
    n, mod = (20_000, 2_000) if run.quick else (100_000, 10_000)
    w = {
        "options": {},
        "kind": "set",
        "n": n,
        "mod": mod,
        "size": 2000,
        "chunk": 1000,
        "expect_file": str(scratch / "expected.json"),
    }
    return cap_situation(run, scratch, [w], CAP, 30, joiner=True)


def cap_many_writers(run: Run, scratch: Path) -> dict[str, Any]:
    writers, secs = (5, 5.0) if run.quick else (20, 10.0)
    w = {"options": {}, "kind": "rate", "rate": 1_000_000, "secs": secs, "size": 2000}
    return cap_situation(run, scratch, [w] * writers, CAP, secs + 20)


def locks_situation(run: Run, scratch: Path, how: str) -> dict[str, Any]:
    path = str(scratch / "ipc")
    window = 10.0 if run.quick else 30.0
    keys = 10_000  # + the victim's own key: 10,001 acknowledged
    victim = run.child(scratch, "victim", path=path, options=SMALL, how=how)
    info = victim.line(30, "victim start")
    if "child" in info:
        run.pids.append(info["child"])
    survivor = run.child(
        scratch,
        "survivor",
        path=path,
        options=SMALL,
        victim=info["peer"],
        window=window,
        keys=keys,
        filler=6000,  # 12 MB of 2 KB messages: three times the 4 MiB cap
        filler_size=2000,
    )
    ready = survivor.line(30, "survivor start")
    if how == "fork":
        victim.kill()
    else:
        victim.line(30, "asyncio.run() to return")
    survivor.send("go")
    took = survivor.line(window + 20, "take-over figures")
    survivor.send("go")
    wrote = survivor.line(120, "survivor's writes")
    time.sleep(2.0)  # a maintenance round or more (every third 0.5 s round before the fixes)
    j = run.child(scratch, "joiner", path=path, options=SMALL)
    j.line(30, "joiner start()")
    got = j.line(30, "joiner keys")
    j.close()
    survivor.close()
    victim.kill()
    acked = 1 + wrote["acked"]

    def secs(v: float | None) -> str:
        return f"after {v:.2f} s" if v is not None else f"not within {window:g} s"

    text = (
        f"survivor holds snapshot.lock {secs(took['holder_s'])}, "
        f"dead peer collected {secs(took['collected_s'])}; "
        f"late joiner: {got['keys']:,} of {acked:,} acked keys"
    )
    if wrote["failed"] or wrote["filler_failed"]:
        text += f" ({wrote['failed']} sets, {wrote['filler_failed']} notifies failed)"
    return {
        "measured": text,
        "raw": {"victim": info, "survivor": ready, "took": took, "wrote": wrote, "joiner": got},
    }


def killed_holder(run: Run, scratch: Path) -> dict[str, Any]:
    return locks_situation(run, scratch, "fork")


def unclosed_peer(run: Run, scratch: Path) -> dict[str, Any]:
    return locks_situation(run, scratch, "ended")


def forged_frame(run: Run, scratch: Path) -> dict[str, Any]:
    from ivip_ipc_async.records import Kind, Record, encode_frame

    path = str(scratch / "ipc")
    options = {"rescan_interval": 0.5}
    writer = run.child(scratch, "writer", path=path, options=options)
    peer = writer.line(30, "writer start")["peer"]
    reader = run.child(scratch, "reader", path=path, options=options)
    reader.line(30, "reader start")
    writer.send({"notify": [-1, 0]})
    writer.line(10, "first ack")
    reader.send({"wait": 1, "timeout": 10})
    first = reader.line(20, "first message")
    if first["got"] != [-1]:
        raise RuntimeError(f"the reader did not get the first message: {first}")
    forged = encode_frame(Record(Kind.MESSAGE, "e", b"", b"x" * (8 << 20)), 99)[:52]
    (segment,) = sorted((Path(path) / "default" / "log").glob(f"{peer}-*.seg"))[-1:]
    with segment.open("ab") as f:
        f.write(forged)
    writer.send({"notify": [0, 970]})
    writer.line(60, "970 acks")
    reader.send({"wait": 970, "timeout": 10})
    got = reader.line(30, "messages")
    in_order = got["got"] == list(range(970))
    received = sum(1 for m in got["got"] if isinstance(m, int) and m >= 0)
    st = got["stats"]
    text = (
        f"{received} of 970 acked messages received within 10 s"
        + ("" if in_order or not received else " (not all in order)")
        + f"; records_lost {st.get('records_lost')}, garbage_bytes {st.get('garbage_bytes')}"
    )
    if got["gaps"]:
        text += f"; gap events: {json.dumps(got['gaps'])[:160]}"
    reader.close()
    writer.close()
    return {"measured": text, "raw": {"forged_bytes": len(forged), "reader": got}}


def fifo_snapshot(run: Run, scratch: Path) -> dict[str, Any]:
    ns = scratch / "ipc" / "default"
    for sub in ("log", "peers"):
        (ns / sub).mkdir(parents=True, mode=0o700)
    os.chmod(ns.parent, 0o700)
    os.chmod(ns, 0o700)
    os.mkfifo(ns / "snapshot.bin", 0o600)
    j = run.child(scratch, "joiner", path=str(ns.parent), options={})
    started = j.poll_line(5.0)
    if started is None:
        j.kill()
        return {
            "measured": "hang: start() had not returned after 5 s",
            "raw": {"started": None},
        }
    got = j.line(20, "joiner keys")
    j.close()
    text = f"start() returned in {started['started_s']:.3f} s"
    text += f"; healthy {got['healthy']}"
    return {"measured": text, "raw": {"started": started, "joiner": got}}


def snapshot_situation(run: Run, scratch: Path, keep: float) -> dict[str, Any]:
    path = str(scratch / "ipc")
    # Small segments, short retention: the log keeps only the open segment.
    options = {"rescan_interval": 0.5, "segment_bytes": 4096, "retention": 1.0}
    snapshot = Path(path) / "default" / "snapshot.bin"
    holder = run.child(scratch, "holder", path=path, options=options, keys=300)
    ready = holder.line(40, "holder's 300 keys and snapshots")
    before = snapshot.stat()
    full = before.st_size
    mark = len(holder.stderr_text())
    os.truncate(snapshot, int(full * keep))
    damaged = os.stat(snapshot)
    t0 = time.monotonic()
    rewritten_s = None
    j = run.child(scratch, "joiner", path=path, options=options, wait=5.0)
    started = j.line(30, "joiner start()")
    got = None
    while got is None or time.monotonic() - t0 < 6.0:
        if got is None:
            got = j.poll_line(0.05)
        else:
            time.sleep(0.05)
        if rewritten_s is None:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(snapshot)
                if st.st_size >= full and (st.st_ino, st.st_mtime_ns) != (
                    damaged.st_ino,
                    damaged.st_mtime_ns,
                ):
                    rewritten_s = round(time.monotonic() - t0, 2)
        if time.monotonic() - t0 > 40:
            raise Hang("joiner: keys not within 40 s")
    holder.send("stats")
    held = holder.line(10, "holder stats")
    j.close()
    warned = [
        line
        for line in (holder.stderr_text()[mark:] + j.stderr_text()).splitlines()
        if "snapshot" in line.lower()
    ]
    holder.close()
    text = (
        f"late joiner: {got['keys']} of 300 keys after 5 s ({got['keys_at_start']} at start); "
        + (
            f"rewritten by the holder after {rewritten_s:.2f} s"
            if rewritten_s is not None
            else "not rewritten in 6 s"
        )
        + f"; warning logged: {'yes' if warned else 'no'}; joiner healthy: {got['healthy']}"
    )
    return {
        "measured": text,
        "raw": {
            "full_bytes": full,
            "kept_bytes": int(full * keep),
            "holder": ready,
            "holder_after": held,
            "joiner_started": started,
            "joiner": got,
            "rewritten_s": rewritten_s,
            "warnings": warned[:3],
        },
    }


def truncated_snapshot(run: Run, scratch: Path) -> dict[str, Any]:
    return snapshot_situation(run, scratch, 0.5)


def emptied_snapshot(run: Run, scratch: Path) -> dict[str, Any]:
    return snapshot_situation(run, scratch, 0.0)


def short_lived_peers(run: Run, scratch: Path) -> dict[str, Any]:
    path = str(scratch / "ipc")
    log = Path(path) / "default" / "log"
    n = 100 if run.quick else 300
    long_lived = [run.child(scratch, "longlived", path=path, options=SMALL) for _ in range(2)]
    peers = [c.line(30, "long-lived start")["peer"] for c in long_lived]
    churn = run.child(scratch, "churn", path=path, options=SMALL, n=n)
    done = churn.line(120, f"{n} short-lived peers")
    churn.close()
    for c in long_lived:
        c.send({"watch": 10})
    seen = [c.line(30, "reader table") for c in long_lived]
    # A live long-lived peer with a segment is a writer to the other one, not a dead entry.
    live = [int(any(log.glob(f"{other}-*.seg"))) for other in reversed(peers)]
    for c in long_lived:
        c.close()
    dead = [[w - lv for w in s["writers"]] for s, lv in zip(seen, live, strict=True)]
    text = (
        f"dead entries in the reader tables of 2 long-lived peers 10 s after {n} short-lived "
        f"peers: {' and '.join(str(d[-1]) for d in dead)} "
        f"({' and '.join(str(d[0]) for d in dead)} when they were done, after "
        f"{done['secs']:.1f} s); keys seen: {' and '.join(str(s['keys']) for s in seen)} of {n}"
    )
    return {
        "measured": text,
        "raw": {"churn": done, "long_lived": seen, "live_writers": live, "dead": dead},
    }


SITUATIONS: list[tuple[str, str, str, Callable[[Run, Path], dict[str, Any]]]] = [
    (
        "cap-small",
        "cap 64 MiB: one process, 100,000 x 2 KB notify (1,000 gathered at a time)",
        "196 MiB, above the cap for about 5.5 s",
        cap_small_messages,
    ),
    (
        "cap-large",
        "cap 64 MiB: 150 x 1 MiB notify (10 gathered at a time)",
        "150 MiB",
        cap_large_messages,
    ),
    (
        "cap-sets",
        "cap 64 MiB: 100,000 cache sets, 2 KB values, keys i % 10,000 (1,000 gathered)",
        "199 MiB (100,000 cache sets)",
        cap_cache_sets,
    ),
    (
        "cap-writers",
        "cap 64 MiB: 20 writers at ~1 MB/s each (2 KB notify) for 10 s",
        "80-184 MiB, above the cap in 760 of 872 samples",
        cap_many_writers,
    ),
    (
        "killed-holder",
        "kill -9 of a peer (snapshot holder) with a plain multiprocessing 'fork' helper",
        "after 30 s: 0 snapshots, nobody collected; late joiner 3,847 of 10,001 keys",
        killed_holder,
    ),
    (
        "unclosed-peer",
        "asyncio.run() returns without destroy(), the program sleeps on",
        "same as with the fork helper",
        unclosed_peer,
    ),
    (
        "forged-frame",
        "52 forged bytes (valid header CRC, 8 MiB length) appended to a live writer's "
        "segment, then 970 messages",
        "nothing more delivered; 970 acked messages lost, blamed on retention",
        forged_frame,
    ),
    (
        "fifo-snapshot",
        "FIFO planted at snapshot.bin: a joiner's start()",
        "new joiners hang in start() forever",
        fifo_snapshot,
    ),
    (
        "snapshot-half",
        "snapshot.bin truncated to half while the cache (300 keys) is idle",
        "late joiners saw 150 of 300 keys, no warning, health() healthy",
        truncated_snapshot,
    ),
    (
        "snapshot-empty",
        "snapshot.bin emptied while the cache (300 keys) is idle",
        "late joiners saw 17 of 300 keys, no warning",
        emptied_snapshot,
    ),
    (
        "short-lived-peers",
        "300 short-lived peers (one process, one key each) beside 2 long-lived ones",
        "69-268 dead entries kept forever",
        short_lived_peers,
    ),
]


def git_commit(root: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.faults", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller workloads, shorter windows")
    parser.add_argument("--out", help="write the rows and raw figures to this JSON file")
    parser.add_argument(
        "--only", nargs="+", choices=[s[0] for s in SITUATIONS], help="situations to run"
    )
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.role:
        logging.basicConfig(
            level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
        ROLES[ns.role](**json.loads(ns.args or "{}"))
        return 0
    run = Run(ns.quick)
    commit = git_commit(run.root)
    scratch = Path(tempfile.mkdtemp(prefix="ivip-dfaults-", dir="/dev/shm"))
    try:
        children_import = run.child(scratch, "whoami").line(30, "whoami")["library"]
    finally:
        run.cleanup()
        shutil.rmtree(scratch, ignore_errors=True)
    if children_import != run.library:
        raise SystemExit(f"children import {children_import}, not {run.library}")
    print(f"library: {run.library} (commit {commit}); the children import the same")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, quick: {ns.quick}")
    print()
    rows = []
    for sid, situation, before, fn in SITUATIONS:
        if ns.only and sid not in ns.only:
            continue
        scratch = Path(tempfile.mkdtemp(prefix="ivip-dfaults-", dir="/dev/shm"))
        t0 = time.monotonic()
        try:
            out = fn(run, scratch)
        except Hang as exc:
            out = {"measured": f"hang ({exc})", "raw": {}}
        except Exception as exc:
            out = {"measured": f"failed ({type(exc).__name__}: {exc})"[:300], "raw": {}}
        finally:
            run.cleanup()
            shutil.rmtree(scratch, ignore_errors=True)
        row = {"id": sid, "situation": situation, "before": before, **out}
        row["seconds"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        print(f"[{sid} done in {row['seconds']} s] {out['measured']}", file=sys.stderr, flush=True)
    print("| name | situation | measured | seen before the fixes |")
    print("|---|---|---|---|")
    for row in rows:
        cells = [row["id"], row["situation"], row["measured"], row["before"]]
        print("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(
                {
                    "library": run.library,
                    "commit": commit,
                    "quick": ns.quick,
                    "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                    "rows": rows,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
