"""Child-process entry points of the benchmark suite: `python -m benchmarks.workers ROLE ...`.

Every role prints `ready` when it is set up (receivers), waits for `go` on
stdin when it must start in step with others (senders), and prints one JSON
line with its measurements at the end. Times that cross processes use
`time.monotonic_ns()` (CLOCK_MONOTONIC is system-wide on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import os
import resource
import sys
import time
from typing import Any

N = time.monotonic_ns


def emit(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def wait_go() -> None:
    sys.stdin.readline()


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def ctx_switches() -> int:
    total = 0
    with open("/proc/self/status") as f:
        for line in f:
            if "ctxt_switches" in line:
                total += int(line.split()[1])
    return total


def open_ipc(path: str, codec: str = "json") -> Any:
    """An `AsyncIPC` on a directory, or on Redis for `redis://...#namespace`."""
    from ivip_ipc_async import AsyncIPC

    if not path.startswith("redis://"):
        return AsyncIPC(path, codec=codec)
    url, _, namespace = path.partition("#")
    return AsyncIPC(url, namespace=namespace or None, codec=codec)


def payload(i: int, size: int) -> dict[str, Any]:
    """A message of about `size` bytes once JSON-encoded."""
    return {"t": N(), "i": i, "pad": "x" * max(0, size - 40)}


# -- receivers -------------------------------------------------------------------------


class Collector:
    """Counts messages, keeps latencies, samples RSS."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.latencies: list[int] = []
        self.first_sent = 0
        self.last_recv = 0
        self.count = 0
        self.bytes = 0
        self.rss_start = rss_kib()
        self.rss_peak = self.rss_start
        self.cpu_first = self.cpu_last = 0  # process CPU ns at the first and last message
        self.done = asyncio.Event()

    def take(self, sent_ns: int, size: int = 0) -> None:
        now = N()
        if self.count == 0:
            self.first_sent = sent_ns
            self.cpu_first = time.process_time_ns()  # twice per run: not per message
        self.count += 1
        self.bytes += size
        self.latencies.append(now - sent_ns)
        self.last_recv = now
        if self.count % 10_000 == 0:
            self.rss_peak = max(self.rss_peak, rss_kib())
        if self.count >= self.expected and not self.done.is_set():
            self.cpu_last = time.process_time_ns()
            self.done.set()

    def result(self) -> dict[str, Any]:
        elapsed = max(1, self.last_recv - self.first_sent) / 1e9
        return {
            "count": self.count,
            # CPU (all threads) from the first message to the last, per message after
            # the first: the receiver's whole cost of one message.
            "cpu_ns_per_msg": (self.cpu_last - self.cpu_first) / max(1, self.count - 1),
            "latencies_ns": self.latencies,
            "rate": self.count / elapsed,
            "mb_per_s": self.bytes / elapsed / 1e6,
            "rss_kib": [self.rss_start, max(self.rss_peak, rss_kib()), rss_kib()],
        }


async def ivip_receiver(path: str, expected: int, codec: str) -> None:
    col = Collector(expected)
    async with open_ipc(path, codec) as ipc:
        ipc.on("m", lambda m: col.take(m["t"], len(m["pad"]) + 40))
        emit("ready")
        await asyncio.wait_for(col.done.wait(), 600)
    emit(col.result())


async def redis_receiver(expected: int, with_id: bool = False) -> None:
    """A redis-py subscriber; `with_id`: each payload starts with a stream id and a
    space (what this backend's APPEND script publishes)."""
    import redis.asyncio as aioredis

    col = Collector(expected)
    client = aioredis.Redis()
    pubsub = client.pubsub()
    await pubsub.subscribe("bench")
    emit("ready")
    while col.count < expected:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=60)
        if msg is None:
            continue
        data = msg["data"]
        if with_id:
            data = data.partition(b" ")[2]
        col.take(int(data[:20]), len(data))
    await pubsub.aclose()
    await client.aclose()
    emit(col.result())


def pipe_receiver(conn: Any, expected: int, out: Any) -> None:
    latencies = []
    count = total = 0
    first = last = 0
    out.send("ready")
    while count < expected:
        data = conn.recv_bytes()
        now = N()
        sent = int(data[:20])
        if count == 0:
            first = sent
        latencies.append(now - sent)
        count += 1
        total += len(data)
        last = now
    elapsed = max(1, last - first) / 1e9
    out.send(
        {
            "count": count,
            "latencies_ns": latencies,
            "rate": count / elapsed,
            "mb_per_s": total / elapsed / 1e6,
        }
    )


