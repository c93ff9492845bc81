"""Locks, leaderships, run_once and memoize across real processes, on both backends.

Every test runs on the directory and on Redis through the `medium` fixture of
tests/test_backends.py (Redis tests skip when no server answers). The other
processes are `python -c AGENT` children driven by lines on their stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, Leadership, Lock, reset_run_once, run_once

from .processes import reap
from .test_backends import Make, make, medium  # noqa: F401 - the parametrized fixtures

AGENT = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from ivip_ipc_async import AsyncCache, AsyncIPC
    from ivip_ipc_async import Leadership, run_once

    medium, lease = sys.argv[1], float(sys.argv[2])

    def make():
        if "#" in medium:
            url, namespace = medium.split("#")
            return AsyncIPC(url, namespace=namespace)
        return AsyncIPC(medium)

    def say(**fields):  # one write per line: a forked child writes to the same pipe
        os.write(1, json.dumps(fields).encode() + b"\\n")

    def append(path, line):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, (line + "\\n").encode())
        os.close(fd)

    async def main():
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        async with make() as ipc:
            lock = ipc.lock("shared", lease=lease, poll_interval=30)
            cache = AsyncCache(ipc, name="memo")

            @cache.memoize("slow", ttl=60, lease=lease)
            async def slow(seconds, log):
                append(log, f"compute {os.getpid()}")
                await asyncio.sleep(seconds)
                return {"by": os.getpid()}

            say(ready=os.getpid())
            while line := await stdin.readline():
                cmd = json.loads(line)
                op = cmd["op"]
                if op == "acquire":
                    await lock.acquire()
                    say(held=lock.held, fence=lock.fence)
                elif op == "check":  # local knowledge only: no round trip
                    say(held=lock.held, fence=lock.fence)
                elif op == "verify":
                    say(verified=await lock.verify(), held=lock.held)
                elif op == "release":
                    await lock.release()
                    say(released=True)
                elif op == "contend":  # rounds of: acquire, prove exclusivity, release
                    for _ in range(cmd["rounds"]):
                        async with ipc.lock("shared", lease=lease, timeout=30) as held:
                            inside = cmd["path"] + ".inside"
                            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                            await asyncio.sleep(0.001)
                            os.close(fd)
                            os.unlink(inside)
                            append(cmd["path"], f"{os.getpid()} {held.fence}")
                    say(done=True)
                elif op == "fork":
                    pid = os.fork()
                    if pid == 0:  # the child: the lock is not its to hold
                        say(child=os.getpid(), held=lock.held)
                        time.sleep(60)
                        os._exit(0)
                    say(forked=pid)
                elif op == "lead":  # wait to lead, say so, lead until killed
                    leadership = Leadership(ipc, "scheduler", poll_interval=30, lease=lease)
                    await leadership.acquire()
                    say(leader=os.getpid(), fence=leadership.fence)
                elif op == "run_once":
                    async def job():
                        append(cmd["path"], f"job {os.getpid()}")
                        gate = cmd.get("gate")  # the job ends only once this file exists
                        while gate and not os.path.exists(gate):
                            await asyncio.sleep(0.01)
                        await asyncio.sleep(cmd["seconds"])
                    more = {"generation": cmd["generation"]} if "generation" in cmd else {}
                    if cmd.get("announce"):  # the call begins now
                        say(calling=os.getpid())
                    ran = await run_once(
                        ipc, "start-up", job, poll_interval=30, lease=lease, **more
                    )
                    say(ran=ran)
                    if cmd.get("exit"):  # a one-shot script: done, it exits
                        break
                elif op == "exit":  # a clean exit: the AsyncIPC lets go of everything
                    break
                elif op == "memo":
                    results = await asyncio.gather(
                        *(slow(cmd["seconds"], cmd["path"]) for _ in range(cmd["calls"]))
                    )
                    say(results=results)

    asyncio.run(main())
    """
)


