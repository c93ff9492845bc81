"""The program each process of a guarantee-checker run executes.

Usage: `python -m tests.guarantees.agent PLAN.json` (the driver writes the plan).

It joins the namespace at its planned time, then until told `quiet` (stdin)
does random operations drawn from its own seed: messages (numbered per sender:
a sender is one life of an instance, `<process>.<incarnation>`), cache sets and
deletes of a few shared keys, `ipc.lock`, `Leadership`, `memoize`, `wait_for`,
and at their planned times the events addressed to it (a fork, a loop that ends
without `destroy()`, cancelled waits, `run_once` with every process, lock
races, memoize stampedes). Every operation is logged as one JSON line, one
`os.write` each (a kill loses no half line), with `time.monotonic_ns()`:
CLOCK_MONOTONIC is one clock for every process of the machine, so the checker
can order events across processes. `dump` (stdin) logs the cache mirror;
`finish` destroys the instance and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from ivip_ipc_async import AsyncCache, AsyncIPC, Leadership, run_once
from ivip_ipc_async.ipc import GAP_EVENT

KEYS = 8  # cache keys k0..k7, shared by every process
ADD_KEYS = 24  # keys a0..a23 of the "atomic" cache, each `add`ed by whoever comes
COUNTERS = 2  # keys c0, c1 (incr) and v0, v1 (versioned read-modify-write)
CAS_TRIES = 100  # a versioned write given up after this many refusals in a row
LOCKS = ("a", "b")
MEMO_KEYS = 3
MEMO_TTL = 1.0
EVENT = "m"
NEVER = "never"  # an event nobody sends: wait_for on it only ends by timeout or cancel


class Log:
    """JSON lines, one write per line, with the shared monotonic clock."""

    def __init__(self, path: str, name: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.name = name
        self.node = ""

    def __call__(self, ev: str, t: int | None = None, **fields: Any) -> None:
        record = {"t": time.monotonic_ns() if t is None else t, "p": self.name, "n": self.node}
        record["ev"] = ev
        record.update(fields)
        os.write(self.fd, (json.dumps(record, default=repr) + "\n").encode())


class Commands:
    """The driver's commands on stdin, read without blocking the loop."""

    def __init__(self) -> None:
        self.pending = b""
        self.lines: list[str] = []
        self.wake: asyncio.Event | None = None
        self.eof = False

    def attach(self) -> None:
        self.wake = asyncio.Event()
        asyncio.get_running_loop().add_reader(0, self._read)
        if self.lines:
            self.wake.set()

    def detach(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(0)

    def _read(self) -> None:
        chunk = os.read(0, 4096)
        if not chunk:
            self.eof = True
            self.lines.append("finish")
            self.detach()
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        self.lines.extend(line.decode().strip() for line in lines)
        if self.wake is not None:
            self.wake.set()

    async def next(self) -> str:
        assert self.wake is not None
        while not self.lines:
            self.wake.clear()
            await self.wake.wait()
        return self.lines.pop(0)


class Life:
    """One incarnation: an `AsyncIPC` from start() to destroy(), loop end or death."""

    def __init__(self, plan: dict[str, Any], log: Log, k: int, commands: Commands) -> None:
        self.plan = plan
        self.log = log
        self.k = k
        self.node = f"{plan['name']}.{k}"
        self.commands = commands
        self.rnd = random.Random(f"{plan['seed']}.{k}")
        self.arnd = random.Random(f"{plan['seed']}.{k}.atomic")  # add, incr, cas
        self.lease = float(plan["lock_lease"])
        self.seq = 0
        self.opn = 0
        self.quiet = False
        self.ending: str | None = None  # why this life ends early
        self.ended = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.timers: list[asyncio.TimerHandle] = []
        self.ipc = AsyncIPC(plan["path"], namespace=plan["namespace"], **plan["options"])
        self.kv: AsyncCache[Any] = AsyncCache(self.ipc, name="kv", default_ttl=0)
        self.memo_cache: AsyncCache[Any] = AsyncCache(self.ipc, name="memo", default_ttl=0)
        self.atomic: AsyncCache[Any] = AsyncCache(self.ipc, name="atomic", default_ttl=0)
        self.memo: Callable[..., Awaitable[Any]] = self.memo_cache.memoize(
            "f", self._compute, MEMO_TTL, across_processes=True, lease=self.lease * 3
        )

    def at(self, seconds: float) -> float:
        """The loop time (CLOCK_MONOTONIC seconds) of `seconds` after t0."""
        return float(self.plan["t0_ns"]) / 1e9 + seconds

    def next_id(self) -> str:
        self.opn += 1
        return f"{self.node}/{self.opn}"

    # -- what it hears ------------------------------------------------------------------

    def on_message(self, message: Any) -> None:
        if isinstance(message, dict):
            self.log("recv", s=message.get("s"), q=message.get("q"))
        else:
            self.log("recv_bad", message=message)

    def on_gap(self, gap: Any) -> None:
        info = gap if isinstance(gap, dict) else {}
        self.log("gap", peer=info.get("peer"), lost=info.get("lost"))

    # -- the life -------------------------------------------------------------------------

    async def run(self) -> str:
        log, ipc = self.log, self.ipc
        log.node = self.node
        ipc.on(EVENT, self.on_message)
        ipc.on(GAP_EVENT, self.on_gap)
        loop = asyncio.get_running_loop()
        start_at = self.at(self.plan["start"]) if self.k == 1 else loop.time()
        await asyncio.sleep(max(0.0, start_at - loop.time()))
        log("start_call")
        await ipc.start()
        log("started", peer=str(ipc.stats().get("peer")))
        self.commands.attach()
        for event in self.plan["events"]:
            when = self.at(event["at"])
            if when < loop.time() - 0.05:
                continue  # before this life (a rejoin)
            self.timers.append(loop.call_at(when, self._fire, event))
        ops = self._spawn(self._ops(), "ops")
        atomic_ops = self._spawn(self._atomic_ops(), "atomic_ops")
        commands = self._spawn(self._commands(), "commands")
        await self.ended.wait()
        for timer in self.timers:
            timer.cancel()
        commands.cancel()
        if self.ending is None:  # finish: a clean end
            ops.cancel()
            atomic_ops.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            log("destroy")
            await ipc.destroy()
            self.commands.detach()
            return "finish"
        # The loop ends without destroy(): asyncio.run cancels what is left.
        self.commands.detach()
        return self.ending

    def _spawn(self, coro: Awaitable[Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def end(self, why: str) -> None:
        if not self.ended.is_set():
            self.ending = why if why != "finish" else None
            self.ended.set()

    async def _commands(self) -> None:
        while True:
            command = await self.commands.next()
            if command == "quiet":
                self.quiet = True
                for timer in self.timers:
                    timer.cancel()
                busy = [t for t in self.tasks if t is not asyncio.current_task()]
                await asyncio.wait(busy, timeout=15) if busy else None
                self.log("quiet_done")
            elif command == "dump":
                await self._dump()
            elif command == "finish":
                self.end("finish")
                return

    async def _dump(self) -> None:
        state: dict[str, Any] = {}
        for key in await self.kv.keys():
            value = await self.kv.get(key)
            state[str(key)] = value.get("w") if isinstance(value, dict) else value
        atomic: dict[str, Any] = {}
        for key in await self.atomic.keys():
            atomic[str(key)] = await self.atomic.get(key)
        stats = self.ipc.stats()
        self.log(
            "dump",
            kv=state,
            atomic=atomic,
            gaps=stats.get("gaps"),
            records_lost=stats.get("records_lost"),
            listeners_never=self.ipc.listener_count(NEVER),
            healthy=self.ipc.health().get("healthy"),
        )

    # -- background operations ------------------------------------------------------------

    async def _ops(self) -> None:
        kinds: list[tuple[str, Callable[[], Awaitable[None]], int]] = [
            ("notify", self.op_notify, 40),
            ("notify_many", self.op_notify_many, 8),
            ("set", self.op_set, 20),
            ("delete", self.op_delete, 4),
            ("lock", self.op_lock, 6),
            ("leader", self.op_leader, 3),
            ("memo", self.op_memo, 6),
            ("wait_for", self.op_wait_for, 2),
        ]
        allowed = set(self.plan.get("ops") or [k for k, _, _ in kinds])
        kinds = [k for k in kinds if k[0] in allowed]
        weights = [w for _, _, w in kinds]
        pace = float(self.plan["pace"])
        end = self.at(self.plan["seconds"])
        loop = asyncio.get_running_loop()
        while not self.quiet and loop.time() < end:
            name, op, _ = self.rnd.choices(kinds, weights)[0]
            try:
                await op()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log("op_error", op=name, error=type(exc).__name__, message=str(exc)[:300])
            await asyncio.sleep(self.rnd.expovariate(1 / pace))

    async def _atomic_ops(self) -> None:
        """add, incr and versioned writes beside the other operations, drawn from a
        stream of their own (the other operations' draws stay what they were)."""
        rnd = self.arnd
        kinds: list[tuple[str, Callable[[], Awaitable[None]], int]] = [
            ("add", self.op_add, 3),
            ("incr", self.op_incr, 5),
            ("cas", self.op_cas, 3),
        ]
        allowed = set(self.plan.get("ops") or [k for k, _, _ in kinds])
        kinds = [k for k in kinds if k[0] in allowed]
        if not kinds:
            return
        weights = [w for _, _, w in kinds]
        pace = float(self.plan["pace"]) * 2
        end = self.at(self.plan["seconds"])
        loop = asyncio.get_running_loop()
        while not self.quiet and loop.time() < end:
            name, op, _ = rnd.choices(kinds, weights)[0]
            try:
                await op()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log("op_error", op=name, error=type(exc).__name__, message=str(exc)[:300])
            await asyncio.sleep(rnd.expovariate(1 / pace))

    async def op_notify(self) -> None:
        self.seq += 1
        q = self.seq
        self.log("send", qs=[q])
        await self.ipc.notify(EVENT, {"s": self.node, "q": q})
        self.log("ack", qs=[q])

    async def op_notify_many(self) -> None:
        qs = list(range(self.seq + 1, self.seq + 1 + self.rnd.randint(2, 6)))
        self.seq = qs[-1]
        self.log("send", qs=qs)
        await self.ipc.notify_many(EVENT, [{"s": self.node, "q": q} for q in qs])
        self.log("ack", qs=qs)

    async def op_set(self) -> None:
        key, w = f"k{self.rnd.randrange(KEYS)}", self.next_id()
        self.log("set", key=key, w=w)
        await self.kv.set(key, {"w": w})
        self.log("set_ack", key=key, w=w)

    async def op_delete(self) -> None:
        key, w = f"k{self.rnd.randrange(KEYS)}", self.next_id()
        self.log("del", key=key, w=w)
        await self.kv.delete(key)
        self.log("del_ack", key=key, w=w)

    async def op_add(self, key: str | None = None) -> None:
        key, w = key or f"a{self.arnd.randrange(ADD_KEYS)}", self.next_id()
        self.log("add_call", key=key, w=w)
        won = await self.atomic.add(key, w)
        seen = await self.atomic.get(key)
        self.log("add_ret", key=key, w=w, won=won, seen=seen)

    async def op_incr(self, key: str | None = None) -> None:
        key, i = key or f"c{self.arnd.randrange(COUNTERS)}", self.next_id()
        self.log("incr_call", key=key, i=i)
        value = await self.atomic.incr(key)
        self.log("incr_ret", key=key, i=i, v=value)

    async def op_cas(self, key: str | None = None) -> None:
        """Read, add one, write back only if unchanged; again on a refusal."""
        key, i = key or f"v{self.arnd.randrange(COUNTERS)}", self.next_id()
        self.log("cas_call", key=key, i=i)
        for tries in range(1, CAS_TRIES + 1):
            value, version = await self.atomic.get_with_version(key, 0)
            if await self.atomic.set(key, value + 1, if_version=version):
                self.log("cas_ret", key=key, i=i, v=value + 1, tries=tries)
                return
        self.log("cas_giveup", key=key, i=i, tries=CAS_TRIES)

    async def _hold(self, kind: str, name: str, held: Callable[[], bool], seconds: float) -> None:
        """Claim the lock now and then while holding it: each claim says `held` was
        true at (or after) its time."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while True:
            t = time.monotonic_ns()
            if not held():
                self.log("lock_lost", kind=kind, name=name, at=t)
                return
            self.log("claim", t=t, kind=kind, name=name)
            if loop.time() >= end:
                return
            await asyncio.sleep(min(0.02, max(0.0, end - loop.time())))

    async def op_lock(self) -> None:
        name = self.rnd.choice(LOCKS)
        timeout = self.rnd.uniform(0.2, 1.5)
        lock = self.ipc.lock(name, timeout=timeout, lease=self.lease, poll_interval=0.5)
        self.log("lock_wait", kind="u", name=name)
        try:
            async with lock:
                self.log("lock_acq", kind="u", name=name, fence=lock.fence)
                await self._hold("u", name, lambda: lock.held, self.rnd.uniform(0, 0.08))
                self.log("lock_rel_begin", kind="u", name=name, fence=lock.fence)
        except TimeoutError:
            self.log("lock_timeout", kind="u", name=name)
            return
        self.log("lock_rel", kind="u", name=name)

    async def op_leader(self) -> None:
        leadership = Leadership(self.ipc, "boss", poll_interval=0.5, lease=self.lease)
        self.log("lock_wait", kind="l", name="boss")
        try:
            await leadership.acquire(timeout=self.rnd.uniform(0.2, 1.0))
        except TimeoutError:
            self.log("lock_timeout", kind="l", name="boss")
            return
        try:
            self.log("lock_acq", kind="l", name="boss", fence=leadership.fence)
            await self._hold("l", "boss", lambda: leadership.held, self.rnd.uniform(0, 0.1))
            self.log("lock_rel_begin", kind="l", name="boss", fence=leadership.fence)
        finally:
            await leadership.release()
        self.log("lock_rel", kind="l", name="boss")

    async def _compute(self, key: Any) -> dict[str, str]:
        c = self.next_id()
        self.log("memo_compute", key=str(key), c=c)
        await asyncio.sleep(self.rnd.uniform(0.02, 0.12))
        self.log("memo_computed", key=str(key), c=c)
        return {"c": c}

    async def op_memo(self) -> None:
        key = self.rnd.randrange(MEMO_KEYS)
        self.log("memo_call", key=str(key))
        value = await asyncio.wait_for(self.memo(key), 10)
        self.log("memo_ret", key=str(key), c=value.get("c") if isinstance(value, dict) else None)

    async def op_wait_for(self) -> None:
        try:
            await self.ipc.wait_for(NEVER, timeout=self.rnd.uniform(0.01, 0.1))
        except TimeoutError:
            return
        self.log("op_error", op="wait_for", error="returned", message="got a message never sent")

    # -- events ---------------------------------------------------------------------------

    def _fire(self, event: dict[str, Any]) -> None:
        if self.quiet or self.ended.is_set():
            return
        handler = getattr(self, f"ev_{event['kind']}")
        self._spawn(self._guarded(event, handler(event)), event["kind"])

    async def _guarded(self, event: dict[str, Any], work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log("op_error", op=event["kind"], error=type(exc).__name__, message=str(exc)[:300])

    async def ev_fork(self, event: dict[str, Any]) -> None:
        child_seconds = float(event["args"]["child"])
        self.log("fork")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multi-threaded, fork may deadlock": not here
            pid = os.fork()
        if pid == 0:  # the child: plain work, never the library, then leave
            time.sleep(child_seconds)
            os._exit(0)
        self.log("forked", child=pid)
        # Reap it later, without blocking the loop.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + child_seconds + 5
        while loop.time() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            await asyncio.sleep(0.05)

    async def ev_loop_end(self, event: dict[str, Any]) -> None:
        self.log("loop_end", then=event["args"]["then"])
        self.end(f"loop_end:{event['args']['then']}:{event['args']['sync']}")

    async def ev_run_once(self, event: dict[str, Any]) -> None:
        args = event["args"]
        job = args["job"]
        await asyncio.sleep(self.rnd.uniform(0, 0.02))

        async def work() -> None:
            self.log("job_start", job=job)
            await asyncio.sleep(float(args["job_seconds"]))
            self.log("job_end", job=job)

        self.log("ro_call", job=job)
        ran = await run_once(self.ipc, job, work, timeout=8, poll_interval=0.5, lease=self.lease)
        self.log("ro_ret", job=job, ran=ran)
        if ran and args.get("leave"):
            self.log("leave", how=args["leave"], job=job)
            if args["leave"] == "abort":
                os._exit(0)
            self.end("leave:exit" if args["leave"] == "exit" else "loop_end:exit:0")

    async def ev_atomic_race(self, event: dict[str, Any]) -> None:
        """Every process at once: an `add` of one key, `n` increments of one
        counter and `n` versioned read-modify-writes of another, concurrently."""
        key, n = str(event["args"]["key"]), int(event["args"]["n"])

        async def increments() -> None:
            for _ in range(n):
                await self.op_incr(f"c-{key}")

        async def versioned() -> None:
            for _ in range(n):
                await self.op_cas(f"v-{key}")

        await asyncio.gather(self.op_add(f"a-{key}"), increments(), versioned())

    async def ev_lock_race(self, event: dict[str, Any]) -> None:
        """Holder and waiter of one lock, the waiter's deadline at the release."""
        args = event["args"]
        release_at = self.at(event["at"] + float(args["hold"]))
        loop = asyncio.get_running_loop()
        kind = "l" if args["leader"] else "u"
        name = args["name"]
        if event["target"] == self.plan["name"]:  # the holder
            holder = self._contender(kind, name)
            self.log("lock_wait", kind=kind, name=name)
            try:
                await holder.acquire(timeout=float(args["hold"]))
            except TimeoutError:
                self.log("lock_timeout", kind=kind, name=name)
                return
            self.log("lock_acq", kind=kind, name=name, fence=holder.fence)
            await self._hold(kind, name, lambda: holder.held, release_at - loop.time())
            self.log("lock_rel_begin", kind=kind, name=name, fence=holder.fence)
            await holder.release()
            self.log("lock_rel", kind=kind, name=name)
            return
        # The waiter: starts a little after the holder, its deadline at the release.
        await asyncio.sleep(0.05)
        waiter = self._contender(kind, name)
        deadline = release_at + float(args["skew"])
        self.log("lock_wait", kind=kind, name=name, deadline=int(deadline * 1e9))
        try:
            async with asyncio.timeout_at(deadline) as cm:
                await waiter.acquire()
        except TimeoutError:
            self.log("lock_timeout", kind=kind, name=name)
            return
        finally:
            if not waiter.held:
                await waiter.release()
        self.log("lock_acq", kind=kind, name=name, fence=waiter.fence)
        if cm.expired():
            # The deadline fired and the wait still returned with the lock.
            self.log("timeout_swallowed", what=f"{kind}.{name}", deadline=int(deadline * 1e9))
        await self._hold(kind, name, lambda: waiter.held, 0.02)
        self.log("lock_rel_begin", kind=kind, name=name, fence=waiter.fence)
        await waiter.release()
        self.log("lock_rel", kind=kind, name=name)

    def _contender(self, kind: str, name: str) -> Any:
        """A lock-like object: `acquire()`, `release()`, `held`, `fence`."""
        if kind == "l":
            return _LeaderAsLock(Leadership(self.ipc, name, poll_interval=0.5, lease=self.lease))
        return self.ipc.lock(name, lease=self.lease, poll_interval=0.5)

    async def ev_memo_stampede(self, event: dict[str, Any]) -> None:
        """Four callers of one key in this process; the first is cancelled."""
        args = event["args"]
        key = f"st{args['key']}-{self.node}"
        compute = float(args["compute"])

        async def slow() -> dict[str, str]:
            c = self.next_id()
            self.log("memo_compute", key=key, c=c)
            await asyncio.sleep(compute)
            self.log("memo_computed", key=key, c=c)
            return {"c": c}

        fn = self.memo_cache.memoize(
            "st", slow, MEMO_TTL, across_processes=bool(args["across"]), lease=self.lease * 3
        )
        callers = [asyncio.ensure_future(fn()) for _ in range(4)]
        self.log("stampede", key=key, callers=4)
        await asyncio.sleep(float(args["cancel_after"]))
        sent = callers[0].cancel()
        results = await asyncio.gather(*callers, return_exceptions=True)
        for i, result in enumerate(results):
            outcome = (
                "cancelled"
                if isinstance(result, asyncio.CancelledError)
                else type(result).__name__
                if isinstance(result, BaseException)
                else "ok"
            )
            self.log(
                "stampede_result",
                key=key,
                caller=i,
                cancelled_by_us=(i == 0 and sent),
                outcome=outcome,
            )

    async def ev_cancel_wait(self, event: dict[str, Any]) -> None:
        """A waiting call cancelled after `after` s: it must raise and hold nothing."""
        args = event["args"]
        what, after = args["what"], float(args["after"])
        if what in ("lock", "leader", "lock_timeout"):
            await self._cancel_lock_wait(what, after)
            return
        # An event of its own: the random `wait_for` ops (and another cancelled
        # wait) may be waiting on NEVER at the same moment.
        never = f"{NEVER}-{self.next_id()}"
        if what == "memo":
            key = f"cw-{self.next_id()}"

            async def slow(_key: str) -> int:
                await asyncio.sleep(5)
                return 1

            async def quick(_key: str) -> int:
                return 2

            lease = self.lease * 3
            call: Awaitable[Any] = self.memo_cache.memoize("cw", slow, MEMO_TTL, lease=lease)(key)
        else:
            call = self.ipc.wait_for(never)
        task = asyncio.ensure_future(call)
        await asyncio.sleep(after)
        sent = task.cancel()
        outcome = await _outcome(task)
        held = False
        if what == "memo":
            # Holds nothing: the next caller of the key computes it at once.
            again = self.memo_cache.memoize("cw", quick, MEMO_TTL, lease=self.lease * 3)
            try:
                await asyncio.wait_for(again(key), 3)
            except TimeoutError:
                held = True
        listeners = self.ipc.listener_count(never) if what == "wait_for" else 0
        self.log(
            "cancel_result", what=what, sent=sent, outcome=outcome, held=held, listeners=listeners
        )

    async def _cancel_lock_wait(self, what: str, after: float) -> None:
        """Waits for a lock this process holds under another object, cancelled
        (`lock_timeout`: timed out) just as the holder lets go: item 3's shape,
        where the release's wake-up and the cancellation meet in one iteration.
        A few attempts, the release a fraction of a millisecond earlier each time."""
        for attempt in range(6):
            lead = self.rnd.uniform(0.0002, 0.0012)
            await self._cancel_lock_wait_once(what, after if attempt == 0 else 0.03, lead)

    async def _cancel_lock_wait_once(self, what: str, after: float, lead: float) -> None:
        loop = asyncio.get_running_loop()
        kind = "l" if what == "leader" else "u"
        name = f"c{self.node.replace('.', '_')}"
        blocker, target = self._contender(kind, name), self._contender(kind, name)
        await blocker.acquire(timeout=2)
        self.log("lock_acq", kind=kind, name=name, fence=blocker.fence)
        deadline = loop.time() + after
        released: list[asyncio.Task[Any]] = []

        def let_go() -> None:
            self.log("lock_rel_begin", kind=kind, name=name, fence=blocker.fence)
            released.append(self._spawn(blocker.release(), "release"))

        loop.call_at(deadline - lead, let_go)
        if what == "lock_timeout":
            try:
                async with asyncio.timeout_at(deadline) as cm:
                    await target.acquire()
            except TimeoutError:
                self.log("cancel_result", what=what, outcome="timeout", held=target.held)
                await asyncio.gather(*released)
                return
            expired = cm.expired()
            self.log("lock_acq", kind=kind, name=name, fence=target.fence)
            if expired:  # the deadline fired, and the wait returned with the lock
                self.log("timeout_swallowed", what=f"{kind}.{name}", deadline=int(deadline * 1e9))
            self.log("cancel_result", what=what, outcome="acquired", expired=expired, held=False)
        else:
            task = asyncio.ensure_future(target.acquire())
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            sent = task.cancel()  # as the release wakes it, or just after
            outcome = await _outcome(task)
            held = await _still_held(target)
            if held:
                self.log("lock_acq", kind=kind, name=name, fence=target.fence)
            self.log("cancel_result", what=what, sent=sent, outcome=outcome, held=held)
        await asyncio.gather(*released)
        if target.held:
            self.log("lock_rel_begin", kind=kind, name=name, fence=target.fence)
        await target.release()


async def _still_held(lock: Any) -> bool:
    """Held 0.5 s after its wait was cancelled (a lock won just as the waiter was
    cancelled may be let go in the background, but promptly)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.5
    while lock.held and loop.time() < deadline:  # noqa: ASYNC110 (a property, no event)
        await asyncio.sleep(0.01)
    return bool(lock.held)


async def _outcome(task: asyncio.Future[Any]) -> str:
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    except Exception as exc:
        return type(exc).__name__
    return "returned"


class _LeaderAsLock:
    """A `Leadership` seen as a lock (for races and cancellations)."""

    def __init__(self, leadership: Leadership) -> None:
        self.leadership = leadership
        self.name = leadership.name

    @property
    def held(self) -> bool:
        return self.leadership.held

    @property
    def fence(self) -> int:
        return self.leadership.fence

    async def acquire(self, timeout: float | None = None) -> None:
        await self.leadership.acquire(timeout=timeout)

    async def release(self) -> None:
        await self.leadership.release()


def main() -> None:
    warnings.simplefilter("ignore", DeprecationWarning)
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    log = Log(plan["log"], plan["name"])
    commands = Commands()
    k = 0
    while True:
        k += 1
        life = Life(plan, log, k, commands)
        outcome = asyncio.run(life.run())
        log.node = life.node
        if outcome == "finish" or commands.eof:
            log("exit", how="finish")
            return
        if outcome.startswith("leave:"):
            log("exit", how="leave")
            return
        # loop_end:<then>:<seconds>: the loop ended without destroy().
        _, then, seconds = outcome.split(":")
        log("loop_ended", then=then)
        if then == "exit":
            log("exit", how="loop_end")
            return
        time.sleep(float(seconds))  # synchronous work, no event loop
        if then == "sync":
            log("exit", how="after_sync")
            return
        # rejoin: a new life in a new event loop, with a new instance


if __name__ == "__main__":
    main()
