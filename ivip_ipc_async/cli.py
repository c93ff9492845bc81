"""The `ivip-ipc` command (also `python -m ivip_ipc_async`).

Commands: `demo`, `listen`, `notify`, `cache get|set|delete|list`, `stats`, `peers`,
`bench` (the benchmark suite of a source checkout).
Every command takes `--dir` and `--namespace`, defaulting like `AsyncIPC()`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from .cache import AsyncCache
from .errors import UnsafeDirectoryError
from .ipc import AsyncIPC

__all__ = ["main"]


def _ipc(args: argparse.Namespace) -> AsyncIPC:
    return AsyncIPC(args.dir, namespace=args.namespace)


def _parse_value(text: str) -> Any:
    """JSON when it parses, else the plain string (so `notify ev hello` works)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _key(text: str) -> str | int:
    return int(text) if text.lstrip("-").isdigit() else text


# -- listen / notify / cache / stats ---------------------------------------------------


async def _listen(args: argparse.Namespace) -> int:
    async with _ipc(args) as ipc:
        done = asyncio.Event()
        count = 0

        def printer(event: str) -> Any:
            def show(message: Any) -> None:
                nonlocal count
                count += 1
                if args.json:
                    line = json.dumps({"event": event, "message": message, "t": time.time()})
                else:
                    line = f"{event}: {json.dumps(message, ensure_ascii=False)}"
                print(line, flush=True)
                if args.count and count >= args.count:
                    done.set()

            return show

        for event in args.events:
            ipc.on(event, printer(event))
        print(f"listening on {', '.join(args.events)} (Ctrl-C to stop)", file=sys.stderr)
        await done.wait()
    return 0


async def _notify(args: argparse.Namespace) -> int:
    async with _ipc(args) as ipc:
        await ipc.notify(args.event, _parse_value(args.message))
    return 0


async def _cache(args: argparse.Namespace) -> int:
    async with _ipc(args) as ipc:
        cache = AsyncCache(ipc, name=args.cache)
        if args.action == "get":
            missing = object()
            value = await cache.get(_key(args.key), missing)
            if value is missing:
                print(f"{args.key}: not found", file=sys.stderr)
                return 1
            print(json.dumps(value, ensure_ascii=False))
        elif args.action == "set":
            await cache.set(_key(args.key), _parse_value(args.value), args.ttl)
        elif args.action == "delete":
            if not await cache.delete(_key(args.key)):
                print(f"{args.key}: not found", file=sys.stderr)
                return 1
        else:
            for key in sorted(await cache.keys(), key=str):
                print(json.dumps({"key": key, "value": await cache.get(key)}, ensure_ascii=False))
    return 0


async def _stats(args: argparse.Namespace) -> int:
    async with _ipc(args) as ipc:
        stats = ipc.stats()
    if args.command == "peers":
        for peer in stats.get("peers", []):
            print(peer)
        return 0
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


# -- demo ---------------------------------------------------------------------------------


async def _demo_worker(args: argparse.Namespace) -> int:
    me, workers, messages = args.id, args.workers, args.messages
    async with AsyncIPC(args.dir, namespace="demo") as ipc:
        cache = AsyncCache(ipc, name="demo")
        latencies: list[float] = []
        senders: dict[int, int] = {}
        expected = (workers - 1) * messages
        all_in = asyncio.Event()

        def on_hello(msg: dict[str, Any]) -> None:
            latencies.append(time.time() - msg["t"])
            senders[msg["from"]] = senders.get(msg["from"], 0) + 1
            if len(latencies) >= expected:
                all_in.set()

        ipc.on("hello", on_hello)
        await cache.set(f"ready:{me}", True, 0)
        await _until(lambda: all(cache_has(cache, f"ready:{i}") for i in range(workers)))
        started = time.perf_counter()
        for seq in range(messages):
            await ipc.notify("hello", {"from": me, "seq": seq, "t": time.time()})
        sent_s = time.perf_counter() - started
        await cache.set(f"worker:{me}", {"pid": os.getpid(), "sent": messages}, 0)
        await asyncio.wait_for(all_in.wait(), 30)
        await _until(lambda: all(cache_has(cache, f"worker:{i}") for i in range(workers)))
        seen = {i: await cache.get(f"worker:{i}") for i in range(workers)}
        latencies.sort()
        print(
            json.dumps(
                {
                    "id": me,
                    "pid": os.getpid(),
                    "received": len(latencies),
                    "from": senders,
                    "p50_ms": 1000 * latencies[len(latencies) // 2],
                    "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
                    "send_rate": messages / sent_s,
                    "cache_seen": sorted(k for k, v in seen.items() if v),
                }
            ),
            flush=True,
        )
        # Keep our segments readable until everyone is done.
        await cache.set(f"done:{me}", True, 0)
        await _until(lambda: all(cache_has(cache, f"done:{i}") for i in range(workers)))
    return 0


def cache_has(cache: AsyncCache[Any], key: str) -> bool:
    entry = cache.ipc.mirror.lookup(cache.name, key)
    return entry is not None and entry.live(time.time())


async def _until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the other demo workers did not show up")
        await asyncio.sleep(0.005)


def _demo(args: argparse.Namespace) -> int:
    workers, messages = args.workers, args.messages
    with tempfile.TemporaryDirectory(prefix="ivip-ipc-demo-") as tmp:
        print(
            f"starting {workers} worker processes on {tmp}: each sends {messages} messages "
            f"to the others and shares a cache key",
            flush=True,
        )
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ivip_ipc_async",
                    "_demo-worker",
                    "--dir",
                    tmp,
                    "--id",
                    str(i),
                    "--workers",
                    str(workers),
                    "--messages",
                    str(messages),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(workers)
        ]
        results = []
        failed = False
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            if proc.returncode != 0 or not out.strip():
                failed = True
                continue
            results.append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"{'worker':>6} {'pid':>8} {'received':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'sent/s':>9}  cache keys seen"
    )
    for r in sorted(results, key=lambda r: r["id"]):
        print(
            f"{r['id']:>6} {r['pid']:>8} {r['received']:>9} {r['p50_ms']:>8.3f} "
            f"{r['p99_ms']:>8.3f} {r['send_rate']:>9.0f}  {r['cache_seen']}"
        )
    if failed or len(results) != workers:
        print("some workers failed", file=sys.stderr)
        return 1
    expected = (workers - 1) * messages
    complete = all(r["received"] == expected for r in results)
    p50 = statistics.median(r["p50_ms"] for r in results)
    print(
        f"every worker received {expected} of {expected} messages: {complete}; "
        f"median p50 latency {p50:.3f} ms"
    )
    return 0 if complete else 1