def pipe_async_receiver(conn: Any, expected: int, out: Any) -> None:
    """A Pipe whose receiver waits on an asyncio loop (`loop.add_reader` on its fd):
    the wake-up path of any asyncio receiver, where `pipe_receiver` blocks in a read."""

    async def run() -> dict[str, Any]:
        col = Collector(expected)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            while conn.poll():  # drain what is there: one wake-up may cover several
                data = conn.recv_bytes()
                col.take(int(data[:20]), len(data))
                if col.count >= expected:
                    loop.remove_reader(conn.fileno())
                    return

        loop.add_reader(conn.fileno(), readable)
        out.send("ready")
        await asyncio.wait_for(col.done.wait(), 600)
        return col.result()

    result = asyncio.run(run())
    del result["rss_kib"]
    out.send(result)


def pipe_sender(conn: Any, count: int, size: int, interval: float, go: Any) -> None:
    go.recv()
    pad = b"x" * max(0, size - 21)
    for _ in range(count):
        conn.send_bytes(b"%020d " % N() + pad)
        if interval:
            time.sleep(interval)


_IN_MODIFY = 0x00000002


async def inotify_receiver(path: str, expected: int) -> None:
    """The floor for a file-based design: an inotify fd on the loop, then a read."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    libc.inotify_add_watch(fd, path.encode(), _IN_MODIFY)
    data_fd = os.open(path, os.O_RDONLY)
    col = Collector(expected)
    offset = 0
    tail = b""

    def on_event() -> None:
        nonlocal offset, tail
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 65536)
        chunk = os.pread(data_fd, 1 << 20, offset)
        offset += len(chunk)
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            col.take(int(line[:20]), len(line))

    asyncio.get_running_loop().add_reader(fd, on_event)
    emit("ready")
    await asyncio.wait_for(col.done.wait(), 600)
    emit(col.result())


async def watchfiles_receiver(path: str, expected: int, step: int) -> None:
    import watchfiles

    col = Collector(expected)
    data_fd = os.open(path, os.O_RDONLY)
    offset = 0
    tail = b""
    stop = asyncio.Event()
    emit("ready")

    async def watch() -> None:
        nonlocal offset, tail
        async for _ in watchfiles.awatch(
            path, step=step, stop_event=stop, debounce=step * 4, watch_filter=None
        ):
            chunk = os.pread(data_fd, 1 << 20, offset)
            offset += len(chunk)
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                col.take(int(line[:20]), len(line))
            if col.count >= expected:
                return

    await asyncio.wait_for(watch(), 600)
    emit(col.result())


def file_appender(path: str, count: int, interval: float) -> None:
    wait_go()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    for _ in range(count):
        os.write(fd, b"%020d\n" % N())
        time.sleep(interval)
    emit({"sent": count})


# -- senders -----------------------------------------------------------------------------


async def ivip_sender(
    path: str, count: int, size: int, interval: float, mode: str, codec: str
) -> None:
    async with open_ipc(path, codec) as ipc:
        await asyncio.to_thread(wait_go)
        started = N()
        if mode == "concurrent":
            for base in range(0, count, 1000):
                await asyncio.gather(
                    *(
                        ipc.notify("m", payload(i, size))
                        for i in range(base, min(count, base + 1000))
                    )
                )
        elif mode == "batched":
            for base in range(0, count, 1000):
                await ipc.notify_many(
                    "m", [payload(i, size) for i in range(base, min(count, base + 1000))]
                )
        else:
            for i in range(count):
                await ipc.notify("m", payload(i, size))
                if interval:
                    await asyncio.sleep(interval)
        elapsed = (N() - started) / 1e9
        emit({"sent": count, "send_rate": count / elapsed})
        await asyncio.to_thread(wait_go)  # stay until the receivers are done


async def redis_sender(count: int, size: int, interval: float, mode: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis()
    await asyncio.to_thread(wait_go)
    pad = b"x" * max(0, size - 21)
    started = N()
    if mode == "pipelined":
        for base in range(0, count, 1000):
            pipe = client.pipeline(transaction=False)
            for _ in range(base, min(count, base + 1000)):
                pipe.publish("bench", b"%020d " % N() + pad)
            await pipe.execute()
    else:
        for _ in range(count):
            await client.publish("bench", b"%020d " % N() + pad)
            if interval:
                await asyncio.sleep(interval)
    emit({"sent": count, "send_rate": count / ((N() - started) / 1e9)})
    await client.aclose()


async def redis_script_sender(count: int, size: int, interval: float) -> None:
    """Plain redis-py `EVALSHA` of the Redis backend's APPEND script (store in a
    stream, publish with the entry's id, keep the stream expiring), awaited: what
    one write of that design costs without this library's client-side work."""
    import uuid

    import redis.asyncio as aioredis

    from ivip_ipc_async.backends.redis.scripts import APPEND, APPEND_SHA

    client = aioredis.Redis()
    await client.script_load(APPEND)
    stream = f"bench-stream-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(wait_go)
    pad = b"x" * max(0, size - 21)
    started = N()
    # The backend's defaults: stream_maxlen 100,000, state_ttl 3,600 s.
    for _ in range(count):
        await client.evalsha(
            APPEND_SHA, 1, stream, b"%020d " % N() + pad, 100_000, "bench", 3_600_000
        )
        if interval:
            await asyncio.sleep(interval)
    emit({"sent": count, "send_rate": count / ((N() - started) / 1e9)})
    await client.delete(stream)
    await client.aclose()


