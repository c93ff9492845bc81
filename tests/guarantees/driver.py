"""Runs one schedule: spawns the agents, applies the faults at their times, lets
the processes settle, collects the logs, and cleans up.

Every fault is logged in `driver.jsonl` with the agents' clock
(`time.monotonic_ns()`), before it is applied (a kill's time is an upper bound
for anything its victim did). After the ops phase every process is resumed and
told `quiet`; then the driver asks for mirror dumps and checks the history
until the eventual guarantees hold (every owed message delivered, mirrors
converged) or the settle deadline passes: a deadline, never a sleep-and-hope.
Then `finish`, and whatever still runs is killed (by process group: each agent
is the leader of its own, with any child it forked).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .checker import Violation, check
from .history import History, load
from .schedule import AGENT_EVENTS, AgentPlan, Event, Schedule

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("IVIP_TEST_REDIS", "redis://127.0.0.1:6379/0")
_BASE = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
SETTLE = 12.0  # seconds the eventual guarantees get after the ops phase
START_LEAD = 1.0  # seconds for the agents to import before t0


def redis_available() -> str | None:
    """None when a Redis server answers at REDIS_URL, else why not."""
    try:
        import redis
    except ImportError:
        return "redis-py is not installed"
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping()
    except Exception as exc:
        return f"no Redis server answers at {REDIS_URL}: {exc}"
    return None


@dataclass
class Proc:
    plan: AgentPlan
    popen: subprocess.Popen[bytes]
    stopped: bool = False

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, command: str) -> None:
        stdin = self.popen.stdin
        if stdin is None or not self.alive:
            return
        with contextlib.suppress(OSError):
            stdin.write(command.encode() + b"\n")
            stdin.flush()


@dataclass
class Outcome:
    """One run: its schedule, history and violations."""

    schedule: Schedule
    history: History
    violations: list[Violation]
    seconds: float
    logdir: Path | None = None  # kept only when asked
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.violations)

    def report(self) -> str:
        lines = [
            f"seed {self.schedule.seed} ({self.schedule.backend}): "
            f"{len(self.violations)} violation(s) in {self.seconds:.1f} s"
        ]
        lines += [f"  - {v}" for v in self.violations[:30]]
        if len(self.violations) > 30:
            lines.append(f"  ... and {len(self.violations) - 30} more")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(self.schedule.describe())
        return "\n".join(lines)


class Driver:
    def __init__(self, schedule: Schedule, *, keep: bool = False) -> None:
        self.schedule = schedule
        self.keep = keep
        self.base = Path(tempfile.mkdtemp(prefix="ivip-guarantees-", dir=_BASE))
        os.chmod(self.base, 0o700)
        self.logs = self.base / "logs"
        self.logs.mkdir()
        self.redis = schedule.backend == "redis"
        self.namespace = f"g{schedule.seed}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        if self.redis:
            self.path = REDIS_URL
        else:
            shared = self.base / "shared"
            shared.mkdir(mode=0o700)
            self.path = str(shared)
        self.procs: dict[str, Proc] = {}
        self.t0_ns = 0
        self.notes: list[str] = []
        self._log: IO[str] = open(self.logs / "driver.jsonl", "a")  # noqa: SIM115

    @property
    def ns_dir(self) -> Path:
        return Path(self.path) / self.namespace

    def log(self, ev: str, t: int | None = None, **fields: Any) -> None:
        record = {"t": time.monotonic_ns() if t is None else t, "p": "driver", "ev": ev}
        record.update(fields)
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()

    # -- processes --------------------------------------------------------------------------

    def spawn(self, plan: AgentPlan, start: float) -> None:
        events = [
            e.__dict__
            for e in self.schedule.events
            if e.kind in AGENT_EVENTS
            and (e.target in (plan.name, "*") or e.args.get("waiter") == plan.name)
        ]
        body = {
            "name": plan.name,
            "seed": plan.seed,
            "start": start,
            "pace": plan.pace,
            "ops": plan.ops,
            "t0_ns": self.t0_ns,
            "seconds": self.schedule.seconds,
            "path": self.path,
            "namespace": self.namespace,
            "options": self.schedule.options,
            "lock_lease": self.schedule.lock_lease,
            "events": events,
            "log": str(self.logs / f"{plan.name}.jsonl"),
        }
        plan_file = self.logs / f"{plan.name}.plan.json"
        plan_file.write_text(json.dumps(body))
        env = dict(os.environ)
        env.pop("IVIP_IPC_FAULT_DELAYS", None)
        if plan.delays:
            env["IVIP_IPC_FAULT_DELAYS"] = plan.delays
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        stderr = open(self.logs / f"{plan.name}.stderr", "wb")  # noqa: SIM115
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "tests.guarantees.agent", str(plan_file)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=ROOT,
                env=env,
                start_new_session=True,  # its own process group, with its forked children
            )
        finally:
            stderr.close()
        self.procs[plan.name] = Proc(plan, popen)
        self.log("spawn", target=plan.name, pid=popen.pid, delays=plan.delays)

    # -- faults -------------------------------------------------------------------------------

    def apply(self, event: Event) -> None:
        kind = event.kind
        if kind == "join":
            plan = next(a for a in self.schedule.agents if a.name == event.target)
            self.spawn(plan, event.at)
            return
        if kind in ("kill", "stop"):
            proc = self.procs.get(event.target)
            if proc is None or not proc.alive:
                self.log("skipped", kind=kind, target=event.target, why="not running")
                return
            if kind == "kill":
                self.log("kill", target=event.target)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.popen.pid, signal.SIGKILL)
            else:
                self.log("stop", target=event.target, seconds=event.args["seconds"])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.popen.pid, signal.SIGSTOP)
                proc.stopped = True
            return
        from . import files

        what = files.apply(self.ns_dir, event)
        self.log(kind, did=what, **event.args)

    def cont(self, name: str) -> None:
        proc = self.procs[name]
        if proc.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.popen.pid, signal.SIGCONT)
            proc.stopped = False
            self.log("cont", target=name)

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> Outcome:
        began = time.monotonic()
        try:
            self._run()
            history = load(self.logs)
            violations = check(history, final=True)
        finally:
            self.cleanup()
        outcome = Outcome(
            self.schedule,
            history,
            violations,
            time.monotonic() - began,
            self.base if self.keep else None,
            self.notes,
        )
        return outcome

    def _run(self) -> None:
        schedule = self.schedule
        initial = [a for a in schedule.agents if a.start >= 0]
        lead = START_LEAD + 0.15 * len(initial)
        self.t0_ns = time.monotonic_ns() + int(lead * 1e9)
        self.log("t0", t=self.t0_ns, seed=schedule.seed, backend=schedule.backend)
        for plan in initial:
            self.spawn(plan, plan.start)
        timeline: list[tuple[float, int, Any]] = []
        for i, event in enumerate(schedule.events):
            if event.kind not in AGENT_EVENTS:
                timeline.append((event.at, i, event))
        timeline.sort(key=lambda x: (x[0], x[1]))
        conts: list[tuple[float, str]] = []
        end = self.t0_ns / 1e9 + schedule.seconds
        while True:
            now = time.monotonic()
            due = [c for c in conts if c[0] <= now]
            for c in due:
                conts.remove(c)
                self.cont(c[1])
            while timeline and self.t0_ns / 1e9 + timeline[0][0] <= now:
                _, _, event = timeline.pop(0)
                self.apply(event)
                if event.kind == "stop":
                    conts.append((now + float(event.args["seconds"]), event.target))
            if now >= end and not conts:
                break
            nexts = [end] + [c[0] for c in conts]
            if timeline:
                nexts.append(self.t0_ns / 1e9 + timeline[0][0])
            time.sleep(max(0.0, min(0.05, min(nexts) - time.monotonic())))
        for name in self.procs:
            self.cont(name)
        self.log("quiet")
        for proc in self.procs.values():
            proc.send("quiet")
        self._await_all("quiet_done", 20.0)
        self._settle()
        self.log("finish")
        for proc in self.procs.values():
            proc.send("finish")
        deadline = time.monotonic() + 15
        while any(p.alive for p in self.procs.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        for name, proc in self.procs.items():
            if proc.alive:
                self.notes.append(f"{name} did not exit within 15 s of finish: killed")
                self.log("kill", target=name, why="finish deadline")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
            self.log("exited", target=name, code=proc.popen.returncode)

    def _await_all(self, ev: str, seconds: float, since: int | None = None) -> None:
        """Wait until every running agent logged `ev` after `since`, or exited."""
        since = since or 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            history = load(self.logs)
            waiting = [
                name
                for name, proc in self.procs.items()
                if proc.alive and not history.logged_since(name, ev, since)
            ]
            if not waiting:
                return
            time.sleep(0.03)
        self.notes.append(f"{ev} not logged within {seconds:.0f} s by {waiting}")

    def _settle(self) -> None:
        deadline = time.monotonic() + SETTLE
        while True:
            since = time.monotonic_ns()
            self.log("dump")
            for proc in self.procs.values():
                proc.send("dump")
            self._await_all("dump", 10.0, since)
            violations = check(load(self.logs), final=False)
            if not any(v.eventual for v in violations) or time.monotonic() > deadline:
                return
            time.sleep(0.3)

    def cleanup(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGKILL)  # the agent and its children
            if proc.popen.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.popen.stdin.close()
            proc.popen.wait()
        self._log.close()
        if self.redis:
            with contextlib.suppress(Exception):
                import redis

                client = redis.Redis.from_url(REDIS_URL)
                for key in client.scan_iter(match=f"ivip:{{{self.namespace}}}*", count=1000):
                    client.delete(key)
                client.close()
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)


def run(schedule: Schedule, *, keep: bool = False) -> Outcome:
    """Run `schedule` once and check it."""
    return Driver(schedule, keep=keep).run()
