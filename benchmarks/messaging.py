"""Senders and receivers of messages, this library's and its peers', each run in a
child process (`harness.Worker`): the roles the latency, throughput, Redis backend and
budget scenarios share. A receiver prints `ready`, counts what arrives (latency from
the send time each message carries, rate, bytes, CPU, RSS) and prints the figures; a
sender waits for `go` and sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import time
import uuid
from typing import Any

from .harness import N, Role, emit, open_ipc, rss_kib, wait_go


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


async def redis_receiver(expected: int, with_id: bool, channel: str) -> None:
    """A redis-py subscriber; `with_id`: each payload starts with a stream id and a
    space (what this backend's APPEND script publishes)."""
    import redis.asyncio as aioredis

    col = Collector(expected)
    client = aioredis.Redis()
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
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


async def redis_sender(count: int, size: int, interval: float, mode: str, channel: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis()
    await asyncio.to_thread(wait_go)
    pad = b"x" * max(0, size - 21)
    started = N()
    if mode == "pipelined":
        for base in range(0, count, 1000):
            pipe = client.pipeline(transaction=False)
            for _ in range(base, min(count, base + 1000)):
                pipe.publish(channel, b"%020d " % N() + pad)
            await pipe.execute()
    else:
        for _ in range(count):
            await client.publish(channel, b"%020d " % N() + pad)
            if interval:
                await asyncio.sleep(interval)
    emit({"sent": count, "send_rate": count / ((N() - started) / 1e9)})
    await client.aclose()


async def redis_script_sender(count: int, size: int, interval: float, channel: str) -> None:
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
            APPEND_SHA, 1, stream, b"%020d " % N() + pad, 100_000, channel, 3_600_000
        )
        if interval:
            await asyncio.sleep(interval)
    emit({"sent": count, "send_rate": count / ((N() - started) / 1e9)})
    await client.delete(stream)
    await client.aclose()


def pipe_run(count: int, size: int, interval: float, on_loop: bool = False) -> dict[str, Any]:
    """multiprocessing Pipe: one sender, one receiver (spawned processes) that blocks in
    `recv_bytes`, or (`on_loop`) waits on an asyncio loop with `loop.add_reader`."""
    ctx = multiprocessing.get_context("spawn")
    data_r, data_w = ctx.Pipe(duplex=False)
    out_r, out_w = ctx.Pipe(duplex=False)
    go_r, go_w = ctx.Pipe(duplex=False)
    receiver = pipe_async_receiver if on_loop else pipe_receiver
    recv = ctx.Process(target=receiver, args=(data_r, count, out_w))
    send = ctx.Process(target=pipe_sender, args=(data_w, count, size, interval, go_r))
    recv.start()
    send.start()
    try:
        assert out_r.recv() == "ready"
        time.sleep(0.2)
        go_w.send("go")
        result: dict[str, Any] = out_r.recv()
    finally:
        for p in (send, recv):
            p.join(30)
            if p.is_alive():
                p.kill()
    return result


def redis_roles(
    count: int, size: int, interval: float, mode: str = "awaited", script: bool = False
) -> tuple[list[Role], list[Role]]:
    """A redis-py subscriber and a sender of `count` messages (`script`: through the
    Redis backend's APPEND script), on a channel of their own: the server is shared."""
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    if script:
        sender: Role = (redis_script_sender, (count, size, interval, channel))
    else:
        sender = (redis_sender, (count, size, interval, mode, channel))
    return [(redis_receiver, (count, script, channel))], [sender]