# -- cache -----------------------------------------------------------------------------------

VALUE = {"id": 7, "name": "Ana", "active": True, "score": 1.5}


async def ivip_cache_ops(path: str, n: int, codec: str) -> None:
    from ivip_ipc_async import AsyncCache

    async with open_ipc(path, codec) as ipc:
        cache = AsyncCache(ipc)
        await cache.set("k", VALUE, 0)
        started = time.perf_counter()
        for _ in range(n):
            await cache.get("k")
        get_rate = n / (time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(n // 10):
            await cache.set("k", {**VALUE, "id": i}, 0)
        set_rate = (n // 10) / (time.perf_counter() - started)
    emit({"get": get_rate, "set": set_rate})


def diskcache_ops(path: str, n: int) -> None:
    import diskcache

    cache = diskcache.Cache(path)
    cache.set("k", VALUE)
    started = time.perf_counter()
    for _ in range(n):
        cache.get("k")
    get_rate = n / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(n // 10):
        cache.set("k", {**VALUE, "id": i})
    set_rate = (n // 10) / (time.perf_counter() - started)
    cache.close()
    emit({"get": get_rate, "set": set_rate})


async def redis_cache_ops(n: int) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis()
    await client.set("bench:k", json.dumps(VALUE))
    started = time.perf_counter()
    for _ in range(n):
        json.loads(await client.get("bench:k"))
    get_rate = n / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(n // 10):
        await client.set("bench:k", json.dumps({**VALUE, "id": i}))
    set_rate = (n // 10) / (time.perf_counter() - started)
    await client.delete("bench:k")
    await client.aclose()
    emit({"get": get_rate, "set": set_rate})


async def visible_reader(kind: str, path: str, count: int) -> None:
    """Poll a key until each new value shows; latency = seen - written."""
    latencies: list[int] = []
    last = -1
    if kind == "ivip":
        from ivip_ipc_async import AsyncCache, AsyncIPC

        ipc = AsyncIPC(path)
        await ipc.start()
        cache = AsyncCache(ipc)

        async def get() -> Any:
            return await cache.get("v")
    elif kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis()

        async def get() -> Any:
            raw = await client.get("bench:v")
            return json.loads(raw) if raw else None
    else:
        import diskcache

        dc = diskcache.Cache(path)

        async def get() -> Any:
            return dc.get("v")

    emit("ready")
    deadline = time.monotonic() + 120
    while last < count - 1 and time.monotonic() < deadline:
        value = await get()
        if value is not None and value["i"] > last:
            latencies.append(N() - value["t"])
            last = value["i"]
        await asyncio.sleep(0)
    if kind == "ivip":
        await ipc.destroy()
    elif kind == "redis":
        await client.aclose()
    emit({"count": len(latencies), "latencies_ns": latencies})


async def visible_writer(kind: str, path: str, count: int, interval: float) -> None:
    if kind == "ivip":
        from ivip_ipc_async import AsyncCache, AsyncIPC

        ipc = AsyncIPC(path)
        await ipc.start()
        cache = AsyncCache(ipc)

        async def put(value: Any) -> None:
            await cache.set("v", value, 0)
    elif kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis()

        async def put(value: Any) -> None:
            await client.set("bench:v", json.dumps(value))
    else:
        import diskcache

        dc = diskcache.Cache(path)

        async def put(value: Any) -> None:
            dc.set("v", value)

    await asyncio.to_thread(wait_go)
    for i in range(count):
        await put({"t": N(), "i": i})
        await asyncio.sleep(interval)
    emit({"written": count})
    await asyncio.to_thread(wait_go)
    if kind == "ivip":
        await ipc.destroy()
    elif kind == "redis":
        await client.delete("bench:v")
        await client.aclose()


# -- idle, start-up ----------------------------------------------------------------------------


async def idle(kind: str, path: str, seconds: float) -> None:
    closer: Any = None
    if kind == "ivip":
        from ivip_ipc_async import AsyncIPC

        ipc = AsyncIPC(path)
        await ipc.start()
        closer = ipc.destroy
    elif kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis()
        pubsub = client.pubsub()
        await pubsub.subscribe("bench-idle")

        async def listen() -> None:
            while True:
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=3600)

        task = asyncio.create_task(listen())

        async def close() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await pubsub.aclose()
            await client.aclose()

        closer = close
    else:
        import watchfiles

        stop = asyncio.Event()

        async def watch() -> None:
            async for _ in watchfiles.awatch(path, stop_event=stop):
                pass

        task = asyncio.create_task(watch())

        async def close() -> None:
            stop.set()
            await task

        closer = close
    await asyncio.sleep(1.0)
    cpu0, ctx0, wall0 = time.process_time(), ctx_switches(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, ctx1, wall1 = time.process_time(), ctx_switches(), time.monotonic()
    await closer()
    wall = wall1 - wall0
    emit({"cpu_percent": (cpu1 - cpu0) / wall * 100, "wakeups_per_s": (ctx1 - ctx0) / wall})


async def startup(path: str) -> None:
    from ivip_ipc_async import AsyncCache, AsyncIPC

    started = time.perf_counter()
    ipc = AsyncIPC(path)
    await ipc.notify("first", 1)
    first_notify = time.perf_counter() - started
    keys = len(AsyncCache(ipc))
    await ipc.destroy()
    emit({"seconds": first_notify, "keys": keys})


async def fill_cache(path: str, keys: int) -> None:
    from ivip_ipc_async import AsyncCache, AsyncIPC

    async with AsyncIPC(path, snapshot_interval=0.2) as ipc:
        cache = AsyncCache(ipc)
        for base in range(0, keys, 1000):
            await asyncio.gather(
                *(
                    cache.set(f"key:{i}", {"id": i, "name": "x"}, 0)
                    for i in range(base, base + 1000)
                )
            )
        version = ipc.mirror.version
        deadline = time.monotonic() + 60
        # wait for a snapshot that holds everything
        while time.monotonic() < deadline:
            backend: Any = ipc._backend
            if backend._snapshots.last_version >= version:
                break
            await asyncio.sleep(0.05)
        emit("ready")
        await asyncio.to_thread(wait_go)


def main() -> None:
    role, *args = sys.argv[1:]
    if role == "ivip-receiver":
        asyncio.run(ivip_receiver(args[0], int(args[1]), args[2]))
    elif role == "ivip-sender":
        asyncio.run(
            ivip_sender(args[0], int(args[1]), int(args[2]), float(args[3]), args[4], args[5])
        )
    elif role == "redis-receiver":
        asyncio.run(redis_receiver(int(args[0]), args[1:] == ["id"]))
    elif role == "redis-sender":
        asyncio.run(redis_sender(int(args[0]), int(args[1]), float(args[2]), args[3]))
    elif role == "redis-script-sender":
        asyncio.run(redis_script_sender(int(args[0]), int(args[1]), float(args[2])))
    elif role == "inotify-receiver":
        asyncio.run(inotify_receiver(args[0], int(args[1])))
    elif role == "watchfiles-receiver":
        asyncio.run(watchfiles_receiver(args[0], int(args[1]), int(args[2])))
    elif role == "file-appender":
        file_appender(args[0], int(args[1]), float(args[2]))
    elif role == "ivip-cache":
        asyncio.run(ivip_cache_ops(args[0], int(args[1]), args[2]))
    elif role == "diskcache-cache":
        diskcache_ops(args[0], int(args[1]))
    elif role == "redis-cache":
        asyncio.run(redis_cache_ops(int(args[0])))
    elif role == "visible-reader":
        asyncio.run(visible_reader(args[0], args[1], int(args[2])))
    elif role == "visible-writer":
        asyncio.run(visible_writer(args[0], args[1], int(args[2]), float(args[3])))
    elif role == "idle":
        asyncio.run(idle(args[0], args[1], float(args[2])))
    elif role == "startup":
        asyncio.run(startup(args[0]))
    elif role == "fill-cache":
        asyncio.run(fill_cache(args[0], int(args[1])))
    elif role.startswith("stall-"):
        from .loop_stall import run_role

        run_role(role, args)
    else:
        from .cache_ops import run_role as cache_ops_role  # the cache operations' roles
        from .coordination import run_role  # the coordination scenarios' roles

        if not run_role(role, args) and not cache_ops_role(role, args):
            raise SystemExit(f"unknown role {role}")
    resource.getrusage(resource.RUSAGE_SELF)


if __name__ == "__main__":
    main()
