"""The floor of the benchmark suite: child processes, scratch space, sizes, summaries,
saved results and the Redis helpers. Nothing here knows a scenario.

A child process runs one function of any benchmark module, named by reference as
`multiprocessing`'s spawn does: `Worker(fn, *args)` starts
`python -c "from benchmarks.harness import child_main; child_main()" MODULE NAME ARGS`
(ARGS as JSON), and a coroutine function runs under `asyncio.run`. Children talk in
JSON lines: a receiver prints `ready` once set up, a sender waits for `go` on stdin
when it must start in step with others, and each prints its measurements at the end.
Times that cross processes use `time.monotonic_ns()` (CLOCK_MONOTONIC is system-wide
on Linux).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
RESULTS = os.path.join(ROOT, "benchmarks", "results")
REDIS = "redis://127.0.0.1:6379/0"


def contender_target(kind: str, medium: str, directory: str) -> tuple[str, str]:
    """Where a contender of a comparison works, and the fresh namespace to drop
    from Redis after it: the scratch `directory` for a directory one; this
    library on Redis: the Redis URL with the namespace after `#`; plain redis-py
    and the like: the namespace alone."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    if medium == "dir":
        return directory, namespace
    if kind == "ivip":
        return f"{REDIS}#{namespace}", namespace
    return namespace, namespace


N = time.monotonic_ns

Result = dict[str, dict[str, float]]
"""One run of one scenario: {contender: {metric: value}}."""
Aggregated = dict[str, dict[str, dict[str, tuple[float, float, float]]]]
"""Per scenario, contender and metric: (median, min, max) over the repeated runs."""


@dataclass(frozen=True)
class Size:
    """How big a run is: full, or `QUICK` (--quick)."""

    latency_messages: int = 500
    throughput_messages: int = 100_000
    fanout_messages: int = 20_000
    cache_ops: int = 200_000
    visible_writes: int = 200
    idle_seconds: float = 10.0
    late_joiner_keys: int = 100_000
    batched_messages: int = 500_000  # notify_many: long enough that start-up is noise
    lean: bool = False  # only the rows the message-path targets read (per-Python runs)
    quick: bool = False


QUICK = Size(200, 20_000, 5_000, 50_000, 100, 3.0, 20_000, 100_000, quick=True)

Scenario = Callable[[Size, str], Result]
"""A scenario: (size, codec name) -> one run's figures."""


# -- in a child process ------------------------------------------------------------------


def emit(obj: Any) -> None:
    """One JSON line to the parent."""
    print(json.dumps(obj), flush=True)


def wait_go() -> None:
    """Block until the parent says go (or closes stdin)."""
    sys.stdin.readline()


def rss_kib() -> int:
    """This process's resident set, KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_ipc(target: str, codec: str = "json", **options: Any) -> Any:
    """An `AsyncIPC` on a directory, or on Redis for `redis://...#namespace`."""
    from ivip_ipc_async import AsyncIPC

    if not target.startswith("redis://"):
        return AsyncIPC(target, codec=codec, **options)
    url, _, namespace = target.partition("#")
    return AsyncIPC(url, namespace=namespace or None, codec=codec, **options)


def child_main() -> None:
    """The child's side of `spawn`: run MODULE.NAME(*ARGS) from the command line."""
    module, name, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    result = getattr(importlib.import_module(module), name)(*args)
    if inspect.iscoroutine(result):
        asyncio.run(result)


# -- in the parent ---------------------------------------------------------------------


def spawn(fn: Callable[..., Any], *args: Any, **popen: Any) -> subprocess.Popen[str]:
    """Run `fn(*args)` in a new Python process (cwd: the checkout), pipes on stdin/stdout."""
    module = fn.__module__
    if module == "__main__":  # a module run with -m: its functions live under its real name
        module = sys.modules["__main__"].__spec__.name  # type: ignore[union-attr]
    code = "from benchmarks.harness import child_main; child_main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, module, fn.__name__, json.dumps(list(args))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        **popen,
    )


class Worker:
    """One child process running `fn(*args)`, read line by line."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.name = fn.__name__
        self.proc = spawn(fn, *args)
        self._buf = b""

    def line(self, timeout: float = 300) -> Any:
        """The child's next JSON line (read from the fd: lines that came together are
        kept here, not in a buffer `select` cannot see)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"worker {self.name} said nothing in {timeout}s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"worker {self.name} exited with {self.proc.wait()}")
            self._buf += chunk
        text, self._buf = self._buf.split(b"\n", 1)
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


