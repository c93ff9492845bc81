"""A seeded random schedule: which processes run, when they start, and the timed faults.

`generate(seed, backend, seconds)` draws everything from `random.Random(seed)`:
the same seed gives the same schedule (the processes' own operations are drawn
from per-process seeds in it too). Real processes are not deterministic, so a
seed reproduces the schedule, not every interleaving: a failing seed is re-run
a few times, and shrunk (`shrink.py`).

Times are seconds after the run's common start (`t0`); the ops phase lasts
`seconds`, then every process is quiet and the history is checked.

Events run either in the driver (signals to a process, files planted in or
removed from the namespace directory, a process joining late) or inside the
agent named by `target` (a fork, an event loop that ends without `destroy()`,
cancelled waits, coordinated calls of `run_once`, lock races, memoize stampedes).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "AGENT_EVENTS",
    "DRIVER_EVENTS",
    "AgentPlan",
    "Event",
    "Schedule",
    "generate",
]

# Done by the driver from outside the process.
DRIVER_EVENTS = frozenset({"kill", "stop", "join", "plant", "remove", "lockfile"})
# Done by the agent named in `target`, at `at`.
AGENT_EVENTS = frozenset(
    {"fork", "loop_end", "run_once", "lock_race", "memo_stampede", "cancel_wait", "atomic_race"}
)

# What the slowed phases may be (fault_points); per process.
DELAYS = (
    "restore_slice=0.05",
    "restore_slice=0.2",
    "snapshot_write=0.3",
    "doorbell=0.01",
    "doorbell=0.05",
)
REDIS_DELAYS = ("lease_renew=0.5", "lease_renew=1.5")

# Backend options shared by every process of a run: short retention and
# frequent rounds, so that collection, snapshots and gaps happen within seconds.
DIRECTORY_OPTIONS: dict[str, Any] = {
    "retention": 3.0,
    "rescan_interval": 0.3,
    "snapshot_interval": 0.3,
    "segment_bytes": 64 * 1024,
    "max_footprint": 8 << 20,
}
REDIS_OPTIONS: dict[str, Any] = {"state_check_interval": 0.5}


@dataclass
class AgentPlan:
    """One process: its name, when it starts, what is slowed in it, its op mix."""

    name: str
    start: float  # seconds after t0 when it calls start()
    seed: int  # of its own operations
    delays: str = ""  # IVIP_IPC_FAULT_DELAYS
    pace: float = 0.02  # mean seconds between two background operations
    ops: list[str] = field(default_factory=list)  # background op kinds; empty: all


@dataclass
class Event:
    """A timed fault or coordinated operation."""

    at: float
    kind: str
    target: str = ""  # an agent's name ("" for driver events on the namespace)
    args: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in sorted(self.args.items()))
        who = f" {self.target}" if self.target else ""
        return f"t+{self.at:.3f}s {self.kind}{who} {extra}".rstrip()


@dataclass
class Schedule:
    """Everything one run does, drawn from `seed`."""

    seed: int
    backend: str  # "directory" or "redis"
    seconds: float
    agents: list[AgentPlan]
    events: list[Event]
    options: dict[str, Any] = field(default_factory=dict)
    lock_lease: float = 2.0  # Redis leases of locks and leaderships (short: faults matter)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        raw = json.loads(text)
        raw["agents"] = [AgentPlan(**a) for a in raw["agents"]]
        raw["events"] = [Event(**e) for e in raw["events"]]
        return cls(**raw)

    def with_events(self, events: list[Event]) -> Schedule:
        """The same schedule with only `events` (and the agents they still need)."""
        joined = {e.target for e in events if e.kind == "join"}
        agents = [a for a in self.agents if a.start >= 0 or a.name in joined]
        names = {a.name for a in agents}
        kept = [e for e in events if not e.target or e.target in names]
        return Schedule(
            self.seed, self.backend, self.seconds, agents, kept, self.options, self.lock_lease
        )

    def without_agent(self, name: str) -> Schedule:
        agents = [a for a in self.agents if a.name != name]
        events = [e for e in self.events if e.target != name]
        return Schedule(
            self.seed, self.backend, self.seconds, agents, events, self.options, self.lock_lease
        )

    def describe(self) -> str:
        lines = [
            f"seed {self.seed}: {self.backend}, {len(self.agents)} processes, "
            f"{self.seconds:.1f} s of operations, {len(self.events)} events"
        ]
        for a in self.agents:
            when = "joins late" if a.start < 0 else f"starts at t+{a.start:.3f}s"
            slowed = f", slowed {a.delays}" if a.delays else ""
            ops = f", ops {','.join(a.ops)}" if a.ops else ""
            lines.append(f"  {a.name}: {when}, pace {a.pace * 1000:.0f} ms{slowed}{ops}")
        lines.extend(f"  {e.describe()}" for e in sorted(self.events, key=lambda e: e.at))
        return "\n".join(lines)


def generate(seed: int, backend: str = "directory", seconds: float = 3.0) -> Schedule:
    """A random schedule for `seed` on `backend`, with `seconds` of operations."""
    rnd = random.Random(seed)
    redis = backend == "redis"
    count = rnd.randint(3, 5)
    together = rnd.random() < 0.6
    agents: list[AgentPlan] = []
    for i in range(count):
        start = 0.0 if together else round(rnd.uniform(0, min(1.5, seconds / 2)), 3)
        delays = ""
        if rnd.random() < 0.3:
            delays = rnd.choice(REDIS_DELAYS if redis else DELAYS)
        agents.append(
            AgentPlan(
                f"p{i + 1}",
                start,
                rnd.randrange(1 << 30),
                delays,
                round(rnd.uniform(0.01, 0.04), 3),
            )
        )
    events: list[Event] = []
    live = [a.name for a in agents]

    def at(lo: float = 0.2, hi: float = 0.85) -> float:
        return round(rnd.uniform(seconds * lo, seconds * hi), 3)

    faults = rnd.randint(1, 5)
    joined = 0
    for _ in range(faults):
        kind = rnd.choice(
            ["kill", "kill", "stop", "fork", "loop_end", "join", "cancel_wait", "cancel_wait"]
            + ([] if redis else ["plant", "remove", "lockfile"])
        )
        if kind in ("kill", "stop", "fork", "loop_end", "cancel_wait") and not live:
            continue
        target = rnd.choice(live) if live else ""
        if kind == "kill":
            if len(live) <= 2:
                continue
            live.remove(target)
            events.append(Event(at(), "kill", target))
        elif kind == "stop":
            events.append(Event(at(), "stop", target, {"seconds": round(rnd.uniform(0.1, 1.5), 3)}))
        elif kind == "fork":
            events.append(Event(at(), "fork", target, {"child": round(rnd.uniform(0.2, 2.0), 3)}))
        elif kind == "loop_end":
            if len(live) <= 2:
                continue
            then = rnd.choice(["exit", "sync", "rejoin"])
            if then != "rejoin":
                live.remove(target)
            args = {"then": then, "sync": round(rnd.uniform(0.2, 1.0), 3)}
            events.append(Event(at(), "loop_end", target, args))
        elif kind == "join":
            joined += 1
            name = f"j{joined}"
            agents.append(AgentPlan(name, -1.0, rnd.randrange(1 << 30), "", 0.02))
            live.append(name)
            delays = rnd.choice(("", "", "restore_slice=0.1")) if not redis else ""
            agents[-1].delays = delays
            events.append(Event(at(0.1, 0.6), "join", name))
        elif kind == "cancel_wait":
            what = rnd.choice(["lock", "leader", "memo", "wait_for", "lock_timeout"])
            args = {"what": what, "after": round(rnd.uniform(0.03, 0.4), 3)}
            events.append(Event(at(), "cancel_wait", target, args))
        elif kind == "plant":
            where = rnd.choice(["log", "peers", "locks", "root", "snapshot"])
            events.append(Event(at(), "plant", "", {"where": where, "n": rnd.randrange(1 << 16)}))
        elif kind == "remove":
            what = rnd.choice(["peers_dir", "peer_lock", "peer_sock", "snapshot", "peer_files"])
            events.append(Event(at(), "remove", "", {"what": what, "n": rnd.randrange(1 << 16)}))
        elif kind == "lockfile":
            how = rnd.choice(["unlink", "garbage", "garbage", "directory"])
            events.append(Event(at(), "lockfile", "", {"how": how, "n": rnd.randrange(1 << 16)}))

    # Coordinated operations: every process calls run_once together (item 2's
    # shape: the leader may leave right after its job); lock races whose
    # deadline and release land together (item 3); memoize stampedes with one
    # caller cancelled (item 4).
    for g in range(rnd.randint(0, 2)):
        leave = rnd.choice(["", "", "exit", "end"])
        args = {
            "job": f"job-{g}",
            "job_seconds": round(rnd.uniform(0.05, 0.3), 3),
            "leave": leave,
        }
        events.append(Event(at(0.1, 0.7), "run_once", "*", args))
    for r in range(rnd.randint(0, 2)):
        if len(live) < 2:
            break
        holder, waiter = rnd.sample(live, 2)
        args = {
            "name": f"race{r}",
            "waiter": waiter,
            "hold": round(rnd.uniform(0.1, 0.3), 3),
            "skew": round(rnd.uniform(-0.0002, 0.0012), 5),
            "leader": rnd.random() < 0.3,
        }
        events.append(Event(at(), "lock_race", holder, args))
    if rnd.random() < 0.5 and live:
        args = {
            "key": rnd.randrange(3),
            "cancel_after": round(rnd.uniform(0.05, 0.3), 3),
            "compute": round(rnd.uniform(0.2, 0.6), 3),
            "across": rnd.random() < 0.7,
        }
        events.append(Event(at(), "memo_stampede", rnd.choice(live), args))

    # Every process at the same moment: adds one key (exactly one must win), and
    # increments one counter and read-modify-writes another a few times each.
    # Drawn from a stream of its own, so the draws above stay what they were.
    extra = random.Random(f"{seed}.atomic_race")
    for g in range(extra.randint(1, 2)):
        at_s = round(extra.uniform(seconds * 0.1, seconds * 0.8), 3)
        events.append(Event(at_s, "atomic_race", "*", {"key": f"race{g}", "n": 8}))

    events.sort(key=lambda e: e.at)
    options = dict(REDIS_OPTIONS if redis else DIRECTORY_OPTIONS)
    return Schedule(seed, backend, seconds, agents, events, options)
