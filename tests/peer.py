"""A scriptable peer process for the cross-process tests (tests/test_cross_process.py).

Usage: python tests/peer.py [DIR] [--namespace NS]   (no DIR: the default instances)

Commands arrive as JSON lines on stdin, answers leave as JSON lines on stdout:

    {"op": "listen", "event": E}          record messages of E from now on
    {"op": "notify", "event": E, "messages": [...]}   -> {"acked": n} (after each)
    {"op": "notify_many", "event": E, "count": n}     -> {"acked": n} (one batch)
    {"op": "set", "key": K, "value": V, "ttl": T}      -> {"ok": true}
    {"op": "delete", "key": K}                         -> {"existed": bool}
    {"op": "get", "key": K}                            -> {"value": V, "found": bool}
    {"op": "state"}                     -> {"cache": [[key, value], ...], "received": {E: [...]}}
    {"op": "exit"}

It prints {"ready": pid} once started. Keys keep their JSON type (1 vs "1").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from ivip_ipc_async import IPC, AsyncCache, AsyncIPC


def say(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", nargs="?")
    parser.add_argument("--namespace")
    parser.add_argument("--retention", type=float)
    parser.add_argument("--snapshot-interval", type=float)
    args = parser.parse_args()
    if args.dir is None:
        ipc = IPC
    else:
        options: dict[str, Any] = {}
        if "://" not in args.dir:  # directory backend options
            options["rescan_interval"] = 0.1
            if args.retention is not None:
                options["retention"] = args.retention
            if args.snapshot_interval is not None:
                options["snapshot_interval"] = args.snapshot_interval
        ipc = AsyncIPC(args.dir, namespace=args.namespace, **options)
    cache: AsyncCache[Any] = AsyncCache(ipc)
    received: dict[str, list[Any]] = {}
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[bytes] = asyncio.Queue()
    buffered = b""

    def on_stdin() -> None:
        nonlocal buffered
        chunk = os.read(sys.stdin.fileno(), 65536)
        if not chunk:
            lines.put_nowait(b'{"op": "exit"}')
            return
        buffered += chunk
        *complete, buffered = buffered.split(b"\n")
        for line in complete:
            lines.put_nowait(line)

    async with ipc:
        loop.add_reader(sys.stdin.fileno(), on_stdin)
        say({"ready": os.getpid()})
        while True:
            command = json.loads(await lines.get())
            op = command["op"]
            if op == "listen":
                event = command["event"]
                received.setdefault(event, [])
                ipc.on(event, received[event].append)
                say({"ok": True})
            elif op == "notify":
                acked = 0
                for message in command["messages"]:
                    await ipc.notify(command["event"], message)
                    acked += 1
                    if command.get("report_each"):
                        say({"acked_one": message})
                say({"acked": acked})
            elif op == "notify_many":
                await ipc.notify_many(command["event"], range(command["count"]))
                say({"acked": command["count"]})
            elif op == "set":
                await cache.set(command["key"], command["value"], command.get("ttl"))
                say({"ok": True})
            elif op == "delete":
                say({"existed": await cache.delete(command["key"])})
            elif op == "get":
                missing = object()
                value = await cache.get(command["key"], missing)
                found = value is not missing
                say({"value": value if found else None, "found": found})
            elif op == "state":
                keys = sorted(await cache.keys(), key=repr)
                say(
                    {
                        "cache": [[k, await cache.get(k)] for k in keys],
                        "received": received,
                    }
                )
            elif op == "exit":
                loop.remove_reader(sys.stdin.fileno())
                break


if __name__ == "__main__":
    asyncio.run(main())
