"""add, incr, the versioned write and the bulk operations, across real OS processes,
on the directory and on Redis (the `medium` fixture of test_backends.py)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC

from .processes import reap
from .test_backends import Make, make, medium  # noqa: F401 - the parametrized fixtures

CHILD = str(Path(__file__).with_name("atomic_child.py"))
PROCESSES = 4


class Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[Any] = []

    async def line(self, timeout: float = 30) -> Any:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            raise EOFError(f"child {self.proc.pid} exited ({await self.proc.wait()})")
        return json.loads(raw)

    def send(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    async def results(self) -> list[Any]:
        """Every line up to `done`."""
        while (item := await self.line()) != "done":
            self.lines.append(item)
        return self.lines


async def run_children(where: str, jobs: list[tuple[str, dict[str, Any]]]) -> list[list[Any]]:
    """Start one child per job, start them together, return each one's results."""
    children: list[Child] = []
    try:
        for name, args in jobs:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                CHILD,
                where,
                name,
                json.dumps(args),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            children.append(Child(proc))
        for child in children:
            assert await child.line() == "ready"
        for child in children:
            child.send()
        results = [await child.results() for child in children]
        for child in children:
            child.send()
            await asyncio.wait_for(child.proc.wait(), 10)
        return results
    finally:
        for child in children:
            await reap(child.proc)


async def test_add_has_exactly_one_winner_and_everyone_sees_it(medium: str) -> None:  # noqa: F811
    keys = [f"job:{i}" for i in range(40)]
    results = await run_children(medium, [("add", {"keys": keys})] * PROCESSES)
    for key in keys:
        tries = [item for lines in results for item in lines if item["key"] == key]
        winners = [item for item in tries if item["won"]]
        assert len(tries) == PROCESSES
        assert len(winners) == 1, (key, tries)
        # Every process, when its add returned, read the winner's value.
        assert {item["seen"] for item in tries} == {winners[0]["seen"]}, (key, tries)


async def test_incr_from_processes_counts_every_increment_once(medium: str) -> None:  # noqa: F811
    count = 150
    results = await run_children(medium, [("incr", {"key": "hits", "count": count})] * PROCESSES)
    returned = [value for lines in results for value in lines]
    # Each increment got its own result: 1 .. N x M, each exactly once.
    assert sorted(returned) == list(range(1, PROCESSES * count + 1))
    for lines in results:
        assert lines == sorted(lines)  # each process's own results only grow
    check = await run_children(
        medium, [("read", {"keys": ["hits"], "expect": {"hits": PROCESSES * count}})]
    )
    assert check == [[{"found": {"hits": PROCESSES * count}}]]


async def test_decr_and_mixed_deltas_sum_exactly(medium: str) -> None:  # noqa: F811
    jobs = [("incr", {"key": "stock", "count": 100, "delta": d}) for d in (5, -3, 7, -2)]
    await run_children(medium, jobs)
    total = 100 * (5 - 3 + 7 - 2)
    check = await run_children(medium, [("read", {"keys": ["stock"], "expect": {"stock": total}})])
    assert check == [[{"found": {"stock": total}}]]


async def test_versioned_write_loses_no_update(medium: str) -> None:  # noqa: F811
    count = 60
    results = await run_children(medium, [("cas", {"key": "balance", "count": count})] * 4)
    total = 4 * count
    check = await run_children(
        medium, [("read", {"keys": ["balance"], "expect": {"balance": total}})]
    )
    assert check == [[{"found": {"balance": total}}]]
    # Refusals happened (else the race was not exercised) and were retried.
    assert sum(tries for lines in results for tries in lines) >= total


async def test_bulk_operations_reach_other_processes(make: Make, medium: str) -> None:  # noqa: F811
    items = {f"user:{i}": {"id": i} for i in range(50)} | {"order:1": 1}
    await run_children(medium, [("set_many", {"items": items})])
    ipc: AsyncIPC = await make().start()
    cache: AsyncCache[Any] = AsyncCache(ipc, name="atomic")
    assert await cache.get_many([*items, "absent"]) == items
    before = ipc.stats()
    assert await cache.delete_prefix("user:") == 50
    assert await cache.delete_many(["order:1", "absent"]) == 1
    if "#" not in medium:  # one write each (one BATCH frame: all or none is read)
        assert ipc.stats()["batches_written"] - before["batches_written"] == 2
    check = await run_children(medium, [("read", {"keys": list(items), "expect": {}})])
    assert check == [[{"found": {}}]]


