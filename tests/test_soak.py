"""Crash soak: peers send and write the cache while a supervisor SIGKILLs them.

Six peer processes (tests/soak_agent.py) send messages and set cache keys
concurrently; every 200-500 ms one of them is killed with SIGKILL and a new one
is started. At the end, every surviving process must have received every
message that any sender acknowledged (its `notify` returned) and had begun to
send after the survivor was live, in each sender's order; all cache mirrors must be
equal; the directory must be within its size cap; and the files of every dead
process must be collected by the living.

`IVIP_SOAK_SECONDS` sets the duration (default 20; longer runs: e.g. 300).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .processes import reap

AGENT = str(Path(__file__).with_name("soak_agent.py"))
SECONDS = float(os.environ.get("IVIP_SOAK_SECONDS", "20"))
PEERS = 6
FOOTPRINT_CAP = 4 << 20  # the agents' max_footprint


@dataclass
class Agent:
    name: str
    proc: asyncio.subprocess.Process
    started_ns: int | None = None
    acks: list[tuple[int, int]] = field(default_factory=list)  # (seq, ns notify was called)
    reports: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    reader: asyncio.Task[None] | None = None
    killed: bool = False
    live: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode().strip()
            if text.startswith("ack "):
                _, seq, ns = text.split()
                self.acks.append((int(seq), int(ns)))
            elif text.startswith("start "):
                self.started_ns = int(text.split()[1])
                self.live.set()
            elif text.startswith("{"):
                self.reports.put_nowait(json.loads(text))

    async def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def report(self) -> dict[str, Any]:
        await self.send("report")
        return await asyncio.wait_for(self.reports.get(), 15)


async def _start(ipc_dir: Path, name: str) -> Agent:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        AGENT,
        str(ipc_dir),
        name,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=1 << 26,  # a report is one long JSON line
    )
    agent = Agent(name, proc)
    agent.reader = asyncio.create_task(agent.read())
    await asyncio.wait_for(agent.live.wait(), 15)
    return agent


def _missing(survivor: Agent, report: dict[str, Any], agents: list[Agent]) -> int:
    """Acknowledged messages the survivor should have and has not."""
    assert survivor.started_ns is not None
    missing = 0
    for sender in agents:
        if sender is survivor:
            continue
        got = set(report["received"].get(sender.name, []))
        missing += sum(1 for seq, ns in sender.acks if ns > survivor.started_ns and seq not in got)
    return missing


@pytest.mark.once_per_ci
@pytest.mark.timeout(SECONDS + 120)
async def test_crash_soak(ipc_dir: Path) -> None:
    rnd = random.Random(7)
    agents: list[Agent] = []
    counter = 0

    async def spawn() -> None:
        nonlocal counter
        counter += 1
        agents.append(await _start(ipc_dir, f"a{counter}"))

    try:
        for _ in range(PEERS):
            await spawn()
        loop = asyncio.get_running_loop()
        end = loop.time() + SECONDS
        kills = 0
        while loop.time() < end:
            await asyncio.sleep(rnd.uniform(0.2, 0.5))
            victim = rnd.choice([a for a in agents if not a.killed])
            victim.proc.send_signal(signal.SIGKILL)
            victim.killed = True
            kills += 1
            await spawn()
        survivors = [a for a in agents if not a.killed]
        for agent in survivors:
            await agent.send("quiet")
        for agent in agents:
            if agent.killed:
                await agent.proc.wait()
                assert agent.reader is not None
                await agent.reader  # every ack the dead printed is in

        # Every survivor gets every acknowledged message (deadline, not a sleep).
        deadline = loop.time() + 30
        while True:
            reports = {a.name: await a.report() for a in survivors}
            missing = {a.name: _missing(a, reports[a.name], agents) for a in survivors}
            caches = [json.dumps(r["cache"], sort_keys=True) for r in reports.values()]
            if not any(missing.values()) and len(set(caches)) == 1:
                break
            if loop.time() >= deadline:
                stats = {n: r["stats"] for n, r in reports.items()}
                raise AssertionError(f"missing acknowledged messages: {missing}; stats: {stats}")
            await asyncio.sleep(0.2)

        for name, report in reports.items():  # per-sender order
            for sender, seqs in report["received"].items():
                assert seqs == sorted(seqs), f"{name} got {sender}'s messages out of order"
                assert len(seqs) == len(set(seqs)), f"{name} got duplicates from {sender}"

        # The dead are collected by the living, and the footprint is bounded.
        live_ids = set()
        ns = ipc_dir / "default"
        while True:
            locks = {p.stem for p in (ns / "peers").glob("*.lock")}
            writers = {p.name.split("-")[0] for p in (ns / "log").glob("*.seg")}
            live_ids = set()
            for x in locks:
                with contextlib.suppress(FileNotFoundError):  # collected meanwhile
                    live_ids.add(json.loads((ns / "peers" / f"{x}.lock").read_text())["pid"])
            if live_ids == {a.proc.pid for a in survivors} and writers <= locks:
                break
            assert loop.time() < deadline + 30, f"dead peers not collected: {locks}"
            await asyncio.sleep(0.2)
        footprint = sum(p.stat().st_size for p in ns.rglob("*") if p.is_file())
        assert footprint <= FOOTPRINT_CAP + (1 << 20)

        sent = sum(len(a.acks) for a in agents)
        print(
            f"\nsoak: {SECONDS:.0f}s, {sent} acknowledged messages, {kills} kills, "
            f"{len(survivors)} survivors, 0 lost, footprint {footprint} bytes"
        )
    finally:
        for agent in agents:
            await reap(agent.proc)
            if agent.reader is not None:
                agent.reader.cancel()
                await asyncio.gather(agent.reader, return_exceptions=True)
