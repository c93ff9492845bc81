"""A worker of tests/directory/test_startup.py, in its own process.

Usage: python startup_worker.py '<json config>'

It writes `<out>/<name>.ready`, waits for one byte on stdin (the test's
starting gun), starts an `AsyncIPC` on the namespace, writes
`<out>/<name>.started` (the monotonic time its `start()` returned), then
notifies event "m" every `interval` seconds: until every worker of `peers` has
started, then `count` more. Each message says who sent it, its number and the
monotonic time just before its `notify` began. Then it writes
`<out>/<name>.sent` and waits (deadline `wait`) until it has every message
each peer sent after this worker's start returned, writes `<out>/<name>.json`
(what it received) and, once every peer has written its own, leaves.
`CLOCK_MONOTONIC` is one clock for every process of a machine, so the times
compare across processes.

`slow_restore`: the restore at start waits, after its first slice, until a
writer it did not know when the restore began has been found (a peer started
during the restore), and writes `<out>/<name>.restoring` first.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ivip_ipc_async import AsyncIPC
from ivip_ipc_async.backends.directory import reader as reader_module


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


async def poll(predicate: Callable[[], bool], wait: float, interval: float = 0.02) -> None:
    """Return once `predicate()` is true, or after `wait` seconds (the test
    then finds what is missing)."""
    deadline = time.monotonic() + wait
    while not predicate():
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(interval)


def slow_down_restore(out: Path, name: str, wait: float) -> None:
    """Hold the restore after its first slice until a new writer turns up."""
    real_restore = reader_module.LogReader.restore_log
    real_breathe = reader_module.breathe  # type: ignore[attr-defined]

    async def restore_log(self: reader_module.LogReader) -> None:
        known = set(self.writers)
        write_json(out / f"{name}.restoring", {"known": sorted(known)})

        async def breathe() -> None:
            await poll(lambda: not set(self.writers) <= known, wait, 0.005)
            await real_breathe()

        setattr(reader_module, "breathe", breathe)  # noqa: B010 (a module's private name)
        try:
            await real_restore(self)
        finally:
            setattr(reader_module, "breathe", real_breathe)  # noqa: B010

    reader_module.LogReader.restore_log = restore_log  # type: ignore[method-assign]


def all_exist(out: Path, names: list[str], suffix: str) -> bool:
    return all((out / f"{n}{suffix}").exists() for n in names)


async def main(config: dict[str, Any]) -> None:
    out = Path(config["out"])
    name: str = config["name"]
    peers: list[str] = [p for p in config["peers"] if p != name]
    wait: float = config.get("wait", 20.0)
    if config.get("slow_restore"):
        slow_down_restore(out, name, wait)
    received: dict[str, list[int]] = {}

    def on_message(msg: dict[str, Any]) -> None:
        received.setdefault(msg["from"], []).append(msg["n"])

    loop = asyncio.get_running_loop()
    write_json(out / f"{name}.ready", {})
    await loop.run_in_executor(None, sys.stdin.buffer.read, 1)  # the starting gun
    ipc = AsyncIPC(config["path"], **config.get("options", {}))
    ipc.on("m", on_message)
    await ipc.start()
    started = time.monotonic()
    write_json(out / f"{name}.started", {"t": started})
    sent: list[tuple[int, float]] = []
    extra = config["count"]
    deadline = time.monotonic() + wait
    while extra > 0 and time.monotonic() < deadline:
        t = time.monotonic()
        await ipc.notify("m", {"from": name, "n": len(sent), "t": t})
        sent.append((len(sent), t))
        if all_exist(out, config["peers"], ".started"):
            extra -= 1
        await asyncio.sleep(config["interval"])
    write_json(out / f"{name}.sent", sent)

    def complete() -> bool:
        for peer in peers:
            path = out / f"{peer}.sent"
            if not path.exists():
                return False
            due = {n for n, t in json.loads(path.read_text()) if t > started}
            if not due <= set(received.get(peer, ())):
                return False
        return True

    await poll(complete, wait)
    stats = ipc.stats()
    write_json(
        out / f"{name}.json",
        {"started": started, "received": received, "records_lost": stats.get("records_lost")},
    )
    await poll(lambda: all_exist(out, peers, ".json"), wait)
    await ipc.destroy()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
