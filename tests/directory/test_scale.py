"""The cache scales: the cost of a `set` stays flat as the cache grows, and the
live state has a limit of its own (`max_state_bytes`), apart from the history's
(`max_footprint`)."""

from __future__ import annotations

from pathlib import Path

from .helpers import Script

# Fills a cache with small entries on default settings but a cap of 8 MiB (the
# cliff this guards against is about the state's size against the cap: at the
# default 64 MiB it came at ~250,000 keys, at 8 MiB at ~30,000), 1,000 sets
# gathered at a time, and prints the rate of each step of 10,000 keys.
_FILL = """
    import asyncio, json, sys, time
    from ivip_ipc_async import AsyncCache, AsyncIPC

    async def main() -> None:
        n, step = int(sys.argv[2]), 10_000
        async with AsyncIPC(sys.argv[1], max_footprint=8 << 20) as ipc:
            cache = AsyncCache(ipc)
            rates = []
            last = time.perf_counter()
            for first in range(0, n, 1000):
                await asyncio.gather(
                    *(cache.set(f"k{j}", {"id": j, "name": "x" * 40}, 0)
                      for j in range(first, first + 1000))
                )
                if (first + 1000) % step == 0:
                    now = time.perf_counter()
                    rates.append(step / (now - last))
                    last = now
            print(json.dumps({"rates": rates, "keys": len(await cache.keys())}), flush=True)

    asyncio.run(main())
"""


def test_the_set_rate_stays_flat_past_the_state_the_cap_once_held(ipc_dir: Path) -> None:
    """60,000 small keys under an 8 MiB cap: the last 20,000 are set at least a
    third as fast as the first 20,000. (Before: the cap counted the snapshot
    twice, so the room for new writes shrank to 128 KiB as the state neared
    half the cap, and each 128 KiB waited for a whole snapshot: the rate fell
    20x past ~30,000 keys, 1,465 sets/s against 28,758.)"""
    script = Script(_FILL, str(ipc_dir), "60000")
    try:
        out = script.line(timeout=120)
    finally:
        script.kill()
    rates = out["rates"]
    assert out["keys"] == 60_000
    first, last = sum(rates[:2]) / 2, sum(rates[-2:]) / 2
    assert last >= first / 3, [round(r) for r in rates]
