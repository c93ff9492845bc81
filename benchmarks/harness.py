"""Starting worker processes, reading their results, and summarising latencies."""

from __future__ import annotations

import json
import multiprocessing
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


class Worker:
    """One `python -m benchmarks.workers ROLE ...` process."""

    def __init__(self, role: str, *args: object) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.workers", role, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    def line(self, timeout: float = 300) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"worker {self.proc.args} said nothing in {timeout}s")
        text = self.proc.stdout.readline()
        if not text:
            raise RuntimeError(f"worker {self.proc.args} exited with {self.proc.wait()}")
        return json.loads(text)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.go()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@contextmanager
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        yield started
    finally:
        for w in started:
            w.close()


@contextmanager
def scratch_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ivip-bench-", dir=BASE)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fan(
    receivers: list[tuple[str, tuple[object, ...]]], senders: list[tuple[str, tuple[object, ...]]]
) -> tuple[list[Any], list[Any]]:
    """Start receivers (wait for `ready`), start senders, say go, collect results."""
    with workers() as started:
        recv = [Worker(role, *args) for role, args in receivers]
        started.extend(recv)
        for w in recv:
            assert w.line() == "ready"
        send = [Worker(role, *args) for role, args in senders]
        started.extend(send)
        time.sleep(0.3)  # let the senders join before the clock starts
        for w in send:
            w.go()
        sent = [w.line() for w in send]
        got = [w.line() for w in recv]
        return got, sent


def pipe_run(count: int, size: int, interval: float, on_loop: bool = False) -> dict[str, Any]:
    """multiprocessing Pipe: one sender, one receiver (spawned processes) that blocks in
    `recv_bytes`, or (`on_loop`) waits on an asyncio loop with `loop.add_reader`."""
    from . import workers as w

    ctx = multiprocessing.get_context("spawn")
    data_r, data_w = ctx.Pipe(duplex=False)
    out_r, out_w = ctx.Pipe(duplex=False)
    go_r, go_w = ctx.Pipe(duplex=False)
    receiver = w.pipe_async_receiver if on_loop else w.pipe_receiver
    recv = ctx.Process(target=receiver, args=(data_r, count, out_w))
    send = ctx.Process(target=w.pipe_sender, args=(data_w, count, size, interval, go_r))
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


def latency_summary(latencies_ns: list[int]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds."""
    if not latencies_ns:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "max": float("nan")}
    data = sorted(latencies_ns)

    def pct(p: float) -> float:
        return data[min(len(data) - 1, int(p * len(data)))] / 1e6

    return {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": data[-1] / 1e6}


def median_of(runs: list[dict[str, float]]) -> dict[str, tuple[float, float, float]]:
    """Per metric: (median, min, max) across repeated runs."""
    out: dict[str, tuple[float, float, float]] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if key in r]
        out[key] = (statistics.median(values), min(values), max(values))
    return out


def redis_available() -> bool:
    try:
        import redis

        redis.Redis(socket_connect_timeout=0.5).ping()
        return True
    except Exception:
        return False