Role = tuple[Callable[..., Any], tuple[Any, ...]]
"""A child's function and its arguments."""


@contextmanager
def workers() -> Iterator[list[Worker]]:
    """A list to put workers in; every one is closed on the way out."""
    started: list[Worker] = []
    try:
        yield started
    finally:
        for w in started:
            w.close()


@contextmanager
def scratch_dir() -> Iterator[str]:
    """A fresh directory (in /dev/shm when there is one), removed on the way out."""
    path = tempfile.mkdtemp(prefix="ivip-bench-", dir=BASE)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fan(receivers: list[Role], senders: list[Role]) -> tuple[list[Any], list[Any]]:
    """Start receivers (wait for `ready`), start senders, say go, collect results."""
    with workers() as started:
        recv = [Worker(fn, *args) for fn, args in receivers]
        started.extend(recv)
        for w in recv:
            assert w.line() == "ready"
        send = [Worker(fn, *args) for fn, args in senders]
        started.extend(send)
        time.sleep(0.3)  # let the senders join before the clock starts
        for w in send:
            w.go()
        sent = [w.line() for w in send]
        got = [w.line() for w in recv]
        return got, sent


def together(roles: list[Role], timeout: float = 300) -> list[Any]:
    """Start the workers, wait until all are ready, say go to all, collect their lines."""
    with workers() as started:
        for fn, args in roles:
            started.append(Worker(fn, *args))
        for w in started:
            assert w.line(timeout=60) == "ready"
        for w in started:
            w.go()
        return [w.line(timeout=timeout) for w in started]


# -- summaries -------------------------------------------------------------------------


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


def aggregate(raw: dict[str, list[Result]]) -> Aggregated:
    """Medians (and min, max) of the repeated runs of each scenario."""
    out: Aggregated = {}
    for name, runs in raw.items():
        if not runs:
            continue
        contenders: list[str] = []
        for run in runs:
            contenders += [c for c in run if c not in contenders]
        out[name] = {c: median_of([r[c] for r in runs if c in r]) for c in contenders}
    return out


# -- runs and their results ----------------------------------------------------------------


def run(
    scenarios: Mapping[str, Scenario],
    repeat: int,
    size: Size,
    codec: str = "json",
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, list[Result]]:
    """Each scenario `repeat` times, one after the other: {scenario: [run, ...]}."""
    raw: dict[str, list[Result]] = {}
    total, done = len(scenarios) * repeat, 0
    for name, scenario in scenarios.items():
        for i in range(repeat):
            if progress is not None:
                progress(done, total, f"{name} {i + 1}/{repeat}")
            raw.setdefault(name, []).append(scenario(size, codec))
            done += 1
    if progress is not None:
        progress(done, total, "done")
    return raw


def save(saved: dict[str, Any], path: str | None = None, prefix: str = "") -> str:
    """Write a run's results (with its command) as JSON: to `path`, or to
    benchmarks/results/PREFIX<time>.json (git-ignored). Returns the path."""
    if path is None:
        path = os.path.join(RESULTS, f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    python = ".".join(map(str, sys.version_info[:3]))
    with open(path, "w") as f:
        json.dump({"python": python, **saved}, f)
    return path


def sized(quick: bool, lean: bool = False) -> Size:
    """The run's size from its flags."""
    return dataclasses.replace(QUICK if quick else Size(), lean=lean)


# -- Redis ---------------------------------------------------------------------------------


def redis_available() -> bool:
    """Does a Redis server answer on 127.0.0.1:6379?"""
    try:
        import redis

        redis.Redis(socket_connect_timeout=0.5).ping()
        return True
    except Exception:
        return False


def drop_redis(namespace: str, *patterns: str) -> None:
    """Delete what a run left on the server: the library's keys of `namespace`
    (`ivip:{namespace}:*`), plain keys `bench-namespace*`, and any `patterns`."""
    import redis

    client = redis.Redis.from_url(REDIS)
    for pattern in (f"ivip:{{{namespace}}}:*", f"bench-{namespace}*", *patterns):
        keys = list(client.scan_iter(match=pattern, count=10_000))
        for first in range(0, len(keys), 10_000):
            client.delete(*keys[first : first + 10_000])
    client.close()
