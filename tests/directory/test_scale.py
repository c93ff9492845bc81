"""The cache scales: the cost of a `set` stays flat as the cache grows, and the
live state has a limit of its own (`max_state_bytes`), apart from the history's
(`max_footprint`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.errors import BackendFullError

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


# Holds snapshot.lock (it starts first) and does nothing else.
_HOLDER = """
    import asyncio, json, sys
    from ivip_ipc_async import AsyncIPC

    async def main() -> None:
        async with AsyncIPC(sys.argv[1], max_footprint=8 << 20) as ipc:
            while not ipc.stats()["snapshots_written"]:
                await asyncio.sleep(0.01)
            print(json.dumps({"holder": True}), flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
"""


@pytest.mark.parametrize("holder", ["filler", "another process"])
def test_the_set_rate_stays_flat_past_the_state_the_cap_once_held(
    ipc_dir: Path, holder: str
) -> None:
    """60,000 small keys under an 8 MiB cap: the last 20,000 are set at least a
    third as fast as the first 20,000, whether the filler writes the snapshots
    or another process does (it notices the filler's history filling). (Before:
    the cap counted the snapshot twice, so the room for new writes shrank to
    128 KiB as the state neared half the cap, and each 128 KiB waited for a
    whole snapshot: the rate fell 20x past ~30,000 keys, 1,465 sets/s against
    28,758.)"""
    scripts = []
    try:
        if holder != "filler":
            scripts.append(Script(_HOLDER, str(ipc_dir)))
            assert scripts[-1].line() == {"holder": True}
        scripts.append(Script(_FILL, str(ipc_dir), "60000"))
        out = scripts[-1].line(timeout=120)
    finally:
        for script in scripts:
            script.kill()
    rates = out["rates"]
    assert out["keys"] == 60_000
    first, last = sum(rates[:2]) / 2, sum(rates[-2:]) / 2
    assert last >= first / 3, [round(r) for r in rates]


# Sets small keys under a small max_state_bytes, 1,000 gathered at a time, until
# a whole batch is refused; prints which were acknowledged and the first refusal.
_FULL = """
    import asyncio, json, sys
    from ivip_ipc_async import AsyncCache, AsyncIPC
    from ivip_ipc_async.errors import BackendFullError

    async def main() -> None:
        async with AsyncIPC(sys.argv[1], max_state_bytes=int(sys.argv[2])) as ipc:
            cache = AsyncCache(ipc)
            acked, refused, first = [], 0, None
            for start in range(0, 100_000, 1000):
                results = await asyncio.gather(
                    *(cache.set(f"k{j}", {"id": j, "name": "x" * 40}, 0)
                      for j in range(start, start + 1000)),
                    return_exceptions=True,
                )
                for j, result in zip(range(start, start + 1000), results):
                    if result is None:
                        acked.append(j)
                    else:
                        refused += 1
                        first = first or f"{type(result).__name__}: {result}"
                if all(r is not None for r in results):
                    break
            print(json.dumps({
                "acked": acked, "refused": refused, "first": first,
                "state": ipc.mirror.nbytes,
            }), flush=True)

    asyncio.run(main())
"""


async def test_a_set_past_max_state_bytes_fails_at_once_and_writes_nothing(
    ipc_dir: Path,
) -> None:
    """Under a limit of 200,000 bytes, sets are refused at once with
    BackendFullError naming the limit and the option; the state never passes the
    limit; a late joiner holds exactly the acknowledged keys; the limit is on the
    shared state (another process is refused too) and deleting makes room."""
    limit = 200_000
    script = Script(_FULL, str(ipc_dir), str(limit))
    try:
        out = script.line(timeout=60)
    finally:
        script.kill()
    acked = out["acked"]
    assert 1000 < len(acked) < 5000, len(acked)
    assert out["refused"] >= 1000
    assert out["first"].startswith("BackendFullError: the cache is full"), out["first"]
    assert f"max_state_bytes ({limit} bytes)" in out["first"]
    assert out["state"] <= limit
    async with AsyncIPC(ipc_dir, max_state_bytes=limit) as late:
        cache = AsyncCache(late)
        keys = await cache.keys()
        assert sorted(keys) == sorted(f"k{j}" for j in acked)  # nothing lost, nothing extra
        assert await cache.get(f"k{acked[-1]}") == {"id": acked[-1], "name": "x" * 40}
        with pytest.raises(BackendFullError, match="max_state_bytes"):
            await cache.set("other", {"id": -1, "name": "x" * 40}, 0)
        assert await cache.get("other") is None
        for j in acked[:100]:
            await cache.delete(f"k{j}")
        await cache.set("other", {"id": -1, "name": "x" * 40}, 0)
        assert await cache.get("other") == {"id": -1, "name": "x" * 40}
