"""A process of the failover tests: sends a numbered message every 5 ms, hears the
other peer's, and contends for a lock, while the test breaks Redis under it.

    python -m tests.redis_backend.failover_peer URL NAMESPACE DIR NAME OTHER

Every 10th message is followed by a cache write. Writes `DIR/NAME.progress`
(messages heard, holdings) as it goes; once `DIR/stop` exists it stops
sending, writes `DIR/NAME.sent` (how many were acknowledged), waits to hear
everything the other acknowledged (up to 20 s), and prints its
report as JSON: what it heard, its holdings (fence, start, end; monotonic clock,
which is the machine's), every exception by its module and name, its
acknowledged cache writes (the last value per key) and its cache mirror.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ivip_ipc_async import AsyncCache, AsyncIPC


def _name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"


async def main(url: str, namespace: str, folder: Path, name: str, other: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"{name} %(asctime)s %(message)s")
    heard: list[int] = []
    errors: list[str] = []
    holdings: list[tuple[int, float, float]] = []
    gaps: list[Any] = []
    acked = 0
    sets: dict[str, int] = {}  # acknowledged cache writes: the last value per key
    ipc = AsyncIPC(url, namespace=namespace, retry_timeout=30)
    ipc.on("m", lambda data: heard.append(data["seq"]) if data["from"] == other else None)
    ipc.on("ivip:gap", gaps.append)
    await ipc.start()
    cache = AsyncCache(ipc)
    (folder / f"{name}.ready").touch()
    # Both subscribed before either sends (a file from another process: polled).
    while not (folder / f"{other}.ready").exists():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    stop = folder / "stop"

    async def send() -> None:
        nonlocal acked
        while not stop.exists():
            try:
                await ipc.notify("m", {"from": name, "seq": acked})
                acked += 1
                if acked % 10 == 0:
                    key = f"{name}-{acked % 70}"
                    await cache.set(key, acked)
                    sets[key] = acked
            except Exception as exc:
                errors.append(_name(exc))
            await asyncio.sleep(0.005)

    async def contend() -> None:
        while not stop.exists():
            try:
                async with ipc.lock("shared", lease=5.0, timeout=30) as lock:
                    start = time.monotonic()
                    await asyncio.sleep(0.01)
                    holdings.append((lock.fence, start, time.monotonic()))
            except Exception as exc:
                errors.append(_name(exc))
                await asyncio.sleep(0.01)

    async def progress() -> None:
        while True:
            (folder / f"{name}.progress").write_text(f"{len(heard)} {len(holdings)}")
            await asyncio.sleep(0.05)

    reporter = asyncio.create_task(progress())
    await asyncio.gather(send(), contend())
    (folder / f"{name}.sent").write_text(str(acked))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sent = folder / f"{other}.sent"
        if sent.exists() and len(heard) >= int(sent.read_text() or 0):
            break
        await asyncio.sleep(0.05)
    reporter.cancel()
    mirror = {str(k): await cache.get(k) for k in await cache.keys()}
    await ipc.destroy()
    print(json.dumps({"heard": heard, "acked": acked, "holdings": holdings,
                      "errors": errors, "gaps": gaps, "sets": sets, "mirror": mirror}))  # fmt: skip


if __name__ == "__main__":
    url, namespace, folder, name, other = sys.argv[1:6]
    asyncio.run(main(url, namespace, Path(folder), name, other))
