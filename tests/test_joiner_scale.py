"""A late joiner of many keys sees every acknowledged key (issue #22).

A writer process fills two caches (string and integer keys, overwrites,
deletes, deadlines far away), and writes on while another process joins: the
joiner loads the state in bulk (`Mirror.restore`: new keys inserted without a
call per record, the rest through `apply`) and must end with exactly the
writer's acknowledged state. How fast it starts, and how long it holds its
loop, is measured by `python -m benchmarks.cache_scale`, not here.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .processes import reap
from .test_backends import REDIS_URL, needs_redis

# The writer's keys and what each must hold once it has acknowledged them. The
# joiner computes the same from the same numbers.
_STATE = """
    def expected(n, late):
        state = {}
        for j in range(n):
            if j % 13 == 5:
                continue  # deleted after its set
            value = {"id": j, "name": "x" * 40}
            if j % 10 == 3:
                value = {"id": j, "again": True}  # overwritten
            cache, key = ("other", j) if j % 7 == 0 else ("default", f"k{j}")
            state[(cache, key)] = value
        for j in range(late):
            state[("default", f"late{j}")] = j
        return state
"""

_WRITER = (
    _STATE
    + """
    import asyncio, json, sys
    from ivip_ipc_async import AsyncCache, AsyncIPC

    async def main() -> None:
        where, namespace, n, late = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        options = {"snapshot_interval": 0.2} if "://" not in where else {}
        async with AsyncIPC(where, namespace=namespace, **options) as ipc:
            caches = {"default": AsyncCache(ipc), "other": AsyncCache(ipc, name="other")}

            def target(j):
                return (caches["other"], j) if j % 7 == 0 else (caches["default"], f"k{j}")

            for first in range(0, n, 1000):
                js = range(first, min(n, first + 1000))
                await asyncio.gather(*(
                    target(j)[0].set(target(j)[1], {"id": j, "name": "x" * 40},
                                     3600 if j % 4 == 1 else 0)
                    for j in js
                ))
                await asyncio.gather(*(
                    target(j)[0].set(target(j)[1], {"id": j, "again": True}, 0)
                    for j in js if j % 10 == 3
                ))
                await asyncio.gather(*(
                    target(j)[0].delete(target(j)[1]) for j in js if j % 13 == 5
                ))
            stats = ipc.stats()
            if "snapshots_written" in stats:  # a snapshot of (nearly) all, the rest in the log
                seen = stats["snapshots_written"]
                while ipc.stats()["snapshots_written"] <= seen:
                    await asyncio.sleep(0.05)
            print(json.dumps({"filled": n}), flush=True)
            await asyncio.to_thread(sys.stdin.readline)  # the joiner is starting
            for j in range(late):  # written while it starts
                await caches["default"].set(f"late{j}", j, 0)
                if j % 50 == 0:
                    await asyncio.sleep(0.001)
            await caches["default"].set("late-done", True, 0)
            print(json.dumps({"late": late}), flush=True)
            await asyncio.to_thread(sys.stdin.readline)

    asyncio.run(main())
"""
)

_JOINER = (
    _STATE
    + """
    import asyncio, json, sys, time
    from ivip_ipc_async import AsyncCache, AsyncIPC

    async def main() -> None:
        where, namespace, n, late = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        async with AsyncIPC(where, namespace=namespace) as ipc:
            print(json.dumps({"started": True}), flush=True)
            caches = {"default": AsyncCache(ipc), "other": AsyncCache(ipc, name="other")}
            deadline = time.monotonic() + 30
            while not await caches["default"].get("late-done"):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
            want = expected(n, late)
            got = {}
            for name, cache in caches.items():
                for key in await cache.keys():
                    if key != "late-done":
                        got[(name, key)] = await cache.get(key)
            missing = [repr(k) for k in want if k not in got][:10]
            extra = [repr(k) for k in got if k not in want][:10]
            wrong = [repr(k) for k in want if k in got and got[k] != want[k]][:10]
            print(json.dumps({
                "keys": len(got), "want": len(want), "missing": missing, "extra": extra,
                "wrong": wrong, "entries": ipc.mirror.count(),
            }), flush=True)

    asyncio.run(main())
"""
)


async def _line(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, object]:
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), timeout)
    assert raw, f"the process ended (exit {await proc.wait()})"
    out: dict[str, object] = json.loads(raw)
    return out


async def _spawn(code: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(code),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


@pytest.fixture(params=["directory", pytest.param("redis", marks=needs_redis)])
async def where(request: pytest.FixtureRequest, ipc_dir: Path) -> AsyncIterator[tuple[str, str]]:
    """(path or Redis URL, namespace); a Redis namespace's keys deleted afterwards."""
    namespace = f"scale-{uuid.uuid4().hex[:12]}"
    if request.param == "directory":
        yield str(ipc_dir), namespace
        return
    yield REDIS_URL, namespace
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    keys = await client.keys(f"ivip:{{{namespace}}}:*")
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_a_late_joiner_of_many_keys_has_every_acknowledged_key(
    where: tuple[str, str],
) -> None:
    path, namespace = where
    n = 30_000 if "://" not in path else 6_000
    late = 500
    args = (path, namespace, str(n), str(late))
    writer = await _spawn(_WRITER, *args)
    joiner = None
    try:
        assert await _line(writer, 60) == {"filled": n}
        joiner = await _spawn(_JOINER, *args)
        assert writer.stdin is not None
        writer.stdin.write(b"go\n")  # writes on while the joiner starts
        await writer.stdin.drain()
        assert await _line(joiner, 60) == {"started": True}
        assert await _line(writer, 60) == {"late": late}
        got = await _line(joiner, 60)
        assert got["missing"] == got["extra"] == got["wrong"] == []
        assert got["keys"] == got["want"]
    finally:
        for proc in (joiner, writer):
            if proc is not None:
                await reap(proc)
