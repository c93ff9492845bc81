"""A process of the outage tests: contends for a lock, a Leadership and memoize's
single flight in a loop, while the test restarts Redis under it.

    python -m tests.redis_backend.coordination_peer URL NAMESPACE DIR NAME

Writes `DIR/NAME.progress` (operations done) as it goes; once `DIR/stop` exists
it prints every exception it caught (module, name, text) as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from ivip_ipc_async import AsyncCache, AsyncIPC, Leadership


def _name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"


async def main(url: str, namespace: str, folder: Path, name: str) -> None:
    errors: list[str] = []
    done = 0
    ipc = AsyncIPC(url, namespace=namespace, retry_timeout=20)
    await ipc.start()
    cache = AsyncCache(ipc)
    stop = folder / "stop"

    @cache.memoize(ttl=0.05)
    async def square(x: int) -> int:
        await asyncio.sleep(0.005)
        return x * x

    async def loop(work: str) -> None:
        nonlocal done
        i = 0
        while not stop.exists():
            i += 1
            try:
                if work == "lock":
                    async with ipc.lock("shared", lease=2.0, timeout=30):
                        await asyncio.sleep(0.005)
                elif work == "leader":
                    async with Leadership(ipc, "boss", lease=2.0):
                        await asyncio.sleep(0.005)
                else:
                    assert await square(i % 7) == (i % 7) ** 2
                done += 1
            except Exception as exc:
                errors.append(_name(exc))
                await asyncio.sleep(0.01)

    async def progress() -> None:
        while True:
            (folder / f"{name}.progress").write_text(str(done))
            await asyncio.sleep(0.05)

    reporter = asyncio.create_task(progress())
    await asyncio.gather(loop("lock"), loop("leader"), loop("memo"), loop("memo"))
    reporter.cancel()
    await ipc.destroy()
    print(json.dumps(errors))


if __name__ == "__main__":
    url, namespace, folder, name = sys.argv[1:5]
    asyncio.run(main(url, namespace, Path(folder), name))
