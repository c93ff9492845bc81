"""Deployments that move the master: Sentinel, Cluster, restarts. Two processes
exchange messages and contend for a lock while the test breaks Redis under them:
no acknowledged message lost or heard twice, holdings exclusive with increasing
fences, no raw redis-py error."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC

from ..processes import reap
from ..redis_server import REDIS_SERVER, Cluster, SentinelGroup, Server
from .support import needs_redis_server

ROOT = Path(__file__).resolve().parents[2]

# Whole deployments of redis-server (Sentinels, a cluster): once per CI run.
pytestmark = pytest.mark.once_per_ci


async def _progress(folder: Path, name: str) -> tuple[int, int]:
    try:
        heard, held = (folder / f"{name}.progress").read_text().split()
        return int(heard), int(held)
    except (OSError, ValueError):
        return 0, 0


async def _until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.05)


async def run_peers(
    url: str, folder: Path, fault: Callable[[str], Any], namespace: str = ""
) -> tuple[Any, Any, float]:
    """Two failover peers on `url`; `fault(namespace)` once both exchange messages
    and hold the lock, then on until each heard 100 more messages and took the lock
    again. Their reports, and the seconds from the fault until both heard new
    messages."""
    namespace = namespace or f"test-{uuid.uuid4().hex[:12]}"
    names = ("a", "b")
    command = [sys.executable, "-m", "tests.redis_backend.failover_peer", url, namespace]
    procs = [
        await asyncio.create_subprocess_exec(
            *command, str(folder), name, other, cwd=ROOT, stdout=asyncio.subprocess.PIPE
        )
        for name, other in (names, names[::-1])
    ]
    try:

        async def both(heard: int, held: int) -> bool:
            marks = [await _progress(folder, n) for n in names]
            return all(h >= heard and k >= held for h, k in marks)

        await _until(lambda: both(100, 3), 30, "both peers exchange messages and hold the lock")
        before = [await _progress(folder, n) for n in names]
        await asyncio.get_running_loop().run_in_executor(None, fault, namespace)
        faulted = time.monotonic()

        async def moved() -> bool:
            marks = [await _progress(folder, n) for n in names]
            return all(m[0] > b[0] + 10 for m, b in zip(marks, before, strict=True))

        await _until(moved, 30, "both peers hear messages after the fault")
        recovery = time.monotonic() - faulted
        after = [await _progress(folder, n) for n in names]
        await _until(
            lambda: both(max(a[0] for a in after) + 100, max(a[1] for a in after) + 3),
            30,
            "both peers go on after the fault",
        )
        (folder / "stop").touch()
        outputs = await asyncio.wait_for(
            asyncio.gather(*(proc.communicate() for proc in procs)), 60
        )
    finally:
        for proc in procs:
            await reap(proc)
    a, b = (json.loads(out) for out, _ in outputs)
    return a, b, recovery


def check_reports(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Every acknowledged message heard once, in order (or a gap reported); holdings
    exclusive, fences increasing with time; no error but the library's; mirrors
    equal to each other and to the acknowledged cache writes."""
    for me, other in ((a, b), (b, a)):
        if not me["gaps"]:
            assert me["heard"] == list(range(other["acked"])), "lost, doubled or reordered"
        assert me["heard"] == sorted(set(me["heard"]))
    holdings = sorted(a["holdings"] + b["holdings"], key=lambda h: h[1])
    for first, second in itertools.pairwise(holdings):
        assert first[2] <= second[1], f"two holders at once: {first} {second}"
        assert first[0] < second[0], f"fence not increasing: {first} {second}"
    raw = [e for e in a["errors"] + b["errors"] if not e.startswith("ivip_ipc_async.")]
    assert raw == [], raw
    if not a["gaps"] and not b["gaps"]:
        # Both mirrors hold every acknowledged cache write's last value, and only that.
        assert a["mirror"] == b["mirror"] == {**a["sets"], **b["sets"]}


@needs_redis_server
async def test_sentinel_failover_under_load(tmp_path: Path) -> None:
    group = SentinelGroup()
    try:
        await asyncio.get_running_loop().run_in_executor(None, group.start)
        a, b, recovery = await run_peers(group.url(), tmp_path, lambda _: group.kill_master())
        assert group.master_port() == group.replica.port
    except BaseException:
        print(group.logs())
        raise
    finally:
        group.close()
    check_reports(a, b)
    print(f"sentinel failover: messages again after {recovery:.2f} s")


