"""Verifies the README's guarantees and the coordination promises on a history.

`check(history)` returns the violations, each a readable sentence naming the
process (or its life, `<process>.<n>`), the operation and the times (seconds
after t0). The checks:

* **delivery** (guarantee 1): every acknowledged message reaches every peer
  that was live before the send began (its `start()` had returned) and stayed
  up for the delivery window after the ack (a survivor: until its last dump),
  unless that peer reported a gap covering it (`ivip:gap` from that sender, or
  of unknown origin, after the send and by the peer's delivery horizon; one
  that says how many records of that sender were lost excuses no more);
* **order** and **duplicates** (guarantee 2), and no message that was never sent;
* **convergence** (guarantee 3): the last mirrors of all survivors are equal,
  and each key's value is one that last-writer-wins allows: not a write that an
  acknowledged write begun after it was acknowledged supersedes;
* **locks**: holding intervals of one lock never overlap (on Redis, where a
  paused holder may lose its lease, its claims of `held` never fall inside
  another's holding), and fences grow strictly with each holding;
* **run_once**: one job at a time; never run again for a caller that was waiting
  when it finished, nor while its leader lives; False only once a job finished;
* **memoize**: no two computations of a key at once, nor again while the result
  is in the cache, unless the computing process died or was paused;
* **cancellation**: a cancelled wait raises and holds nothing; a deadline that
  fired is never lost; cancelling one memoize caller cancels no other;
* **add, incr, versioned writes**: one `add` wins per key and every caller
  reads the winner's value; no two acknowledged increments or versioned
  writes return the same value, and a counter ends between its acknowledged
  updates and those plus the ones never acknowledged (killed processes);
* **errors**: no operation fails with an error nobody asked for; `start()`
  returns; no process crashes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .history import History

__all__ = ["DELIVERY_WINDOW", "Violation", "check"]

DELIVERY_WINDOW = 3.0  # seconds a peer that later died must have had to get a message
LWW_MARGIN = 0.010  # s: a write begun this long after another's ack has a later clock
MEMO_TTL = 1.0  # the agents' memoize TTL
START_DEADLINE = 15.0  # s: start() must return within this


@dataclass
class Violation:
    kind: str
    message: str
    eventual: bool = False  # may still come true (delivery, convergence): retried while settling

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


@dataclass
class Node:
    """One life of an instance in a process."""

    name: str
    proc: str
    call: int  # start() called
    started: int | None = None  # start() returned
    peer: str | None = None
    end: int | None = None  # killed, loop ended, left
    end_why: str = ""
    last_dump: dict[str, Any] | None = None
    stopped: list[tuple[int, int]] = field(default_factory=list)

    def alive_at(self, t: int) -> bool:
        return self.started is not None and self.started <= t and (self.end is None or t < self.end)

    def stopped_between(self, a: int, b: int) -> int:
        return sum(max(0, min(b, y) - max(a, x)) for x, y in self.stopped)


class Checker:
    def __init__(self, history: History, final: bool) -> None:
        self.h = history
        self.final = final
        self.redis = history.backend == "redis"
        self.out: list[Violation] = []
        self.t0 = next((r["t"] for r in history.driver if r["ev"] == "t0"), 0)
        self.nodes: dict[str, Node] = {}
        self._nodes()

    def at(self, t: int | None) -> str:
        return "?" if t is None else f"t+{(t - self.t0) / 1e9:.3f}s"

    def add(self, kind: str, message: str, eventual: bool = False) -> None:
        self.out.append(Violation(kind, message, eventual))

    # -- lives --------------------------------------------------------------------------

    def _nodes(self) -> None:
        current: dict[str, Node] = {}
        kills: dict[str, int] = {}
        stops: dict[str, list[tuple[int, int]]] = defaultdict(list)
        open_stop: dict[str, int] = {}
        end_of_run = self.h.records[-1]["t"] if self.h.records else 0
        for r in self.h.driver:
            target = str(r.get("target", ""))
            if r["ev"] == "kill" and target:
                kills.setdefault(target, r["t"])
            elif r["ev"] == "stop":
                open_stop[target] = r["t"]
            elif r["ev"] == "cont" and target in open_stop:
                stops[target].append((open_stop.pop(target), r["t"]))
        for target, t in open_stop.items():
            stops[target].append((t, end_of_run))
        for r in self.h.records:
            if r["p"] == "driver":
                continue
            proc, ev = r["p"], r["ev"]
            if ev == "start_call":
                node = Node(r["n"], proc, r["t"], stopped=stops.get(proc, []))
                self.nodes[node.name] = node
                current[proc] = node
                continue
            node_or_none = self.nodes.get(r.get("n", ""))
            if node_or_none is None:
                continue
            node = node_or_none
            if ev == "started":
                node.started, node.peer = r["t"], r.get("peer")
            elif ev in ("loop_end", "leave", "destroy", "exit") and node.end is None:
                node.end, node.end_why = r["t"], ev
            elif ev == "dump":
                node.last_dump = r
        for proc, t in kills.items():
            node_for = current.get(proc)
            for node in self.nodes.values():
                if node.proc == proc and node.end is None and node.call <= t:
                    node.end, node.end_why = t, "killed"
            del node_for

    def survivors(self) -> list[Node]:
        """Lives that took part in the last round of dumps."""
        last_round = max((r["t"] for r in self.h.driver if r["ev"] == "dump"), default=None)
        if last_round is None:
            return []
        return [
            n
            for n in self.nodes.values()
            if n.last_dump is not None
            and n.last_dump["t"] >= last_round
            and (n.end is None or n.end > n.last_dump["t"])
        ]

    # -- errors -------------------------------------------------------------------------

    def errors(self) -> None:
        # A lock whose file the driver replaced by a directory is refused with a
        # clear error naming the path (docs/coordination.md): expected, not a fault.
        planted = [
            (r["t"], r["did"].split()[1])
            for r in self.h.driver
            if r["ev"] == "lockfile" and str(r.get("did", "")).endswith("by a directory")
        ]
        for r in self.h.records:
            if r["ev"] == "op_error":
                if r["error"] == "UnsafeDirectoryError" and any(
                    t <= r["t"] and path in r["message"] for t, path in planted
                ):
                    continue
                self.add(
                    "error",
                    f"{r['n']}: {r['op']} raised {r['error']} at {self.at(r['t'])}: {r['message']}",
                )
        horizon = self.h.records[-1]["t"] if self.h.records else 0
        for node in self.nodes.values():
            if node.started is None:
                lived_until = node.end or horizon
                if lived_until - node.call > START_DEADLINE * 1e9 or (
                    self.final and node.end is None
                ):
                    self.add(
                        "start",
                        f"{node.name}: start() called at {self.at(node.call)} never returned "
                        f"(until {self.at(lived_until)})",
                    )
        if not self.final:
            return
        killed = {r.get("target") for r in self.h.driver if r["ev"] == "kill"}
        for r in self.h.driver:
            if r["ev"] == "exited" and r.get("code") not in (0, None) and r["target"] not in killed:
                tail = self.h.stderr.get(r["target"], "").strip().splitlines()[-3:]
                self.add(
                    "crash",
                    f"{r['target']} exited with code {r['code']}: {' | '.join(tail)}",
                )

    # -- messages -------------------------------------------------------------------------

    def messages(self) -> None:
        sends: dict[tuple[str, int], int] = {}
        acks: dict[tuple[str, int], int] = {}
        for r in self.h.records:
            if r["ev"] == "send":
                for q in r["qs"]:
                    sends[(r["n"], q)] = r["t"]
            elif r["ev"] == "ack":
                for q in r["qs"]:
                    acks[(r["n"], q)] = r["t"]
        received: dict[str, dict[str, list[tuple[int, int]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        gaps: dict[str, list[tuple[int, str | None, int | None]]] = defaultdict(list)
        for r in self.h.records:
            if r["ev"] == "recv":
                received[r["n"]][str(r["s"])].append((r["q"], r["t"]))
            elif r["ev"] == "gap":
                lost = r.get("lost")
                gaps[r["n"]].append((r["t"], r.get("peer"), lost if type(lost) is int else None))
        peer_of = {n.name: n.peer for n in self.nodes.values()}
        survivors = {n.name for n in self.survivors()}

        for rname, by_sender in received.items():
            for sname, got in by_sender.items():
                last = 0
                seen: set[int] = set()
                for q, t in got:
                    if (sname, q) not in sends:
                        self.add(
                            "phantom", f"{rname} received {sname}#{q} at {self.at(t)}: never sent"
                        )
                    if q in seen:
                        self.add("duplicate", f"{rname} received {sname}#{q} again at {self.at(t)}")
                    elif q < last:
                        self.add(
                            "order",
                            f"{rname} received {sname}#{q} at {self.at(t)} after #{last}",
                        )
                    seen.add(q)
                    last = max(last, q)

        # Acknowledged messages a receiver owed and never got, per (receiver, sender):
        # (t_send, t_ack, q), and the receiver's delivery horizon.
        unreceived: dict[tuple[str, str], list[tuple[int, int, int]]] = defaultdict(list)
        horizons: dict[str, int] = {}
        for (sname, q), t_ack in sorted(acks.items()):
            t_send = sends[(sname, q)]
            for rnode in self.nodes.values():
                if rnode.name == sname or rnode.started is None or rnode.started >= t_send:
                    continue
                if rnode.name in survivors and rnode.last_dump is not None:
                    horizon = rnode.last_dump["t"]
                    window = 0.0
                else:
                    if rnode.end is None:
                        continue  # still running, not in the last dumps: nothing to judge
                    horizon = rnode.end
                    window = DELIVERY_WINDOW * 1e9
                if t_ack + window + rnode.stopped_between(t_send, horizon) > horizon:
                    continue
                have = {q2 for q2, t in received[rnode.name].get(sname, []) if t <= horizon}
                if q in have:
                    continue
                unreceived[(rnode.name, sname)].append((t_send, t_ack, q))
                horizons[rnode.name] = horizon
        for (rname, sname), owed in sorted(unreceived.items()):
            qs = self._not_excused(owed, gaps[rname], peer_of.get(sname), horizons[rname])
            if not qs:
                continue
            t_send, t_ack, _ = next(m for m in owed if m[2] == qs[0])
            rnode = self.nodes[rname]
            self.add(
                "lost",
                f"{rname} (live from {self.at(rnode.started)}) never received {len(qs)} "
                f"acknowledged message(s) of {sname} (first #{qs[0]}, sent {self.at(t_send)}, "
                f"acknowledged {self.at(t_ack)}), and no gap it reported covers them",
                eventual=True,
            )

    @staticmethod
    def _not_excused(
        owed: list[tuple[int, int, int]],
        gaps: list[tuple[int, str | None, int | None]],
        sender_peer: str | None,
        horizon: int,
    ) -> list[int]:
        """The numbers of the messages in `owed` (t_send, t_ack, q) that no gap
        the receiver reported excuses. A gap excuses messages sent before it, if
        reported by the receiver's delivery `horizon`, and from this sender: at
        most `lost` of them when the gap names the sender's peer and says how
        many; any number when that is unknown (`lost` None, a gap of unknown
        origin, or Redis's, which counts stream entries: a batch is one). Each
        gap takes the latest messages sent before it first (a gap is found at the
        next record read after the lost ones), which excuses the most."""
        usable = sorted(
            (tg, lost if peer == sender_peer else None)
            for tg, peer, lost in gaps
            if tg <= horizon and peer in (sender_peer, "redis", None)
        )
        left: list[int] = []
        room, unlimited = 0, False
        for t_send, _, q in sorted(owed, reverse=True):
            while usable and usable[-1][0] > t_send:
                lost = usable.pop()[1]
                unlimited = unlimited or lost is None
                room += lost or 0
            if unlimited:
                continue
            if room > 0:
                room -= 1
                continue
            left.append(q)
        return sorted(left)

    # -- the cache ----------------------------------------------------------------------

    def cache(self) -> None:
        survivors = self.survivors()
        if not survivors:
            return
        writes: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        for r in self.h.records:
            if r["ev"] in ("set", "del"):
                writes[r["key"]][r["w"]] = {
                    "kind": r["ev"],
                    "begin": r["t"],
                    "ack": None,
                    "n": r["n"],
                }
            elif r["ev"] in ("set_ack", "del_ack"):
                writes[r["key"]][r["w"]]["ack"] = r["t"]
        mirrors = {n.name: (n.last_dump or {}).get("kv", {}) for n in survivors}
        reference_name = min(mirrors)
        reference = mirrors[reference_name]
        for name, mirror in sorted(mirrors.items()):
            if mirror != reference:
                keys = sorted(set(mirror) | set(reference))
                differ = [k for k in keys if mirror.get(k) != reference.get(k)]
                shown = ", ".join(f"{k}: {mirror.get(k)} vs {reference.get(k)}" for k in differ[:4])
                self.add(
                    "diverged",
                    f"the mirrors of {name} and {reference_name} differ on "
                    f"{len(differ)} key(s) ({shown})",
                    eventual=True,
                )
        for name, mirror in sorted(mirrors.items()):
            for key in sorted(set(writes) | set(mirror)):
                self._lww(name, key, mirror.get(key), writes.get(key, {}))

    def _lww(self, name: str, key: str, value: Any, writes: dict[str, dict[str, Any]]) -> None:
        margin = LWW_MARGIN * 1e9

        def done_by(w: dict[str, Any]) -> int | None:
            if w["ack"] is not None:
                return int(w["ack"])
            node = self.nodes.get(w["n"])
            return node.end if node is not None else None

        acked = [w for w in writes.values() if w["ack"] is not None]

        def superseded(w: dict[str, Any]) -> dict[str, Any] | None:
            done = done_by(w)
            if done is None:
                return None
            for w2 in acked:
                if w2["begin"] > done + margin:
                    return w2
            return None

        candidates = {wid: w for wid, w in writes.items() if superseded(w) is None}
        if value is None:
            deletable = any(w["kind"] == "del" for w in candidates.values())
            acked_sets = [wid for wid, w in candidates.items() if w["kind"] == "set" and w["ack"]]
            if acked_sets and not deletable:
                wid = acked_sets[0]
                self.add(
                    "lww",
                    f"{name}: key {key} is missing, but the acknowledged write {wid} "
                    f"({self.at(candidates[wid]['ack'])}) is superseded by nothing",
                    eventual=True,
                )
            return
        if value not in writes:
            self.add("lww", f"{name}: key {key} holds {value!r}, which no process wrote")
            return
        w = writes[value]
        if w["kind"] != "set":
            self.add("lww", f"{name}: key {key} holds {value!r}, which was a delete")
            return
        later = superseded(w)
        if later is not None:
            later_id = next(k for k, v in writes.items() if v is later)
            self.add(
                "lww",
                f"{name}: key {key} holds {value} (acknowledged {self.at(w['ack'])}), but "
                f"{later_id} began after it ({self.at(later['begin'])}) and was acknowledged",
                eventual=True,
            )

    # -- add, incr, the versioned write ------------------------------------------------

    def atomic(self) -> None:
        """`add`: at most one winner per key, and every process read the winner's
        value when its call returned; `incr` and the versioned read-modify-write:
        no two acknowledged updates returned the same value (a lost update), and
        each counter ends between its acknowledged updates and those plus the
        ones never acknowledged (calls cut short by a kill, an ended loop or an
        error)."""
        calls: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)  # key -> id -> call
        for r in self.h.records:
            ev = r["ev"]
            if ev in ("add_call", "incr_call", "cas_call"):
                op_id = r.get("w") or r.get("i")
                calls[r["key"]][op_id] = {"ev": ev, "t": r["t"], "n": r["n"], "ret": None}
            elif ev in ("add_ret", "incr_ret", "cas_ret", "cas_giveup"):
                op_id = r.get("w") or r.get("i")
                call = calls[r["key"]].get(op_id)
                if call is not None:
                    call["ret"] = r
        survivors = self.survivors()
        finals = {n.name: (n.last_dump or {}).get("atomic", {}) for n in survivors}
        for key, ops in sorted(calls.items()):
            kinds = {c["ev"] for c in ops.values()}
            if kinds == {"add_call"}:
                self._add(key, ops, finals)
            else:
                self._counter(key, ops, finals)

    def _add(
        self, key: str, ops: dict[str, dict[str, Any]], finals: dict[str, dict[str, Any]]
    ) -> None:
        rets = [c["ret"] for c in ops.values() if c["ret"] is not None]
        winners = [r for r in rets if r["won"]]
        if len(winners) > 1:
            self.add(
                "add",
                f"key {key}: {len(winners)} add calls won ("
                + ", ".join(f"{r['n']} at {self.at(r['t'])}" for r in winners)
                + ")",
            )
        seen = {repr(r["seen"]) for r in rets}
        if len(seen) > 1:
            self.add(
                "add",
                f"key {key}: processes read different values when their add returned: "
                + ", ".join(f"{r['n']} {r['seen']!r}" for r in rets[:6]),
            )
        agreed = winners[0]["w"] if winners else (rets[0]["seen"] if rets else None)
        if rets and not winners:
            # The winner never learnt it won (killed, its loop ended): it must be a
            # call that never returned.
            unreturned = {w for w, c in ops.items() if c["ret"] is None}
            if agreed not in unreturned:
                self.add(
                    "add",
                    f"key {key}: every add returned False, and they read {agreed!r}, "
                    "which no unfinished add call wrote",
                )
        for name, final in sorted(finals.items()):
            value = final.get(key)
            if agreed is not None and value != agreed:
                self.add(
                    "add",
                    f"{name}: key {key} holds {value!r} at the end, not the winner's {agreed!r}",
                    eventual=True,
                )
            elif agreed is None and value is not None and value not in ops:
                self.add("add", f"{name}: key {key} holds {value!r}, which no add wrote")

    def _counter(
        self, key: str, ops: dict[str, dict[str, Any]], finals: dict[str, dict[str, Any]]
    ) -> None:
        acked = [c["ret"] for c in ops.values() if c["ret"] is not None and "v" in c["ret"]]
        unsure = sum(1 for c in ops.values() if c["ret"] is None)
        by_value: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in acked:
            by_value[int(r["v"])].append(r)
        for value, rs in sorted(by_value.items()):
            if len(rs) > 1:
                self.add(
                    "lost_update",
                    f"key {key}: {len(rs)} acknowledged updates all returned {value} ("
                    + ", ".join(f"{r['n']} at {self.at(r['t'])}" for r in rs[:4])
                    + ")",
                )
        for name, final in sorted(finals.items()):
            value = int(final.get(key) or 0)
            top = max(by_value, default=0)
            if value < len(acked) or value < top or value > len(acked) + unsure:
                self.add(
                    "lost_update",
                    f"{name}: key {key} ends at {value}, with {len(acked)} acknowledged "
                    f"updates (largest result {top}) and {unsure} never acknowledged",
                    eventual=value < len(acked) or value < top,
                )

    # -- locks ----------------------------------------------------------------------------

    def locks(self) -> None:
        intervals: dict[tuple[str, str], list[tuple[int, int, str, int]]] = defaultdict(list)
        opened: dict[tuple[str, str, str], tuple[int, int]] = {}
        claims: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
        for r in self.h.records:
            ev = r["ev"]
            if ev not in ("lock_acq", "lock_rel_begin", "claim"):
                continue
            lock = (r["kind"], r["name"])
            key = (r["n"], r["kind"], r["name"])
            if ev == "claim":
                claims[lock].append((r["t"], r["n"]))
            elif ev == "lock_acq":
                if key in opened:
                    t_prev, _ = opened[key]
                    self.add(
                        "exclusive",
                        f"{r['n']} acquired lock {lock[0]}.{lock[1]} at {self.at(r['t'])} "
                        f"while another of its objects held it since {self.at(t_prev)}",
                    )
                opened[key] = (r["t"], int(r.get("fence") or 0))
            elif key in opened:
                t_acq, fence = opened.pop(key)
                intervals[lock].append((t_acq, r["t"], r["n"], fence))
        for (node_name, kind, name), (t_acq, fence) in opened.items():
            node = self.nodes.get(node_name)
            end = node.end if node is not None and node.end is not None else None
            if end is None:
                end = self.h.records[-1]["t"]
            intervals[(kind, name)].append((t_acq, end, node_name, fence))

        for lock, spans in sorted(intervals.items()):
            spans.sort()
            label = f"{lock[0]}.{lock[1]}"
            last_fence, last_by = 0, ""
            for a, _, who, fence in spans:
                if fence <= last_fence:
                    self.add(
                        "fence",
                        f"lock {label}: {who} got fence {fence} at {self.at(a)}, "
                        f"not above {last_by}'s {last_fence}",
                    )
                last_fence, last_by = fence, who
            if not self.redis:
                for i, (a1, b1, w1, f1) in enumerate(spans):
                    for a2, _, w2, f2 in spans[i + 1 :]:
                        if a2 >= b1:
                            break
                        if w1 != w2:
                            self.add(
                                "exclusive",
                                f"lock {label}: {w2} acquired it at {self.at(a2)} (fence {f2}) "
                                f"while {w1} held it ({self.at(a1)}-{self.at(b1)}, fence {f1})",
                            )
            for t, who in claims.get(lock, []):
                for a, b, holder, fence in spans:
                    if holder != who and a < t < b:
                        self.add(
                            "exclusive",
                            f"lock {label}: {who} still held it at {self.at(t)} while {holder} "
                            f"held it ({self.at(a)}-{self.at(b)}, fence {fence})",
                        )
                        break

    # -- run_once ---------------------------------------------------------------------------

    def run_once(self) -> None:
        jobs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in self.h.records:
            if r["ev"] in ("ro_call", "ro_ret", "job_start", "job_end"):
                jobs[r["job"]].append(r)
        for job, recs in sorted(jobs.items()):
            calls = {r["n"]: r["t"] for r in recs if r["ev"] == "ro_call"}
            done = {r["n"]: r["t"] for r in recs if r["ev"] == "ro_ret" and r["ran"]}
            ends = [r for r in recs if r["ev"] == "job_end"]
            starts = [r for r in recs if r["ev"] == "job_start"]
            running: dict[str, int] = {}
            for r in recs:
                if r["ev"] == "job_start":
                    for other, t in running.items():
                        node = self.nodes.get(other)
                        if node is None or node.end is None or node.end > r["t"]:
                            self.add(
                                "run_once",
                                f"{job}: {r['n']} started it at {self.at(r['t'])} while {other} "
                                f"was running it (since {self.at(t)})",
                            )
                    running[r["n"]] = r["t"]
                elif r["ev"] == "job_end":
                    running.pop(r["n"], None)
            for r in starts:
                for first, t_done in done.items():
                    if first == r["n"] or t_done >= r["t"]:
                        continue
                    called = calls.get(r["n"], r["t"])
                    leader = self.nodes.get(first)
                    if called < t_done:
                        self.add(
                            "run_once",
                            f"{job}: {r['n']} ran it again at {self.at(r['t'])}, though it was "
                            f"waiting (called {self.at(called)}) when {first} finished it "
                            f"({self.at(t_done)}; {first} {leader.end_why if leader else ''} "
                            f"at {self.at(leader.end if leader else None)})",
                        )
                    elif leader is not None and (leader.end is None or leader.end > called):
                        if self.redis and leader.stopped_between(t_done, called + 1) > 0:
                            continue  # a paused leader's lease may have run out
                        self.add(
                            "run_once",
                            f"{job}: {r['n']} ran it again at {self.at(r['t'])} while {first}, "
                            f"which finished it at {self.at(t_done)}, still lived",
                        )
            first_end = min((r["t"] for r in ends), default=None)
            for r in recs:
                if (
                    r["ev"] == "ro_ret"
                    and not r["ran"]
                    and (first_end is None or first_end > r["t"])
                ):
                    self.add(
                        "run_once",
                        f"{job}: run_once returned False in {r['n']} at {self.at(r['t'])}, "
                        "before any process finished the job",
                    )

    # -- memoize ----------------------------------------------------------------------------

    def memoize(self) -> None:
        comps: dict[str, list[dict[str, Any]]] = defaultdict(list)
        returned: dict[str, int] = {}
        called: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for r in self.h.records:
            if r["ev"] == "memo_compute":
                comps[r["key"]].append({"n": r["n"], "begin": r["t"], "c": r["c"], "end": None})
            elif r["ev"] == "memo_computed":
                for c in comps[r["key"]]:
                    if c["c"] == r["c"]:
                        c["end"] = r["t"]
            elif r["ev"] == "memo_ret":
                if r.get("c") is not None:
                    returned.setdefault(r["c"], r["t"])
            elif r["ev"] == "memo_call":
                called[r["n"]].append((r["t"], r["key"]))
        for key, cs in sorted(comps.items()):
            if key.startswith(("st", "cw-")):
                continue  # stampede and cancellation keys: judged by their outcomes
            for i, a in enumerate(cs):
                a_node = self.nodes.get(a["n"])
                for b in cs[i + 1 :]:
                    if b["n"] == a["n"] and self._same_call(a, b):
                        continue
                    excused = (
                        a_node is not None
                        and a_node.end is not None
                        and (a["end"] is None or a_node.end < b["begin"] + 1)
                    )
                    a_end = a["end"] if a["end"] is not None else (a_node.end if a_node else None)
                    if excused or a_end is None:
                        continue
                    paused = a_node is not None and a_node.stopped_between(a["begin"], b["begin"])
                    if b["begin"] < a_end and b["n"] != a["n"]:
                        if not paused:
                            self.add(
                                "memoize",
                                f"key {key}: {b['n']} computed it at {self.at(b['begin'])} while "
                                f"{a['n']} was computing it ({self.at(a['begin'])}-"
                                f"{self.at(a['end'])})",
                            )
                        continue
                    t_ret = returned.get(a["c"])
                    b_call = max(
                        (t for t, k in called.get(b["n"], []) if k == key and t <= b["begin"]),
                        default=b["begin"],
                    )
                    if (
                        t_ret is not None
                        and a["end"] is not None
                        and b_call > t_ret + 0.2e9
                        and b["begin"] < a["end"] + (MEMO_TTL - 0.2) * 1e9
                    ):
                        self.add(
                            "memoize",
                            f"key {key}: {b['n']} computed it again at {self.at(b['begin'])} "
                            f"(called {self.at(b_call)}), though {a['n']}'s result of "
                            f"{self.at(a['end'])} was returned at {self.at(t_ret)} and lives "
                            f"{MEMO_TTL} s",
                        )

    @staticmethod
    def _same_call(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return False

    # -- cancellation -----------------------------------------------------------------------

    def cancellation(self) -> None:
        for r in self.h.records:
            ev = r["ev"]
            if ev == "timeout_swallowed":
                self.add(
                    "cancel",
                    f"{r['n']}: a wait for lock {r['what']} returned with the lock at "
                    f"{self.at(r['t'])} though its deadline had fired (the TimeoutError was lost)",
                )
            elif ev == "cancel_result":
                what = r["what"]
                if r.get("sent") and r.get("outcome") == "returned":
                    self.add(
                        "cancel",
                        f"{r['n']}: a {what} wait cancelled while waiting returned normally "
                        f"at {self.at(r['t'])} (the cancellation was swallowed)",
                    )
                elif r.get("outcome") not in ("cancelled", "returned", "timeout", "acquired"):
                    self.add(
                        "cancel",
                        f"{r['n']}: a cancelled {what} wait raised {r.get('outcome')} "
                        f"at {self.at(r['t'])}",
                    )
                if r.get("held") and (r.get("sent") or r.get("outcome") == "timeout"):
                    self.add(
                        "cancel",
                        f"{r['n']}: after its {what} wait was cancelled at {self.at(r['t'])}, "
                        "it still held the lock",
                    )
                if r.get("listeners"):
                    self.add(
                        "cancel",
                        f"{r['n']}: a cancelled wait_for left {r['listeners']} listener(s)",
                    )
            elif ev == "stampede_result":
                if r["outcome"] == "cancelled" and not r["cancelled_by_us"]:
                    self.add(
                        "cancel",
                        f"{r['n']}: memoize caller {r['caller']} of {r['key']} got "
                        f"CancelledError at {self.at(r['t'])}, though only caller 0 was cancelled",
                    )
                elif r["outcome"] not in ("ok", "cancelled"):
                    self.add(
                        "cancel",
                        f"{r['n']}: memoize caller {r['caller']} of {r['key']} raised "
                        f"{r['outcome']} at {self.at(r['t'])}",
                    )

    def run(self) -> list[Violation]:
        self.errors()
        self.messages()
        self.cache()
        self.atomic()
        self.locks()
        self.run_once()
        self.memoize()
        self.cancellation()
        return self.out


def check(history: History, final: bool = True) -> list[Violation]:
    """The violations in `history` (`final`: the run is over, every process gone)."""
    if not history.records:
        return [Violation("empty", "no process logged anything")]
    return Checker(history, final).run()
