"""Helpers of the Redis tests: killing this test's own connections, another
process that writes, the server's version, markers and parameters."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncIPC

from ..redis_server import REDIS_SERVER
from ..test_backends import REDIS_URL

needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None, reason="no redis-server binary to start a private server"
)
PROTOCOLS = [pytest.param(2, id="resp2"), pytest.param(3, id="resp3")]


def _stream(namespace: str) -> str:
    return f"ivip:{{{namespace}}}:log"


async def _kill_clients(namespace: str) -> list[str]:
    """CLIENT KILL every connection of the instances of `namespace`; their names."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(REDIS_URL)
    killed: list[str] = []
    for client in await admin.client_list():
        name = client.get("name", "")
        mine = name.startswith(f"ivip:{namespace}:")
        if mine and await admin.execute_command("CLIENT", "KILL", "ID", client["id"]):
            killed.append(name)
    await admin.aclose()
    return killed


async def _skip_before_redis_7() -> None:
    if await _server_major() < 7:
        pytest.skip("counting lost entries needs XINFO entries-added (Redis 7+)")


async def _server_major() -> int:
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(REDIS_URL)
    version = (await admin.info("server"))["redis_version"]
    await admin.aclose()
    return int(str(version).split(".")[0])


async def _kill_listener(ipc: AsyncIPC) -> None:
    """CLIENT KILL the subscription connection of one instance."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(REDIS_URL)
    listener = f"ivip:{ipc.stats()['namespace']}:{ipc.stats()['peer']}:r"
    killed = [
        await admin.execute_command("CLIENT", "KILL", "ID", client["id"])
        for client in await admin.client_list()
        if client.get("name") == listener
    ]
    await admin.aclose()
    assert killed == [1]


def _another_process_writes(
    namespace: str, messages: int, cache_set: bool = False, pad: int = 0, url: str = ""
) -> None:
    """A separate process notifies `x` 0..messages-1 (with `pad` bytes each, when
    given, as `[i, "xx..."]`) after setting the cache key `missed` when
    `cache_set`, then exits. Blocks: called from a stuck handler."""
    script = (
        "import asyncio, sys\n"
        "from ivip_ipc_async import AsyncCache, AsyncIPC\n"
        "async def main():\n"
        "    async with AsyncIPC(sys.argv[1], namespace=sys.argv[2]) as ipc:\n"
        "        if sys.argv[4] == '1':\n"
        "            await AsyncCache(ipc).set('missed', 'while stuck', 0)\n"
        "        pad = int(sys.argv[5])\n"
        "        for i in range(int(sys.argv[3])):\n"
        "            await ipc.notify('x', [i, 'x' * pad] if pad else i)\n"
        "asyncio.run(main())\n"
    )
    args = [url or REDIS_URL, namespace, str(messages), str(int(cache_set)), str(pad)]
    subprocess.run(
        [sys.executable, "-c", script, *args],
        check=True,
        timeout=30,
        cwd=Path(__file__).parent.parent.parent,
    )


def _mirror_keys(ipc: AsyncIPC) -> set[Any]:
    return set(ipc.mirror.live_keys("default"))


def loop_time() -> float:
    return asyncio.get_running_loop().time()
