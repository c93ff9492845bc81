"""The per-message budget: what each stage of one message costs, in ns per message.

    python -m benchmarks.budget [--repeat 3] [--quick] [--publish]

prints it (and with `--publish` rewrites its section of the page); `python -m
benchmarks` runs it as the `budget` scenario with the rest.

Directory backend, the codec of the run (default JSON), ~100-byte messages. Every
stage is timed in this process (median of several repeats of a loop over many
messages) except the receiver's whole cost, which is the CPU time per message of a
real receiver process in the batched throughput workload, and the wake-up, a round
trip between two processes that each wait on an asyncio loop.

The stages use the library's internals (`records.encode_frame`, `records.FrameReader`,
`AsyncIPC._dispatch`), which are being changed: every lookup is wrapped, and a
stage whose internal moved gives a row "n/a (moved)" instead of stopping the run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from . import messaging as m
from .harness import BASE, Aggregated, Result, Size, fan, scratch_dir, spawn
from .report import Sections, alone, fmt, rerun

MOVED = -1.0  # the value of a stage whose internal was not found: "n/a (moved)"
METRIC = "ns/msg"

# Row names, in page order. The report reads the descriptions from here.
ENCODE = "sender: encode"
FRAME = "sender: frame"
WRITE = "sender: write"
SENDER_OTHER = "sender: other"
SENDER_WHOLE = "sender: whole `await ipc.notify()`"
READ = "receiver: read"
PARSE = "receiver: parse"
DECODE = "receiver: decode"
DISPATCH = "receiver: dispatch"
RECEIVER_OTHER = "receiver: other"
RECEIVER_WHOLE = "receiver: whole (CPU per message)"
RECEIVER_WHOLE_BATCHED = "receiver: whole, from `notify_many` (CPU per message)"
WAKE_DOORBELL = "wake-up: doorbell, one way"
WAKE_PIPE = "wake-up: os.pipe, one way"

STAGES: dict[str, str] = {
    ENCODE: "`codec.dumps(message)` of a ~100-byte dict (`records.codec_named`)",
    FRAME: "`Record(...)` and `records.encode_frame(record, seq)`",
    WRITE: "`os.write` of one frame to an `O_APPEND` file on /dev/shm",
    SENDER_OTHER: "whole call minus encode, frame and write: the call, checks, "
    "bookkeeping, the writer's queue",
    SENDER_WHOLE: "awaited one at a time on a real `AsyncIPC` on a /dev/shm directory, no receiver",
    READ: "`os.pread` of a 256 KiB block of frames, per frame in it",
    PARSE: "`records.FrameReader.feed` of those blocks, per record",
    DECODE: "`codec.loads` of one message",
    DISPATCH: "`AsyncIPC._dispatch` of parsed records to one `on` handler, less decode",
    RECEIVER_OTHER: "whole minus read, parse, decode and dispatch: wake-ups, the "
    "reader's bookkeeping, the loop",
    RECEIVER_WHOLE: "CPU time (all threads) per message of a receiver process, "
    "from its first to its last message, while an awaited `notify` sender sends as "
    "fast as it can (the throughput scenario's `awaited` workload)",
    RECEIVER_WHOLE_BATCHED: "the same while a `notify_many` sender sends 1,000 at a "
    "time (the `batched` workload: batch frames, fewer wake-ups)",
    WAKE_DOORBELL: "half the round trip of a datagram between two processes over a "
    "unix socket pair, each end waiting with `loop.add_reader` (the doorbell's path)",
    WAKE_PIPE: "the same over two `os.pipe`s (the path of a `multiprocessing` Pipe "
    "with an asyncio receiver)",
}

TIMING_NOTE = (
    "Slow-handler detection times each dispatch as a whole: two "
    "`perf_counter` reads per batch of records, not per handler. Measured in one process,"
    " A/B against the previous `_dispatch` interleaved round by round (100 paired rounds "
    "of 20,000 records to one sync `on` handler, CPU time, medians of the differences, on"
    " this 2-CPU machine while other work loaded it): +46 ns per record in batches of "
    "1,000 and +15 ns in batches of 10 (noise), +407 ns (min +193 ns) for a batch of one "
    "record, the two clock reads (about 90 ns each here under load) and the bookkeeping; "
    "that is the case of an awaited sender one record at a time, where the receiver "
    "spends 4-12 us of CPU per message. Timing each handler call instead cost +307 ns per"
    " record at any batch size, so it is done only for `slow_handler_log_interval` "
    "seconds after a slow dispatch that ran several handlers. `python -m "
    "benchmarks.budget --quick`, 5 runs each side by side: receiver whole 12.1 vs 10.9 us"
    " (before vs after, medians), from `notify_many` 7.9 vs 7.4 us; the dispatch row "
    "ranged from -0.8 to 7.6 us on both sides, swamped by the load."
)
"""The cost of timing dispatches, measured when it was added (printed under the table)."""

WORKLOAD = (
    "Directory backend, the run's codec (default: stdlib JSON), messages of about 100 "
    "bytes (`{'t': ..., 'i': ..., 'pad': 'x' * 60}`), event name `m`. Each in-process "
    "stage is a loop over many messages, timed as a whole, median of 5 repeats (the "
    "loop's own ~20-30 ns per step is in each figure); the receiver's whole is a real "
    "receiver process's CPU time per message in the throughput workloads; the "
    "wake-ups are the median of 2,000 round trips between two processes. `other` rows "
    "are differences and carry the noise of the rows they are computed from."
)

REPEATS = 5


def _message(i: int = 0) -> dict[str, Any]:
    return {"t": time.monotonic_ns(), "i": i, "pad": "x" * 60}


def _per_call(loop: Callable[[int], None], n: int) -> float:
    """Median over REPEATS of (time of `loop(n)`) / n, in ns."""
    runs = []
    for _ in range(REPEATS):
        started = time.perf_counter_ns()
        loop(n)
        runs.append((time.perf_counter_ns() - started) / n)
    return statistics.median(runs)


class _Moved(Exception):
    """A library internal this stage uses was not found (renamed or moved)."""


def _internal(getter: Callable[[], Any]) -> Any:
    try:
        return getter()
    except (ImportError, AttributeError) as exc:
        raise _Moved(str(exc)) from exc


def _records() -> Any:
    from ivip_ipc_async import records

    return records


def _frames(codec_name: str, n: int) -> tuple[list[bytes], bytes]:
    """n framed messages (each its own frame, as awaited `notify` writes them)."""
    records = _records()
    codec = _internal(lambda: records.codec_named(codec_name))
    encode_frame = _internal(lambda: records.encode_frame)
    record = _internal(lambda: records.Record)
    kind = _internal(lambda: records.Kind.MESSAGE)
    frames = [
        encode_frame(
            record(kind=kind, topic="m", key=b"", data=codec.dumps(_message(i)), hlc=i, node=7),
            i + 1,
        )
        for i in range(n)
    ]
    return frames, b"".join(frames)


def sender_stages(codec_name: str, n: int, scratch: str) -> dict[str, float]:
    """encode, frame, write: ns per message, each alone."""
    out: dict[str, float] = {}
    records = _records()
    message = _message()

    def stage(name: str, measure: Callable[[], float]) -> None:
        try:
            out[name] = measure()
        except (_Moved, TypeError, AttributeError, ImportError):
            out[name] = MOVED

    def encode() -> float:
        dumps = _internal(lambda: records.codec_named(codec_name)).dumps

        def loop(k: int) -> None:
            for _ in range(k):
                dumps(message)

        return _per_call(loop, n)

    def frame() -> float:
        codec = _internal(lambda: records.codec_named(codec_name))
        encode_frame = _internal(lambda: records.encode_frame)
        record = _internal(lambda: records.Record)
        kind = _internal(lambda: records.Kind.MESSAGE)
        data = codec.dumps(message)

        def loop(k: int) -> None:
            for i in range(k):
                encode_frame(record(kind=kind, topic="m", key=b"", data=data, hlc=i, node=7), i)

        return _per_call(loop, n)

    def write() -> float:
        frame = _frames(codec_name, 1)[0][0]
        path = os.path.join(scratch, "write.seg")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        write = os.write

        def loop(k: int) -> None:
            os.ftruncate(fd, 0)  # each repeat starts from an empty file, as a segment does
            for _ in range(k):
                write(fd, frame)

        try:
            return _per_call(loop, n)
        finally:
            os.close(fd)
            os.unlink(path)

    stage(ENCODE, encode)
    stage(FRAME, frame)
    stage(WRITE, write)
    return out


def receiver_stages(codec_name: str, n: int, scratch: str) -> dict[str, float]:
    """read, parse, decode, dispatch: ns per message, each alone."""
    out: dict[str, float] = {}
    records = _records()

    def stage(name: str, measure: Callable[[], float]) -> None:
        try:
            out[name] = measure()
        except (_Moved, TypeError, AttributeError, ImportError):
            out[name] = MOVED

    try:
        from ivip_ipc_async.backends.directory.layout import READ_CHUNK

        chunk = int(READ_CHUNK)
    except (ImportError, AttributeError):
        chunk = 256 << 10
    try:
        _, blob = _frames(codec_name, n)
    except (_Moved, TypeError):
        blob = b""

    def read() -> float:
        if not blob:
            raise _Moved("frames")
        path = os.path.join(scratch, "read.seg")
        with open(path, "wb") as f:
            f.write(blob)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        pread = os.pread

        def loop(k: int) -> None:
            offset = 0
            while data := pread(fd, chunk, offset):
                offset += len(data)

        try:
            return _per_call(loop, n)
        finally:
            os.close(fd)
            os.unlink(path)

    blocks = [blob[i : i + chunk] for i in range(0, len(blob), chunk)]

    def parse() -> float:
        if not blob:
            raise _Moved("frames")
        reader_class = _internal(lambda: records.FrameReader)
        got = 0

        def loop(k: int) -> None:
            nonlocal got
            reader = reader_class(max_body=16 << 20)
            got = 0
            for block in blocks:
                got += len(reader.feed(block))
                while reader.backlog:  # a reader that gives records out a slice at a time
                    got += len(reader.feed())

        per = _per_call(loop, n)
        if got != n:
            raise _Moved(f"FrameReader gave {got} of {n} records")
        return per

    def decode() -> float:
        codec = _internal(lambda: records.codec_named(codec_name))
        data = codec.dumps(_message())
        loads = codec.loads

        def loop(k: int) -> None:
            for _ in range(k):
                loads(data)

        return _per_call(loop, n)

    stage(READ, read)
    stage(PARSE, parse)
    stage(DECODE, decode)
    stage(DISPATCH, lambda: _dispatch_with_decode(codec_name, n, blocks, scratch))
    if out.get(DISPATCH, MOVED) != MOVED and out.get(DECODE, MOVED) != MOVED:
        out[DISPATCH] -= out[DECODE]
    return out


def _dispatch_with_decode(codec_name: str, n: int, blocks: list[bytes], scratch: str) -> float:
    """`AsyncIPC._dispatch` of the parsed records to one sync `on` handler, per record."""
    from ivip_ipc_async import AsyncIPC

    records = _records()
    reader = _internal(lambda: records.FrameReader)(max_body=16 << 20)
    parsed = []
    for block in blocks:
        parsed += reader.feed(block)
        while reader.backlog:
            parsed += reader.feed()
    if len(parsed) != n:
        raise _Moved("FrameReader")
    slices = [parsed[i : i + 1000] for i in range(0, n, 1000)]

    async def run() -> float:
        async with AsyncIPC(os.path.join(scratch, "dispatch"), codec=codec_name) as ipc:
            got = [0]

            def handler(message: Any) -> None:
                got[0] += 1

            ipc.on("m", handler)
            dispatch = _internal(lambda: ipc._dispatch)

            def loop(k: int) -> None:
                for part in slices:
                    dispatch(part)

            per = _per_call(loop, n)
            if got[0] != REPEATS * n:
                raise _Moved(f"_dispatch delivered {got[0]} of {REPEATS * n}")
            return per

    return asyncio.run(run())


def whole_notify(codec_name: str, n: int, scratch: str) -> float:
    """`await ipc.notify("m", message)`, one at a time, no receiver: ns per call."""
    from ivip_ipc_async import AsyncIPC

    message = _message()

    async def run() -> float:
        async with AsyncIPC(os.path.join(scratch, "whole"), codec=codec_name) as ipc:
            notify = ipc.notify
            for _ in range(1000):  # warm up: first segment, caches
                await notify("m", message)
            runs = []
            for _ in range(REPEATS):
                started = time.perf_counter_ns()
                for _ in range(n):
                    await notify("m", message)
                runs.append((time.perf_counter_ns() - started) / n)
            return statistics.median(runs)

    return asyncio.run(run())


def receiver_whole(codec_name: str, n: int, mode: str) -> float:
    """CPU ns per message of a receiver process while a sender (`mode`) sends n."""
    with scratch_dir() as d:
        got, _ = fan(
            [(m.ivip_receiver, (d, n, codec_name))],
            [(m.ivip_sender, (d, n, 100, 0, mode, codec_name))],
        )
    return float(got[0].get("cpu_ns_per_msg", float("nan")))


# -- wake-ups: a round trip between two processes, each on an asyncio loop ----------------


def _echo(rfd: int, wfd: int) -> None:
    """The far end: wait on an asyncio loop, answer each wake-up at once."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(rfd, 64)
            except BlockingIOError:
                return
            if not data or data == b"q":
                if not done.done():
                    done.set_result(None)
                return
            os.write(wfd, b"p")

        loop.add_reader(rfd, readable)
        os.write(wfd, b"r")  # ready
        await done

    os.set_blocking(rfd, False)
    asyncio.run(run())


