"""How long one message takes to reach another process, with and without doorbells.

Doorbells are unix sockets in the shared directory: a writer rings its peers
after each write. Without them (`doorbell=False`, or a directory path too long
for a socket), a peer wakes up when its directory watcher reports the change
(inotify on Linux; `IVIP_IPC_WATCHER=watchfiles` measures the watchfiles thread). This sends
messages one at a time, at random intervals, to a listener in another process,
and prints the delivery latency both ways (the figures in docs/caveats.md):

    python -m examples.wakeups [--messages 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from ivip_ipc_async import AsyncIPC

LISTENER = r"""
import asyncio, json, sys, time
from ivip_ipc_async import AsyncIPC

async def listen():
    path, doorbell, count = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
    async with AsyncIPC(path, doorbell=doorbell) as ipc:
        latencies, done = [], asyncio.Event()

        def on_message(sent_at):
            latencies.append(time.time() - sent_at)
            if len(latencies) == count:
                done.set()

        ipc.on("t", on_message)
        print("ready", flush=True)
        await done.wait()
        print(json.dumps(latencies), flush=True)

asyncio.run(listen())
"""


async def measure(doorbell: bool, count: int) -> list[float]:
    """Latencies in ms of `count` messages sent one at a time to another process."""
    path = tempfile.mkdtemp(prefix="ivip-wake-", dir="/dev/shm")
    listener = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LISTENER, path, "1" if doorbell else "0", str(count),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert listener.stdout is not None
        if (await listener.stdout.readline()).strip() != b"ready":
            raise RuntimeError("the listener did not start")
        async with AsyncIPC(path, doorbell=doorbell) as ipc:
            await asyncio.sleep(0.5)  # let its watcher settle
            for _ in range(count):
                await ipc.notify("t", time.time())
                await asyncio.sleep(random.uniform(0.1, 0.3))  # not in step with a poll
            out = await listener.stdout.readline()
        return [1000 * x for x in json.loads(out)]
    finally:
        if listener.returncode is None:
            listener.kill()
        await listener.wait()
        shutil.rmtree(path, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=60)
    count = parser.parse_args().messages
    for doorbell in (True, False):
        ms = await measure(doorbell, count)
        print(
            f"doorbell={doorbell!s:5}: first {ms[0]:7.2f} ms, p50 {statistics.median(ms):7.2f} "
            f"ms, p90 {sorted(ms)[int(0.9 * len(ms))]:7.2f} ms, max {max(ms):7.2f} ms "
            f"({count} messages)"
        )


if __name__ == "__main__":
    asyncio.run(main())
