"""A child process for tests/test_cache_atomic.py: runs one job on a cache.

    python tests/atomic_child.py <medium> <job> <json args>

`medium` is a directory, or `<redis url>#<namespace>`. The child starts, prints
`ready`, waits for a line on stdin (so that every child starts the job at
once), runs the job, printing one JSON line per result as it goes (flushed: a
line printed is a result the child had when it printed it), then `done` and,
once it reads another line, exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from ivip_ipc_async import AsyncCache, AsyncIPC


def say(item: Any) -> None:
    sys.stdout.write(json.dumps(item) + "\n")
    sys.stdout.flush()


async def job(cache: AsyncCache[Any], name: str, args: dict[str, Any]) -> None:
    me = os.getpid()
    if name == "add":  # each key: try to add our pid; report what we then read
        for key in args["keys"]:
            won = await cache.add(key, me)
            say({"key": key, "won": won, "seen": await cache.get(key)})
    elif name == "incr":  # `count` increments of one key, each result reported
        for _ in range(args["count"]):
            say(await cache.incr(args["key"], args.get("delta", 1), ttl=0))
    elif name == "cas":  # `count` read-modify-write loops of one key
        for _ in range(args["count"]):
            tries = 0
            while True:
                tries += 1
                value, version = await cache.get_with_version(args["key"], 0)
                if await cache.set(args["key"], value + 1, 0, if_version=version):
                    break
            say(tries)
    elif name == "set_many":
        await cache.set_many(args["items"], ttl=0)
        say("stored")
    elif name == "memo_invalidate":  # another process's memoized call, invalidated here

        async def never(*_: Any, **__: Any) -> None:
            raise AssertionError("not computed here")

        memoized = cache.memoize(args["name"], never)
        say(memoized.key(*args["args"], **args["kwargs"]))
        say(await memoized.invalidate(*args["args"], **args["kwargs"]))
    elif name == "read":  # until the keys hold the expected values (or the deadline)
        deadline = time.monotonic() + args.get("timeout", 10)
        while True:
            found = await cache.get_many(args["keys"])
            if found == args["expect"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        say({"found": found})
    else:
        raise SystemExit(f"unknown job {name}")


async def main() -> None:
    medium, name, raw = sys.argv[1], sys.argv[2], sys.argv[3]
    if "#" in medium:
        url, namespace = medium.split("#")
        ipc = AsyncIPC(url, namespace=namespace)
    else:
        ipc = AsyncIPC(medium)
    loop = asyncio.get_running_loop()
    async with ipc:
        cache: AsyncCache[Any] = AsyncCache(ipc, name="atomic")
        say("ready")
        await loop.run_in_executor(None, sys.stdin.readline)
        await job(cache, name, json.loads(raw))
        say("done")
        await loop.run_in_executor(None, sys.stdin.readline)


if __name__ == "__main__":
    asyncio.run(main())