def wake_round_trip(kind: str, count: int) -> float:
    """Median round trip in ns: write, the other process wakes and writes back."""
    if kind == "doorbell":
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        my_r = my_w = mine.fileno()
        their_r = their_w = theirs.fileno()
        keep: list[Any] = [mine, theirs]
    else:
        to_r, to_w = os.pipe()
        back_r, back_w = os.pipe()
        my_r, my_w, their_r, their_w = back_r, to_w, to_r, back_w
        keep = []
    proc = spawn(_echo, their_r, their_w, pass_fds=sorted({their_r, their_w}))

    async def run() -> float:
        loop = asyncio.get_running_loop()
        os.set_blocking(my_r, False)
        waiter: asyncio.Future[None] | None = None

        def readable() -> None:
            try:
                os.read(my_r, 64)
            except BlockingIOError:
                return
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        ready = loop.create_future()
        waiter = ready
        loop.add_reader(my_r, readable)
        await asyncio.wait_for(ready, 60)
        trips = []
        for _ in range(count):
            waiter = loop.create_future()
            started = time.perf_counter_ns()
            os.write(my_w, b"p")
            await asyncio.wait_for(waiter, 10)
            trips.append(time.perf_counter_ns() - started)
        loop.remove_reader(my_r)
        os.write(my_w, b"q")
        return statistics.median(trips)

    try:
        return asyncio.run(run())
    finally:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        for sock in keep:
            sock.close()
        if kind != "doorbell":
            for fd in (my_r, my_w, their_r, their_w):
                os.close(fd)