@needs_redis_server
async def test_sentinel_over_tls_failover_under_load(tmp_path: Path) -> None:
    """`rediss+sentinel://`: TLS to the Sentinels and to the master they name, with
    the URL's CA; the same failover as above. Without the CA, the Sentinels'
    certificate cannot be verified: reported at once, not retried."""
    from ivip_ipc_async.errors import BackendUnavailableError

    from ..redis_server import tls_files

    files = tls_files(tmp_path)
    if not files:
        pytest.skip("no openssl to make a certificate")
    group = SentinelGroup(tls=files)
    try:
        await asyncio.get_running_loop().run_in_executor(None, group.start)
        url = f"{group.url()}?ssl_ca_certs={files['ca.crt']}"
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BackendUnavailableError, match=r"(?i)certificate verify failed"):
            await AsyncIPC(group.url(), retry_timeout=10).start()
        assert loop.time() - started < 3
        folder = tmp_path / "peers"
        folder.mkdir()
        a, b, recovery = await run_peers(url, folder, lambda _: group.kill_master())
        assert group.master_port() == group.replica.tls_port
    except BaseException:
        print(group.logs())
        raise
    finally:
        group.close()
    check_reports(a, b)
    print(f"sentinel failover over TLS: messages again after {recovery:.2f} s")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Three masters with a replica each, on free ports."""
    if REDIS_SERVER is None or shutil.which("redis-cli") is None:
        pytest.skip("no redis-server and redis-cli to start a cluster")
    instance = Cluster()
    try:
        instance.start()
        yield instance
    finally:
        instance.close()


@needs_redis_server
async def test_cluster_through_any_node(cluster: Cluster) -> None:
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    elsewhere = cluster.other_master(namespace)
    sender = AsyncIPC(elsewhere.url, namespace=namespace)
    receiver = AsyncIPC(cluster.nodes[-1].url, namespace=namespace)  # (a replica, maybe)
    heard: list[int] = []
    receiver.on("m", heard.append)
    await receiver.start()
    await sender.start()
    try:
        for i in range(20):
            await sender.notify("m", i)
        async with sender.lock("l") as lock:
            assert lock.fence >= 1
        await AsyncCache(sender).set("k", 1)
        await _until(lambda: _done(heard, 20), 10, "all heard")
        assert heard == list(range(20))
        cache = AsyncCache(receiver)

        async def entry() -> bool:
            return await cache.get("k") == 1

        await _until(entry, 10, "the cache entry")
    finally:
        await sender.destroy()
        await receiver.destroy()


async def _done(items: list[Any], count: int) -> bool:
    return len([i for i in items if i is not None]) >= count


@needs_redis_server
async def test_cluster_failover_of_the_slot(cluster: Cluster, tmp_path: Path) -> None:
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    url = cluster.other_master(namespace).url
    a, b, recovery = await run_peers(
        url, tmp_path, lambda ns: cluster.kill(cluster.owner(ns)), namespace
    )
    check_reports(a, b)
    print(f"cluster failover: messages again after {recovery:.2f} s")


@needs_redis_server
async def test_cluster_resharding_of_the_slot(cluster: Cluster, tmp_path: Path) -> None:
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    url = cluster.owner(namespace).url
    target = cluster.other_master(namespace)
    a, b, recovery = await run_peers(
        url, tmp_path, lambda ns: cluster.migrate(ns, target), namespace
    )
    assert cluster.owner(namespace) is target
    check_reports(a, b)
    print(f"cluster resharding: messages again after {recovery:.2f} s")


@needs_redis_server
async def test_restart_during_locks_leadership_and_memoize(tmp_path: Path) -> None:
    """A restart of about a second, while 4 processes contend for a lock, a
    Leadership and memoize's single flight: every call rides it out (no error)."""
    server = Server()
    server.start()
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    names = [f"p{i}" for i in range(4)]
    command = [sys.executable, "-m", "tests.redis_backend.coordination_peer", server.url]
    procs = [
        await asyncio.create_subprocess_exec(
            *command, namespace, str(tmp_path), name, cwd=ROOT, stdout=asyncio.subprocess.PIPE
        )
        for name in names
    ]

    async def done() -> list[int]:
        return [int(t) if (t := _read(tmp_path / f"{name}.progress")) else 0 for name in names]

    def restart() -> None:
        server.stop()
        time.sleep(1.0)  # the outage itself
        server.start()

    try:

        async def busy(least: list[int]) -> bool:
            return all(d > m + 20 for d, m in zip(await done(), least, strict=True))

        await _until(lambda: busy([0] * 4), 30, "every process works")
        await asyncio.get_running_loop().run_in_executor(None, restart)
        after = await done()
        await _until(lambda: busy(after), 30, "every process works after the restart")
        (tmp_path / "stop").touch()
        outputs = await asyncio.wait_for(
            asyncio.gather(*(proc.communicate() for proc in procs)), 60
        )
    finally:
        for proc in procs:
            await reap(proc)
        server.close()
    errors = [e for out, _ in outputs for e in json.loads(out)]
    assert errors == []


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@needs_redis_server
async def test_sentinel_failover_to_a_replica_behind_is_a_gap(tmp_path: Path) -> None:
    """The replica frozen while acknowledged writes go on, then the master killed
    and the replica promoted: it lacks those writes. Every process reports a gap
    (never silent), and hears nothing twice nor out of order."""
    group = SentinelGroup()

    def heard() -> int:
        return sum(int((_read(tmp_path / f"{n}.progress").split() or ["0"])[0]) for n in "ab")

    def fault(_: str) -> None:
        import redis

        group.replica.freeze()
        # The link cut by the master too (what was in the replica's socket buffer
        # would still reach it after the freeze).
        with redis.Redis(port=group.master.port) as master:
            master.execute_command("CLIENT", "KILL", "TYPE", "replica")
        start = heard()
        deadline = time.monotonic() + 10
        while heard() < start + 40:  # acknowledged, pushed, and not replicated
            assert time.monotonic() < deadline
            time.sleep(0.01)
        group.kill_master()
        group.replica.thaw()

    try:
        await asyncio.get_running_loop().run_in_executor(None, group.start)
        a, b, _ = await run_peers(group.url(), tmp_path, fault)
        assert group.master_port() == group.replica.port
    except BaseException:
        print(group.logs())
        raise
    finally:
        group.replica.thaw()
        group.close()
    for report in (a, b):
        assert report["gaps"], "a failover that lost acknowledged writes went unreported"
        print("gaps reported:", report["gaps"])
        assert report["heard"] == sorted(set(report["heard"]))
    raw = [e for e in a["errors"] + b["errors"] if not e.startswith("ivip_ipc_async.")]
    assert raw == [], raw
