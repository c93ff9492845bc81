"""A peer process for the crash soak test (tests/test_soak.py).

Usage: python tests/soak_agent.py DIR AGENT_ID

It joins DIR, prints `start <ns>` (CLOCK_MONOTONIC, shared by all processes)
once it is live, then sends `soak` messages and cache writes as fast as it
reasonably can, printing `ack <seq> <ns>` after each `notify` has returned, where
<ns> is when that `notify` was called: a record written before a receiver went live
is part of the past it loaded, not a message it must get. Commands
on stdin: `quiet` stops sending; `report` prints one JSON line with what it
received (per sender, in arrival order) and its cache mirror; `exit` leaves.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from typing import Any

from ivip_ipc_async import AsyncCache, AsyncIPC

OPTIONS: dict[str, Any] = {
    "retention": 1.0,
    "rescan_interval": 0.1,
    "snapshot_interval": 0.2,
    "segment_bytes": 64 * 1024,
    "max_footprint": 4 << 20,
}


async def main(path: str, me: str) -> None:
    received: dict[str, list[int]] = {}

    def on_soak(message: dict[str, Any]) -> None:
        received.setdefault(message["s"], []).append(message["q"])

    async with AsyncIPC(path, **OPTIONS) as ipc:
        cache = AsyncCache(ipc, default_ttl=0)
        ipc.on("soak", on_soak)
        print(f"start {time.monotonic_ns()}", flush=True)
        sending = True
        commands: asyncio.Queue[str] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        pending = b""

        def on_stdin() -> None:
            # Raw reads: a buffered readline() could swallow the next command.
            nonlocal pending
            chunk = os.read(sys.stdin.fileno(), 4096)
            if not chunk:
                commands.put_nowait("")
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                commands.put_nowait(line.decode())

        loop.add_reader(sys.stdin.fileno(), on_stdin)
        seq = 0
        rnd = random.Random(me)
        while True:
            while not commands.empty():
                command = commands.get_nowait().strip()
                if command == "quiet":
                    sending = False
                elif command == "report":
                    state = {
                        str(k): await cache.get(k) for k in sorted(await cache.keys(), key=str)
                    }
                    stats = {k: v for k, v in ipc.stats().items() if isinstance(v, int)}
                    print(
                        json.dumps({"received": received, "cache": state, "stats": stats}),
                        flush=True,
                    )
                elif command in ("exit", ""):
                    loop.remove_reader(sys.stdin.fileno())
                    return
            if not sending:
                await asyncio.sleep(0.01)
                continue
            seq += 1
            called_ns = time.monotonic_ns()
            await ipc.notify("soak", {"s": me, "q": seq})
            print(f"ack {seq} {called_ns}", flush=True)
            if seq % 5 == 0:
                await cache.set(f"k{rnd.randrange(20)}", {"by": me, "q": seq})
            if rnd.random() < 0.2:
                await asyncio.sleep(rnd.random() * 0.004)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