# -- bench -----------------------------------------------------------------------------------


def _bench(extra: list[str]) -> int:
    """Run the benchmark suite of a source checkout (`python -m benchmarks`)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (os.getcwd(), here):
        if os.path.isfile(os.path.join(root, "benchmarks", "__main__.py")):
            return subprocess.call([sys.executable, "-m", "benchmarks", *extra], cwd=root)
    print(
        "ivip-ipc: the benchmark suite lives in the source tree (benchmarks/); "
        "run this from a checkout of ivip-ipc-async",
        file=sys.stderr,
    )
    return 1


# -- entry point ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivip-ipc", description="Events and a shared cache between local processes."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", help="shared directory (default: $IVIP_IPC_DIR or per-app)")
    common.add_argument("--namespace", help="namespace inside the directory")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{demo,listen,notify,cache,stats,peers,bench}",  # not the private worker
    )

    demo = sub.add_parser("demo", help="run worker processes that talk through a temp dir")
    demo.add_argument("--workers", type=int, default=4)
    demo.add_argument("--messages", type=int, default=500)

    worker = sub.add_parser("_demo-worker")
    worker.add_argument("--dir", required=True)
    worker.add_argument("--id", type=int, required=True)
    worker.add_argument("--workers", type=int, required=True)
    worker.add_argument("--messages", type=int, required=True)

    listen = sub.add_parser("listen", parents=[common], help="print messages as they arrive")
    listen.add_argument("events", nargs="+", metavar="EVENT")
    listen.add_argument("--json", action="store_true", help="one JSON object per line")
    listen.add_argument("--count", type=int, default=0, help="exit after N messages")

    notify = sub.add_parser("notify", parents=[common], help="send one message")
    notify.add_argument("event")
    notify.add_argument("message", help="JSON, or a plain string")

    cache = sub.add_parser("cache", parents=[common], help="read or write the shared cache")
    cache.add_argument("--cache", default="default", help="cache name")
    actions = cache.add_subparsers(dest="action", required=True)
    get = actions.add_parser("get")
    get.add_argument("key")
    put = actions.add_parser("set")
    put.add_argument("key")
    put.add_argument("value", help="JSON, or a plain string")
    put.add_argument("--ttl", type=float, default=None, help="seconds (0: never expires)")
    delete = actions.add_parser("delete")
    delete.add_argument("key")
    actions.add_parser("list")

    sub.add_parser("bench", help="run the benchmark suite (from a source checkout; see --help)")

    sub.add_parser("stats", parents=[common], help="peers, segments, footprint, counters")
    sub.add_parser("peers", parents=[common], help="live peers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Example:
        >>> main(["notify"])  # doctest: +SKIP
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its options are the suite's own
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    runners = {
        "listen": _listen,
        "notify": _notify,
        "cache": _cache,
        "stats": _stats,
        "peers": _stats,
        "_demo-worker": _demo_worker,
    }
    try:
        if args.command == "demo":
            return _demo(args)
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(runners[args.command](args))
        return 130
    except UnsafeDirectoryError as exc:
        print(f"ivip-ipc: {exc}", file=sys.stderr)
        return 3
    except (OSError, ValueError, TypeError) as exc:
        print(f"ivip-ipc: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
