"""Joiners starting together over a long retained log: the CPU and wall time of each
`start()`, and its phases.

Run: `python -m benchmarks.crowd [--records 600000] [--kind cache|messages]
[--peers 9] [--max-footprint BYTES] [--after 3] [--out FILE.json]`

A writer fills the namespace with `--records` records, with room for all of
them in the log (`max_footprint` 1 GiB, no snapshot), then exits: a retained
log and no snapshot, as after a one-shot import script. `cache`: a key set per
record (`{"i": i}`, gathered 1,000 at a time); `messages`: `notify_many` of an
event every peer listens to. Then `--peers` processes (the default options but
`--max-footprint`, and a retention that keeps that log for the run) start at
the same moment; each times its `start()` (wall and CPU) and the phases inside
it (snapshot load, log restore, resyncs after gaps), then sets a key and
notifies every 100 ms for `--after` seconds, timing each write (one that finds
no room under the cap waits for a snapshot). A single joiner alone runs first,
over a copy, for comparison. Everything runs in /dev/shm; this prints a table.

CPU per start is the figure to compare: on a shared machine the wall time of a
crowd is what the scheduler gives it (N processes restoring the same log on 2
cores take N times the CPU of one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .harness import BASE, Worker, emit, wait_go

# -- roles (each in its own process) ------------------------------------------------


async def role_fill(path: str, records: int, kind: str) -> None:
    from ivip_ipc_async import AsyncCache, AsyncIPC

    options = {"max_footprint": 1 << 30, "snapshot_interval": 1e9, "retention": 3600}
    async with AsyncIPC(path, **options) as ipc:
        cache: AsyncCache[Any] = AsyncCache(ipc)
        for start in range(0, records, 1000):
            stop = min(records, start + 1000)
            if kind == "messages":  # an event the peers listen to
                await ipc.notify_many("tick", [{"i": i} for i in range(start, stop)])
            else:
                sets = [cache.set(f"k{i}", {"i": i}, 3600) for i in range(start, stop)]
                await asyncio.gather(*sets)
        emit({"filled": records, "footprint": ipc.stats()["footprint_bytes"]})


def _timed(phases: dict[str, float], owner: Any, name: str) -> None:
    """Add the wall time of each call of the coroutine method `owner.name` to
    `phases[name]`."""
    real = getattr(owner, name)

    async def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return await real(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t

    setattr(owner, name, timed)


async def role_peer(path: str, after: float, max_footprint: int) -> None:
    from ivip_ipc_async import AsyncCache, AsyncIPC
    from ivip_ipc_async.backends.directory import gaps, joining
    from ivip_ipc_async.backends.directory.reader import LogReader

    phases: dict[str, float] = {}
    _timed(phases, joining.Joining, "load_at_start")
    _timed(phases, LogReader, "restore_log")
    # The snapshot read, at start (inside load_at_start) and at each resync after a gap.
    _timed(phases, joining, "load_snapshot")
    _timed(phases, gaps, "load_snapshot")
    _timed(phases, gaps.Gaps, "_resync_state")
    ticks = [0]
    errors: list[str] = []
    emit("ready")
    await asyncio.to_thread(wait_go)  # the starting gun
    ipc = AsyncIPC(path, retention=3600, max_footprint=max_footprint)
    ipc.on("tick", lambda _message: ticks.__setitem__(0, ticks[0] + 1))
    cpu, t = time.process_time(), time.perf_counter()
    await ipc.start()
    start_s, start_cpu = time.perf_counter() - t, time.process_time() - cpu
    records_read = ipc.stats()["records_read"]
    cache: AsyncCache[Any] = AsyncCache(ipc)
    writes: list[float] = []
    end = time.perf_counter() + after
    while time.perf_counter() < end:
        t = time.perf_counter()
        try:
            await cache.set(f"peer:{os.getpid()}", len(writes))
            await ipc.notify("tick", len(writes))
        except OSError as exc:
            writes.append(-1.0)
            errors.append(str(exc))
        else:
            writes.append(time.perf_counter() - t)
        await asyncio.sleep(0.1)
    stats = ipc.stats()
    await ipc.destroy()
    emit(
        {
            "start_s": round(start_s, 3),
            "start_cpu_s": round(start_cpu, 3),
            **{f"{k}_s": round(v, 3) for k, v in phases.items()},
            "records_read": records_read,
            "keys": ipc.mirror.count(),
            "write_max_s": round(max(writes, default=0.0), 3),
            "write_failed": writes.count(-1.0),
            "snapshots_written": stats["snapshots_written"],
            "gaps": stats["gaps"],
            "ticks": ticks[0],
            "cpu_s": round(time.process_time(), 3),
            "errors": errors[:3],
        }
    )


# -- the orchestrator ---------------------------------------------------------------


def crowd(path: Path, peers: int, after: float, cap: int) -> list[dict[str, Any]]:
    """`peers` joiners of `path` at the same moment: each one's figures."""
    procs = [Worker(role_peer, str(path), after, cap) for _ in range(peers)]
    try:
        for proc in procs:
            assert proc.line() == "ready"  # imported, waiting for the gun
        for proc in procs:
            proc.go()
        return [proc.line(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            proc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=600_000)
    parser.add_argument("--peers", type=int, default=9)
    parser.add_argument("--after", type=float, default=3.0, help="seconds of writes after start")
    parser.add_argument("--max-footprint", type=int, default=64 << 20, help="the peers' cap")
    parser.add_argument("--kind", choices=["cache", "messages"], default="cache")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    base = Path(BASE or "/tmp") / f"ivip-joiner-crowd-{os.getpid()}"
    results: dict[str, Any] = {"records": args.records, "peers": args.peers}
    try:
        t = time.perf_counter()
        fill = Worker(role_fill, str(base / "ns"), args.records, args.kind)
        print("fill:", fill.line(timeout=3600), f"{time.perf_counter() - t:.1f}s", flush=True)
        fill.close()
        shutil.copytree(base / "ns", base / "alone", symlinks=True)
        results["alone"] = crowd(base / "alone", 1, args.after, args.max_footprint)
        results["crowd"] = crowd(base / "ns", args.peers, args.after, args.max_footprint)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    keys = ["start_s", "start_cpu_s", "load_at_start_s", "restore_log_s", "records_read"]
    keys += ["load_snapshot_s", "_resync_state_s", "gaps", "cpu_s"]
    keys += ["keys", "write_max_s", "write_failed", "snapshots_written"]
    print(" ".join(f"{k.removesuffix('_s')[:9]:>9}" for k in ["run", *keys]))
    for run in ("alone", "crowd"):
        for row in sorted(results[run], key=lambda r: r["start_s"]):
            print(" ".join(f"{v!s:>9}" for v in [run, *(row.get(k, "-") for k in keys)]))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