async def test_atomic_operations_in_one_process(make: Make) -> None:  # noqa: F811
    ipc: AsyncIPC = await make().start()
    cache: AsyncCache[Any] = AsyncCache(ipc)
    # Concurrent tasks of one process: the same promises.
    wins = await asyncio.gather(*(cache.add("k", i) for i in range(20)))
    assert Counter(wins) == {True: 1, False: 19}
    assert await cache.get("k") == wins.index(True)
    values = await asyncio.gather(*(cache.incr("n") for _ in range(50)))
    assert sorted(values) == list(range(1, 51))
    await cache.set("text", "abc")
    with pytest.raises(TypeError):
        await cache.incr("text")
    with pytest.raises(TypeError):
        await cache.incr("n", 1.5)  # type: ignore[arg-type]
    await cache.set("big", 2**53 - 1)
    with pytest.raises(OverflowError):
        await cache.incr("big")
    assert await cache.get("big") == 2**53 - 1  # nothing stored
    # An expired key is absent for add, incr and the versioned write.
    await cache.set("gone", 1, 0.05)
    _, version = await cache.get_with_version("gone")
    assert version is not None
    await asyncio.sleep(0.1)
    assert await cache.get_with_version("gone") == (None, None)
    assert not await cache.set("gone", 2, if_version=version)
    assert await cache.set("gone", 3, if_version=None)
    assert await cache.add("gone", 4) is False
    # incr keeps an existing key's expiry; a key it creates gets the ttl.
    await cache.set("ttl", 1, 60)
    await cache.incr("ttl")
    entry = ipc.mirror.lookup("default", "ttl")
    assert entry is not None
    assert entry.record.expires > 0
    await cache.incr("forever", ttl=0)
    entry = ipc.mirror.lookup("default", "forever")
    assert entry is not None
    assert entry.record.expires == 0
    stats = cache.stats()
    assert min(stats["hits"], stats["misses"], stats["expired"]) >= 1


async def test_memoize_key_and_invalidate_from_another_process(
    make: Make,  # noqa: F811
    medium: str,  # noqa: F811
    until: Any,
) -> None:
    ipc: AsyncIPC = await make().start()
    cache: AsyncCache[Any] = AsyncCache(ipc, name="atomic")
    calls: list[int] = []

    @cache.memoize("price", ttl=60)
    async def price(item: int, *, currency: str = "EUR") -> dict[str, Any]:
        calls.append(item)
        return {"item": item, "currency": currency, "n": len(calls)}

    assert (await price(7, currency="USD"))["n"] == 1
    assert (await price(7, currency="USD"))["n"] == 1  # cached
    key = price.key(7, currency="USD")
    assert key == 'price:[[7],{"currency":"USD"}]'
    assert await cache.keys() == [key]  # the key the call used
    args = {"name": "price", "args": [7], "kwargs": {"currency": "USD"}}
    (got,) = await run_children(medium, [("memo_invalidate", args)])
    assert got == [key, True]
    await until(lambda: key not in cache.ipc.mirror.live_keys("atomic"), timeout=10)
    assert (await price(7, currency="USD"))["n"] == 2  # computed again
    assert await price.invalidate(7, currency="USD") is True
    assert await price.invalidate(7, currency="USD") is False
    # The function form has them too.
    fetch = cache.memoize("fetch", price.__wrapped__, 60)  # type: ignore[attr-defined]
    assert fetch.key(1) == "fetch:[[1],{}]"
    assert await fetch.invalidate(1) is False


async def test_incr_with_a_process_killed_mid_way_loses_only_its_unacknowledged(
    medium: str,  # noqa: F811
) -> None:
    """One of two incrementing processes is killed (SIGKILL) mid-way: the other
    is never blocked (the directory's bucket lock dies with its holder), and the
    count is what both were told, plus at most the one increment the killed
    process had under way."""
    victim = await asyncio.create_subprocess_exec(
        sys.executable,
        CHILD,
        medium,
        "incr",
        json.dumps({"key": "n", "count": 1_000_000}),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    killed = Child(victim)
    try:
        assert await killed.line() == "ready"
        killed.send()
        told = 0
        while told < 100:  # its acknowledged increments so far
            await killed.line()
            told += 1
        survivor_task = asyncio.ensure_future(
            run_children(medium, [("incr", {"key": "n", "count": 200})])
        )
        await asyncio.sleep(0.2)  # (the survivor starts; correctness does not depend on it)
        victim.kill()
        assert victim.stdout is not None
        rest = await asyncio.wait_for(victim.stdout.read(), 10)
        told += len(rest.splitlines())  # lines it printed before it died
        (survivor,) = await asyncio.wait_for(survivor_task, 60)
    finally:
        await reap(victim)
    assert survivor == sorted(survivor)
    final = await run_children(medium, [("read", {"keys": ["n"], "expect": {"n": told + 200}})])
    count = final[0][0]["found"]["n"]
    assert told + 200 <= count <= told + 201, (told, count)


async def test_set_many_past_the_record_size_goes_out_in_parts(make: Make) -> None:  # noqa: F811
    """More than `max_record_size` in all: several batches, every key stored,
    seen by another instance (a batch over the limit would be unreadable)."""
    a, b = await make(max_record_size=4096).start(), await make(max_record_size=4096).start()
    cache: AsyncCache[Any] = AsyncCache(a)
    items = {f"k{i}": "x" * 500 for i in range(40)}  # about 22 KB
    await cache.set_many(items)
    other: AsyncCache[Any] = AsyncCache(b)
    deadline = asyncio.get_running_loop().time() + 10
    while await other.get_many(items) != items:
        assert asyncio.get_running_loop().time() < deadline, len(await other.get_many(items))
        await asyncio.sleep(0.01)
    # Read as records, not skipped as garbage (and then learnt from a snapshot).
    assert b.stats().get("garbage_bytes", 0) == 0
    assert await cache.delete_many(items) == 40
