"""A joiner's load of the cache entries (backends/redis/state.py): it costs in
proportion to the namespace's entries, not to the database (its index, the set
`ivip:{ns}:ix`, not a SCAN of every key), loads every acknowledged key (and the
keys written during the load), prunes expired entries' index members, skips
and counts garbage, and loads completely a namespace written without an index
(the previous version's).

The entries are written by another process; SCAN calls are counted with `INFO
commandstats` on a private `redis-server` (tests/redis_server.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.records import encode_key

from ..redis_server import Server
from ..test_backends import needs_redis
from .support import PROTOCOLS, _mirror_keys, needs_redis_server

pytestmark = [needs_redis, needs_redis_server]

ROOT = Path(__file__).parent.parent.parent

# A writer in its own process: sets keys k{first}..k{first+count-1} (the ones
# below `ttl_below` with a 0.3 s TTL), deletes every tenth, and prints the keys
# it acknowledged as live at the end (one line, comma separated).
WRITER = """
import asyncio, sys
from ivip_ipc_async import AsyncCache, AsyncIPC
async def main():
    url, ns, first, count, ttl_below = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    async with AsyncIPC(url, namespace=ns) as ipc:
        cache = AsyncCache(ipc)
        live = set()
        for at in range(first, first + count, 500):
            batch = range(at, min(at + 500, first + count))
            await asyncio.gather(
                *(cache.set(f"k{j}", j, 0.3 if j < ttl_below else 0) for j in batch)
            )
            live.update(f"k{j}" for j in batch if j >= ttl_below)
            await asyncio.gather(*(cache.delete(f"k{j}") for j in batch if j % 10 == 0))
            live.difference_update(f"k{j}" for j in batch if j % 10 == 0)
            print("batch", flush=True)
    print(",".join(sorted(live)), flush=True)
asyncio.run(main())
"""


def _write(url: str, namespace: str, first: int, count: int, ttl_below: int = 0) -> set[str]:
    """Run the writer to its end; the keys it acknowledged as live."""
    done = subprocess.run(
        [sys.executable, "-c", WRITER, url, namespace, str(first), str(count), str(ttl_below)],
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    last = done.stdout.strip().splitlines()[-1]
    return set(last.split(",")) if last else set()


def _scans(admin: Any) -> int:
    return int(admin.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def _index(namespace: str) -> str:
    return f"ivip:{{{namespace}}}:ix"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_joiner_loads_every_key_without_scanning_the_database(
    server: Server, namespace: str, protocol: int
) -> None:
    """With 30,000 keys of another application in the database, a joiner loads
    exactly the 2,000 keys another process acknowledged, and its load sends no
    SCAN at all (before: one SCAN per 1,000 keys of the whole database)."""
    admin = server.admin()
    pipe = admin.pipeline(transaction=False)
    for j in range(30_000):
        pipe.set(f"other-app:{j}", "x")
    pipe.execute()
    live = _write(server.url, namespace, 0, 2_000)
    before = _scans(admin)
    async with AsyncIPC(server.url, namespace=namespace, protocol=protocol) as ipc:
        assert _mirror_keys(ipc) == live
    assert _scans(admin) - before <= 1  # (start's permission probe: SCAN 0 COUNT 1)
    admin.close()


async def test_keys_written_during_the_load_are_not_lost(
    server: Server, namespace: str, until: Any
) -> None:
    """A joiner starts while another process writes (sets and deletes): once the
    writer is done, the joiner holds exactly the keys it acknowledged."""
    before = _write(server.url, namespace, 0, 10_000)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, server.url, namespace, "10000", "10000", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "batch"  # writing: join now
        async with AsyncIPC(server.url, namespace=namespace) as ipc:
            last = writer.stdout.read().strip().splitlines()[-1]
            assert writer.wait(30) == 0
            live = before | set(last.split(","))
            await until(lambda: _mirror_keys(ipc) == live, timeout=10)
    finally:
        writer.kill()
        writer.wait()
        if writer.stdout is not None:
            writer.stdout.close()


async def test_expired_entries_and_garbage_in_the_index_are_skipped(
    server: Server, namespace: str, until: Any
) -> None:
    """Entries that expired leave members in the index: a load skips them and
    prunes them. Garbage (a member naming no entry, a key that is no hash, a
    hash with a garbage frame) is skipped and counted, never a crash."""
    admin = server.admin()
    live = _write(server.url, namespace, 0, 1_000, ttl_below=300)
    expired = {f"k{j}" for j in range(300) if j % 10}  # (the others: tombstones)
    prefix = f"ivip:{{{namespace}}}:c:"
    member = b"default\x00"
    assert admin.sismember(_index(namespace), member + encode_key("k1"))

    def gone() -> bool:
        return not any(admin.exists(prefix.encode() + member + encode_key(k)) for k in expired)

    await until(gone, timeout=5)
    admin.set(prefix + "default\x00" + "a-string", "x")  # WRONGTYPE for HGET
    admin.hset(prefix + "default\x00" + "garbage", "r", b"\x00" * 80)
    admin.sadd(_index(namespace), b"\xff\xfe no such entry", b"default\x00a-string")
    admin.sadd(_index(namespace), b"default\x00garbage")
    async with AsyncIPC(server.url, namespace=namespace) as ipc:
        assert _mirror_keys(ipc) == live
        assert ipc.stats()["garbage_bytes"] >= 80
        await AsyncCache(ipc).set("after", 1, 0)
        assert await AsyncCache(ipc).get("after") == 1
    members = admin.smembers(_index(namespace))
    assert not any(member + encode_key(k) in members for k in expired)  # pruned
    assert b"\xff\xfe no such entry" not in members
    admin.close()


@pytest.mark.parametrize("partial", [False, True], ids=["no-index", "partial-index"])
async def test_a_namespace_without_an_index_loads_completely(
    server: Server, namespace: str, partial: bool
) -> None:
    """A namespace written by the previous version has no index (here: deleted),
    or one that only the writes since made (not built from the entries): a
    joiner still loads every key (through a SCAN), and builds the index, so
    the next joiner needs no SCAN."""
    admin = server.admin()
    live = _write(server.url, namespace, 0, 3_000)
    admin.delete(_index(namespace))
    if partial:  # (what a process's writes make after the index was lost)
        admin.sadd(_index(namespace), b"default\x00" + encode_key("k1"))
    async with AsyncIPC(server.url, namespace=namespace) as ipc:
        assert _mirror_keys(ipc) == live
    before = _scans(admin)
    async with AsyncIPC(server.url, namespace=namespace) as ipc:
        assert _mirror_keys(ipc) == live
    assert _scans(admin) - before <= 1
    assert admin.pttl(_index(namespace)) > 0  # it expires with the namespace
    admin.close()