# -- the scenario ------------------------------------------------------------------------------


def budget(size: Size, codec: str) -> Result:
    """The `budget` scenario: {stage: {"ns/msg": value}}; MOVED where an internal moved."""
    n = 20_000 if size.quick else 100_000
    trips = 500 if size.quick else 2_000
    values: dict[str, float] = {}
    scratch = tempfile.mkdtemp(prefix="ivip-budget-", dir=BASE)
    try:
        values.update(sender_stages(codec, n, scratch))
        try:
            values[SENDER_WHOLE] = whole_notify(codec, n, scratch)
        except (ImportError, AttributeError, TypeError):
            values[SENDER_WHOLE] = MOVED
        values.update(receiver_stages(codec, n, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    sent = size.throughput_messages
    values[RECEIVER_WHOLE] = receiver_whole(codec, sent, "awaited")
    values[RECEIVER_WHOLE_BATCHED] = receiver_whole(codec, sent, "batched")
    values[WAKE_DOORBELL] = wake_round_trip("doorbell", trips) / 2
    values[WAKE_PIPE] = wake_round_trip("pipe", trips) / 2
    values[SENDER_OTHER] = _rest(values, SENDER_WHOLE, (ENCODE, FRAME, WRITE))
    values[RECEIVER_OTHER] = _rest(values, RECEIVER_WHOLE, (READ, PARSE, DECODE, DISPATCH))
    return {name: {METRIC: values[name]} for name in STAGES if name in values}


def _rest(values: dict[str, float], whole: str, parts: tuple[str, ...]) -> float:
    inputs = [values.get(whole, MOVED)] + [values.get(p, MOVED) for p in parts]
    if MOVED in inputs:
        return MOVED
    return values[whole] - sum(values[p] for p in parts)


def render(rows: dict[str, dict[str, tuple[float, float, float]]], repeats: int) -> str:
    """The page's table: stage, ns/msg (median, min–max over runs), share, what."""

    def share_of(name: str) -> str:
        whole = SENDER_WHOLE if name.startswith("sender") else RECEIVER_WHOLE
        if name.startswith(("wake", "receiver: whole")) or whole not in rows or name == whole:
            return ""
        value, total = rows[name][METRIC][0], rows[whole][METRIC][0]
        if value == MOVED or total == MOVED or total <= 0:
            return ""
        return f"{100 * value / total:.0f} %"

    lines = ["| stage | ns/msg | share of whole | what is timed |", "|---|---|---|---|"]
    for name, what in STAGES.items():
        if name not in rows:
            continue
        median, low, high = rows[name][METRIC]
        if median == MOVED:
            value = "n/a (moved)"
        elif repeats == 1 or low == high or MOVED in (low, high):
            value = fmt(median)
        else:
            value = f"{fmt(median)} <sub>{fmt(low)}–{fmt(high)}</sub>"
        lines.append(f"| {name} | {value} | {share_of(name)} | {what} |")
    return "\n".join(lines)


SCENARIOS = {"budget": budget}
TITLE = "Per-message budget"


def sections(results: Aggregated, repeats: int) -> Sections:
    if not results.get("budget"):
        return {}
    body = [
        rerun("budget"),
        "",
        f"Workload: {WORKLOAD}",
        "",
        render(results["budget"], repeats),
        "",
        TIMING_NOTE,
        "",
    ]
    return {TITLE: body}


if __name__ == "__main__":
    sys.exit(alone("python -m benchmarks.budget", SCENARIOS, sections))