class Agent:
    """A child process running AGENT on the test's medium."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    async def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.proc.stdin.drain()

    async def read(self, timeout: float = 20) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert line, "the agent exited"
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, timeout: float = 20, **cmd: Any) -> dict[str, Any]:
        await self.send(**cmd)
        return await self.read(timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # dead, not yet reaped
                os.kill(self.pid, sig)


@pytest.fixture
async def agents(medium: str) -> AsyncIterator[Any]:  # noqa: F811
    """`await agents(n, lease=...)`: n started agent processes, killed afterwards."""
    started: list[Agent] = []

    async def spawn(n: int = 1, lease: float = 1.0) -> list[Agent]:
        new = [
            Agent(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    AGENT,
                    medium,
                    str(lease),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
            for _ in range(n)
        ]
        started.extend(new)
        for agent in new:
            assert "ready" in await agent.read()
        return new

    yield spawn
    for agent in started:
        if agent.proc.returncode is None:
            agent.kill(signal.SIGCONT)
        await reap(agent.proc)


def is_redis(medium: str) -> bool:  # noqa: F811
    return "#" in medium


def takeover(medium: str, lease: float = 1.0) -> float:  # noqa: F811
    """Seconds within which a dead holder's lock must be taken over: at once on the
    directory (1 s allows for a loaded machine; the waiters' timer is 30 s), within
    the lease on Redis."""
    return lease + 1.0 if is_redis(medium) else 1.0


# -- the lock --------------------------------------------------------------------------------


async def test_lock_is_exclusive_under_contention_from_several_processes(
    agents: Any,
    tmp_path: Path,
) -> None:
    crowd = await agents(4, lease=5.0)
    path = str(tmp_path / "rounds")
    for agent in crowd:
        await agent.send(op="contend", rounds=15, path=path)
    for agent in crowd:
        assert await agent.read(timeout=60) == {"done": True}  # no O_EXCL clash: no crash
    lines = Path(path).read_text().splitlines()
    assert len(lines) == 60
    assert {int(line.split()[0]) for line in lines} == {a.pid for a in crowd}
    fences = [int(line.split()[1]) for line in lines]
    assert fences == sorted(fences)
    assert len(set(fences)) == 60


async def test_a_waiter_is_woken_by_the_release_not_by_its_timer(
    make: Make,  # noqa: F811
    agents: Any,
) -> None:
    (holder,) = await agents(1, lease=5.0)
    assert (await holder.ask(op="acquire"))["held"]
    ipc = await make().start()
    lock = ipc.lock("shared", poll_interval=30, lease=5)  # the timer alone would take 30 s
    waiting = asyncio.ensure_future(lock.acquire(timeout=20))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    started = time.monotonic()
    assert await holder.ask(op="release") == {"released": True}
    await waiting
    assert time.monotonic() - started < 2
    assert lock.held
    await lock.release()


async def test_kill_9_of_the_holder_frees_the_lock(
    medium: str,  # noqa: F811
    make: Make,  # noqa: F811
    agents: Any,
) -> None:
    (holder,) = await agents(1, lease=1.0)
    first = await holder.ask(op="acquire")
    ipc = await make().start()
    lock = ipc.lock("shared", lease=1.0, poll_interval=30)
    assert not await lock.try_acquire()
    holder.kill()
    killed = time.monotonic()
    await lock.acquire(timeout=10)
    took = time.monotonic() - killed
    # Directory: the kernel released it at death. Redis: within the lease.
    assert took < takeover(medium)
    assert lock.fence > first["fence"]
    await lock.release()


async def test_cancelled_while_waiting_holds_nothing(make: Make) -> None:  # noqa: F811
    one, two = await make().start(), await make().start()
    holder = one.lock("cancel")
    await holder.acquire()
    waiter = two.lock("cancel", poll_interval=0.05)
    task = asyncio.ensure_future(waiter.acquire())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not waiter.held
    await holder.release()
    third = two.lock("cancel")
    assert await third.try_acquire()  # the cancelled waiter left nothing behind
    await third.release()


async def test_timeout_raises_and_holds_nothing(make: Make) -> None:  # noqa: F811
    one, two = await make().start(), await make().start()
    async with one.lock("t"):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with two.lock("t", timeout=0.3):
                pytest.fail("entered a held lock")
        assert 0.25 < time.monotonic() - started < 3
    async with two.lock("t", timeout=5) as lock:
        assert lock.held


async def test_a_forked_child_of_the_holder_does_not_hold_the_lock(
    medium: str,  # noqa: F811
    make: Make,  # noqa: F811
    agents: Any,
) -> None:
    (holder,) = await agents(1, lease=1.0)
    await holder.ask(op="acquire")
    await holder.send(op="fork")
    answers = [await holder.read(), await holder.read()]  # the child's and the parent's
    child = next(a for a in answers if "child" in a)
    assert child["held"] is False
    try:
        holder.kill()  # the parent dies; its child lives on (and keeps the pipes open)
        ipc = await make().start()
        lock = ipc.lock("shared", lease=1.0, poll_interval=30)
        killed = time.monotonic()
        await lock.acquire(timeout=10)  # the child's copies did not keep the lock
        assert time.monotonic() - killed < takeover(medium)
        await lock.release()
    finally:
        os.kill(child["child"], signal.SIGKILL)


async def test_a_paused_holder_loses_its_lease_and_its_fence_tells_it(
    medium: str,  # noqa: F811
    make: Make,  # noqa: F811
    agents: Any,
) -> None:
    if not is_redis(medium):
        pytest.skip("the directory's kernel lock has no lease: a paused holder keeps it")
    (holder,) = await agents(1, lease=1.0)
    old = await holder.ask(op="acquire")
    holder.kill(signal.SIGSTOP)
    ipc = await make().start()
    lock = ipc.lock("shared", lease=5.0, poll_interval=30)
    stopped = time.monotonic()
    await lock.acquire(timeout=10)
    assert time.monotonic() - stopped < takeover(medium)  # the lease ran out
    assert lock.fence > old["fence"]
    holder.kill(signal.SIGCONT)
    now = await holder.ask(op="check")
    assert now == {"held": False, "fence": old["fence"]}  # knows without asking Redis
    assert (await holder.ask(op="verify"))["verified"] is False
    assert await holder.ask(op="release") == {"released": True}  # compare-and-delete
    assert lock.held
    assert await lock.verify()
    await lock.release()


async def test_a_lock_held_when_the_ipc_is_destroyed_is_released(make: Make) -> None:  # noqa: F811
    one, two = make(), await make().start()
    lock = one.lock("bye")
    await lock.acquire()
    await one.destroy()
    async with two.lock("bye", timeout=3, poll_interval=0.05):
        pass


async def test_bad_lock_arguments_are_refused(make: Make) -> None:  # noqa: F811
    ipc = make()
    with pytest.raises(ValueError, match="invalid lock name"):
        ipc.lock("../etc")
    with pytest.raises(ValueError, match="invalid lock name"):
        ipc.lock("")
    with pytest.raises(ValueError, match="lease"):
        ipc.lock("x", lease=0)
    with pytest.raises(ValueError, match="poll_interval"):
        ipc.lock("x", poll_interval=-1)
    with pytest.raises(ValueError, match="timeout"):
        ipc.lock("x", timeout=-1)
    lock = ipc.lock("x")
    await lock.acquire()
    with pytest.raises(RuntimeError, match="held already"):
        await lock.acquire()
    await lock.release()
    assert isinstance(lock, Lock)


# -- leadership and run_once --------------------------------------------------------------------


async def test_leadership_is_handed_over_when_the_leader_dies(
    medium: str,  # noqa: F811
    agents: Any,
) -> None:
    crowd = await agents(3, lease=1.0)
    for agent in crowd:
        await agent.send(op="lead")
    reads = {asyncio.ensure_future(a.read(timeout=30)): a for a in crowd}
    done, _ = await asyncio.wait(reads, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1  # exactly one leads
    fut = done.pop()
    first = reads.pop(fut)
    first_fence = fut.result()["fence"]
    first.kill()
    killed = time.monotonic()
    done, _ = await asyncio.wait(reads, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1  # one follower took over
    assert time.monotonic() - killed < takeover(medium)
    answer = done.pop().result()
    assert answer["fence"] > first_fence
    for pending in reads:
        pending.cancel()
    await asyncio.gather(*reads, return_exceptions=True)


async def test_leadership_in_process(make: Make) -> None:  # noqa: F811
    ipc = await make().start()
    first, second = Leadership(ipc, "jobs"), Leadership(ipc, "jobs", poll_interval=30)
    assert await first.try_acquire()
    assert first.held
    assert not await second.try_acquire()
    waiting = asyncio.ensure_future(second.acquire(timeout=5))
    await asyncio.sleep(0.05)
    await first.release()
    await waiting  # woken by the release, not by the 30 s timer
    assert second.held
    assert not first.held
    assert second.fence > 0
    async with Leadership(ipc, "other") as other:
        assert other.held
    assert not other.held
    await second.release()


async def test_run_once_runs_the_job_once_across_processes(agents: Any, tmp_path: Path) -> None:
    crowd = await agents(4, lease=2.0)
    path = str(tmp_path / "jobs")
    for agent in crowd:
        await agent.send(op="run_once", path=path, seconds=0.3)
    answers = [await agent.read(timeout=30) for agent in crowd]
    assert sorted(a["ran"] for a in answers) == [False, False, False, True]
    assert len(Path(path).read_text().splitlines()) == 1
    (late,) = await agents(1, lease=2.0)  # a worker that starts later: done already
    assert await late.ask(op="run_once", path=path, seconds=0) == {"ran": False}
    assert len(Path(path).read_text().splitlines()) == 1


async def test_run_once_is_taken_over_when_the_leader_dies_mid_job(
    agents: Any, tmp_path: Path
) -> None:
    path = tmp_path / "jobs"
    (leader,) = await agents(1, lease=1.0)
    await leader.send(op="run_once", path=str(path), seconds=60)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not (path.exists() and path.read_text()):
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    (follower,) = await agents(1, lease=1.0)
    await follower.send(op="run_once", path=str(path), seconds=0)
    leader.kill()
    assert await follower.read(timeout=20) == {"ran": True}
    assert [line.split()[0] for line in path.read_text().splitlines()] == ["job", "job"]


@pytest.mark.parametrize("generation", [None, "v1"])
async def test_run_once_is_not_run_again_when_its_leader_exits_after_the_job(
    agents: Any, tmp_path: Path, generation: str | None
) -> None:
    """Issue #20, item 2: a one-shot leader exits right after its job; the
    processes that waited during the job must not run it again, by default
    (once per start-up of the fleet) as with a generation; with a generation,
    nor may one that comes later."""
    path, gate = tmp_path / "jobs", tmp_path / "gate"
    more = {} if generation is None else {"generation": generation}
    leader, *waiters = await agents(3, lease=2.0)
    # The leader's job runs until the waiters' calls have begun (the gate).
    await leader.send(op="run_once", path=str(path), gate=str(gate), seconds=0, exit=True, **more)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not (path.exists() and path.read_text()):
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    for waiter in waiters:
        await waiter.send(op="run_once", path=str(path), seconds=0, announce=True, **more)
        assert (await waiter.read(timeout=20)).keys() == {"calling"}
    gate.touch()
    assert await leader.read(timeout=20) == {"ran": True}
    async with asyncio.timeout(20):
        assert await leader.proc.wait() == 0  # gone, and its lock with it
    assert [await waiter.read(timeout=20) for waiter in waiters] == [{"ran": False}] * 2
    assert len(path.read_text().splitlines()) == 1
    if generation is None:
        return  # a later caller finds no living leader: see the fleet test below
    (late,) = await agents(1, lease=2.0)
    assert await late.ask(op="run_once", path=str(path), seconds=0, **more) == {"ran": False}
    assert len(path.read_text().splitlines()) == 1
    # A new generation runs it once more, in one process only.
    for agent in (*waiters, late):
        await agent.send(op="run_once", path=str(path), seconds=0.2, generation="v2")
    answers = [await agent.read(timeout=20) for agent in (*waiters, late)]
    assert sorted(a["ran"] for a in answers) == [False, False, True]
    assert len(path.read_text().splitlines()) == 2


@pytest.mark.parametrize("generation", [None, "v1"])
async def test_run_once_when_the_whole_fleet_restarts(
    agents: Any, tmp_path: Path, generation: str | None
) -> None:
    """By default a job runs once per start-up of the fleet: a worker that
    starts while the leader lives returns False at once; once every process
    has exited, the next start-up runs it again. With a generation, never
    again for that generation."""
    path = tmp_path / "jobs"
    more = {} if generation is None else {"generation": generation}
    fleet = await agents(3, lease=2.0)
    for agent in fleet:
        await agent.send(op="run_once", path=str(path), seconds=0.3, **more)
    answers = [await agent.read(timeout=20) for agent in fleet]
    assert sorted(a["ran"] for a in answers) == [False, False, True]
    (late,) = await agents(1, lease=2.0)  # the leader lives: done, at once (poll: 30 s)
    assert await late.ask(timeout=5, op="run_once", path=str(path), seconds=0, **more) == {
        "ran": False
    }
    for agent in (*fleet, late):
        await agent.send(op="exit")
    async with asyncio.timeout(20):
        for agent in (*fleet, late):
            assert await agent.proc.wait() == 0
    (fresh,) = await agents(1, lease=2.0)  # a new start-up of the fleet
    ran = await fresh.ask(timeout=5, op="run_once", path=str(path), seconds=0, **more)
    assert ran == {"ran": generation is None}
    assert len(path.read_text().splitlines()) == (2 if generation is None else 1)


async def test_run_once_generations_and_reset(make: Make) -> None:  # noqa: F811
    one, two = await make().start(), await make().start()
    ran: list[str] = []

    async def job() -> None:
        ran.append("ran")

    assert await run_once(one, "migrate", job)
    assert not await run_once(two, "migrate", job)
    assert await run_once(two, "migrate", job, generation=2, timeout=5)  # another: again
    assert not await run_once(one, "migrate", job, generation="2")
    three = await make().start()  # a process started later reads the record
    assert not await run_once(three, "migrate", job, generation=2)
    # One keeps the leadership of its default run while it lives: neither a
    # reset nor a generation waits for it.
    await reset_run_once(three, "migrate", timeout=5)  # run it again, deliberately
    assert await run_once(one, "migrate", job, generation=2, timeout=5)
    assert ran == ["ran"] * 3
    with pytest.raises(TypeError, match="generation"):
        await run_once(one, "migrate", job, generation=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="generation"):
        await run_once(one, "migrate", job, generation="x" * 201)


async def test_run_once_job_failure_is_raised_and_another_may_run_it(make: Make) -> None:  # noqa: F811
    one, two = await make().start(), await make().start()

    async def broken() -> None:
        raise RuntimeError("migration failed")

    with pytest.raises(RuntimeError, match="migration failed"):
        await run_once(one, "migrate", broken)
    ran: list[str] = []

    async def fixed() -> None:
        ran.append("ok")

    assert await run_once(two, "migrate", fixed, timeout=5)
    assert ran == ["ok"]
    assert not await run_once(one, "migrate", fixed, timeout=5)


async def test_run_once_times_out_waiting(make: Make) -> None:  # noqa: F811
    one, two = await make().start(), await make().start()
    started = asyncio.Event()

    async def slow() -> None:
        started.set()
        await asyncio.sleep(30)

    job = asyncio.ensure_future(run_once(one, "slow", slow))
    await started.wait()
    with pytest.raises(TimeoutError):
        await run_once(two, "slow", slow, timeout=0.2)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job


# -- memoize ---------------------------------------------------------------------------------------


async def test_memoize_computes_once_across_processes(agents: Any, tmp_path: Path) -> None:
    crowd = await agents(6, lease=5.0)
    path = str(tmp_path / "computed")
    for agent in crowd:
        await agent.send(op="memo", seconds=0.3, path=path, calls=10)
    answers = [await agent.read(timeout=30) for agent in crowd]
    computed = Path(path).read_text().splitlines()
    assert len(computed) == 1, computed
    (by,) = {r["by"] for a in answers for r in a["results"]}
    assert computed == [f"compute {by}"]


async def test_memoize_killed_holder_blocks_others_no_longer_than_its_lock(
    medium: str,  # noqa: F811
    make: Make,  # noqa: F811
    agents: Any,
    tmp_path: Path,
) -> None:
    (holder,) = await agents(1, lease=1.0)
    path = tmp_path / "computed"
    await holder.send(op="memo", seconds=60, path=str(path), calls=1)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not (path.exists() and path.read_text()):
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    ipc = await make().start()
    cache = AsyncCache(ipc, name="memo")
    calls: list[int] = []

    @cache.memoize("slow", ttl=60, lease=1.0)
    async def slow(seconds: float, log: str) -> dict[str, int]:
        calls.append(1)
        return {"by": os.getpid()}

    waiting = asyncio.ensure_future(slow(60, str(path)))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # waits for the holder's result
    holder.kill()
    killed = time.monotonic()
    assert await asyncio.wait_for(waiting, 10) == {"by": os.getpid()}
    assert time.monotonic() - killed < takeover(medium)
    assert calls == [1]


async def test_memoize_failure_is_not_cached_and_releases_the_waiters(make: Make) -> None:  # noqa: F811
    one, two = await make().start(), await make().start()
    calls: list[str] = []
    gate = asyncio.Event()

    async def fetch(who: str) -> str:
        calls.append(who)
        if who == "one":
            await gate.wait()
            raise RuntimeError("backend down")
        return "fresh"

    first = AsyncCache(one, name="m").memoize("fetch", lambda: fetch("one"), 60)
    second = AsyncCache(two, name="m").memoize("fetch", lambda: fetch("two"), 60)
    failing = asyncio.ensure_future(first())
    await asyncio.sleep(0.1)
    waiting = asyncio.ensure_future(second())
    await asyncio.sleep(0.2)
    assert calls == ["one"]  # the second process waits for the first's result
    gate.set()
    with pytest.raises(RuntimeError, match="backend down"):
        await failing
    assert await asyncio.wait_for(waiting, 5) == "fresh"  # released, and computed in turn
    assert calls == ["one", "two"]
    assert await first() == "fresh"  # the failure was not cached; the success is


async def test_memoize_per_process_opt_out_takes_no_lock(make: Make) -> None:  # noqa: F811
    one, two = await make().start(), await make().start()
    calls: list[str] = []

    async def compute(who: str) -> str:
        calls.append(who)
        await asyncio.sleep(0.2)
        return who

    first = AsyncCache(one, name="m").memoize(
        "c", lambda: compute("one"), 60, across_processes=False
    )
    second = AsyncCache(two, name="m").memoize(
        "c", lambda: compute("two"), 60, across_processes=False
    )
    await asyncio.gather(first(), first(), second(), second())
    assert sorted(calls) == ["one", "two"]  # once per process, not once in all
    with pytest.raises(ValueError, match="lease"):
        AsyncCache(one).memoize("x", compute, 60, lease=0)


async def test_a_lock_held_when_its_event_loop_ends_is_released(make: Make) -> None:  # noqa: F811
    other = make()
    loop_ended, checked = threading.Event(), threading.Event()

    def another_loop() -> int:
        loop = asyncio.new_event_loop()
        try:
            lock = other.lock("orphan", lease=30)
            loop.run_until_complete(lock.acquire())
            fence = lock.fence
            # What asyncio.run does at its end: cancel every task left, let them finish.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop_ended.set()
            checked.wait(10)
            loop.run_until_complete(other.destroy())  # only now: its connections
            return fence
        finally:
            loop.close()

    holder = asyncio.ensure_future(asyncio.to_thread(another_loop))
    assert await asyncio.to_thread(loop_ended.wait, 10)
    ipc = await make().start()
    lock = ipc.lock("orphan", lease=30, poll_interval=0.05)
    try:
        await lock.acquire(timeout=3)  # well before the 30 s lease
    finally:
        checked.set()
    assert lock.fence > await holder
    await lock.release()


async def test_memoize_leaves_no_lock_behind_per_key(medium: str, make: Make) -> None:  # noqa: F811
    one, two = await make().start(), await make().start()
    first = AsyncCache(one, name="m").memoize("sq", lambda x: x * x, 60)
    second = AsyncCache(two, name="m").memoize("sq", lambda x: x * x, 60)
    results = await asyncio.gather(*(f(i) for i in range(30) for f in (first, second)))
    assert sorted(set(results)) == [i * i for i in range(30)]
    if is_redis(medium):
        import redis.asyncio as aioredis

        url, namespace = medium.split("#")
        client = aioredis.Redis.from_url(url)
        left = await client.keys(f"ivip:{{{namespace}}}:lk:*")
        await client.aclose()
    else:
        left = [p.name for p in (Path(medium) / "default" / "locks").iterdir()]
    assert left == []  # one lock per memoized key would pile up otherwise


async def test_a_lease_is_renewed_while_held(make: Make) -> None:  # noqa: F811
    one, two = await make().start(), await make().start()
    async with one.lock("long", lease=0.6) as lock:
        loop = asyncio.get_running_loop()
        until = loop.time() + 2.0  # more than three leases
        while loop.time() < until:
            assert not await two.lock("long", lease=0.6).try_acquire()
            await asyncio.sleep(0.1)
        assert lock.held
        assert await lock.verify()
    assert await two.lock("long").try_acquire()


# -- memoize: a cancelled caller takes only itself away (issue #20, item 4) -----------------


@pytest.mark.parametrize("across", [True, False], ids=["across", "per-process"])
async def test_memoize_a_cancelled_caller_leaves_the_others_their_result(
    make: Make,  # noqa: F811
    across: bool,
) -> None:
    ipc = await make().start()
    cache = AsyncCache(ipc, name="m")
    calls: list[int] = []
    started, gate = asyncio.Event(), asyncio.Event()

    @cache.memoize("slow", ttl=60, across_processes=across)
    async def slow(x: int) -> int:
        calls.append(x)
        started.set()
        await gate.wait()
        return x * 2

    callers = [asyncio.ensure_future(slow(21)) for _ in range(4)]
    async with asyncio.timeout(10):
        await started.wait()
    callers[0].cancel()  # its HTTP client went away
    with pytest.raises(asyncio.CancelledError):
        await callers[0]
    gate.set()
    async with asyncio.timeout(10):
        assert await asyncio.gather(*callers[1:]) == [42, 42, 42]
    assert calls == [21]
    assert await slow(21) == 42  # cached
    assert calls == [21]


@pytest.mark.parametrize("across", [True, False], ids=["across", "per-process"])
async def test_memoize_computation_ends_when_its_last_caller_is_cancelled(
    make: Make,  # noqa: F811
    across: bool,
) -> None:
    one, two = await make().start(), await make().start()
    calls: list[str] = []
    started, ended = asyncio.Event(), asyncio.Event()

    async def compute(who: str) -> str:
        calls.append(who)
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            ended.set()
        return who

    first = AsyncCache(one, name="m").memoize(
        "c", lambda: compute("one"), 60, across_processes=across
    )
    callers = [asyncio.ensure_future(first()) for _ in range(2)]
    async with asyncio.timeout(10):
        await started.wait()
    callers[0].cancel()
    await asyncio.gather(callers[0], return_exceptions=True)
    for _ in range(5):  # loop turns: a computation cancelled with it would end in these
        await asyncio.sleep(0)
    assert not ended.is_set()  # one caller is left: the computation goes on
    callers[1].cancel()
    await asyncio.gather(callers[1], return_exceptions=True)
    async with asyncio.timeout(10):
        await ended.wait()  # nobody is left: it is cancelled
    # ... and its lock is let go: another process computes at once.
    second = AsyncCache(two, name="m").memoize(
        "c", lambda: asyncio.sleep(0, "two"), 60, across_processes=across
    )
    async with asyncio.timeout(5):
        assert await second() == "two"
    assert calls == ["one"]


async def test_memoize_a_cancelled_caller_does_not_make_another_process_compute(
    agents: Any,
    make: Make,  # noqa: F811
    tmp_path: Path,
) -> None:
    ipc = await make().start()
    cache = AsyncCache(ipc, name="memo")  # the agents' cache and function
    path = tmp_path / "computed"
    gate = asyncio.Event()

    @cache.memoize("slow", ttl=60, lease=5.0)
    async def slow(seconds: float, log: str) -> dict[str, int]:
        with open(log, "a") as f:
            f.write(f"compute {os.getpid()}\n")
        await gate.wait()
        return {"by": os.getpid()}

    callers = [asyncio.ensure_future(slow(1.0, str(path))) for _ in range(4)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not (path.exists() and path.read_text()):  # this process computes, under the lock
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    (other,) = await agents(1, lease=5.0)
    await other.send(op="memo", seconds=1.0, path=str(path), calls=2)  # waits for our result
    await asyncio.sleep(0.2)
    callers[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await callers[0]
    gate.set()
    mine = {"by": os.getpid()}
    async with asyncio.timeout(10):
        assert await asyncio.gather(*callers[1:]) == [mine] * 3
    assert await other.read(timeout=20) == {"results": [mine, mine]}
    assert path.read_text().splitlines() == [f"compute {os.getpid()}"]
