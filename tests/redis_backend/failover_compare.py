"""A Sentinel failover under load: this library beside plain redis-py pub/sub.

    python -m tests.redis_backend.failover_compare --runs 5 [--deployment cluster|managed]

Each run starts a Sentinel deployment of its own (a master, a replica, three
Sentinels with `down-after-milliseconds 300`: tests/redis_server.py), then two
processes that each send a numbered message every 5 ms and listen to the
other's. Once both heard 100 messages, the master is SIGKILLed; the run goes on
until both heard 100 messages sent after the kill (or 30 s), then the senders
stop and each receiver waits up to 10 s for everything the other acknowledged.

- `ivip`: `AsyncIPC("redis+sentinel://…")`, `await ipc.notify()` (acknowledged
  when it returns; it retries for `retry_timeout`, 30 s here).
- `redis-py`: what an application writes with redis-py alone:
  `Sentinel([...]).master_for(service)`, `await client.publish()` (acknowledged
  when it returns; an error is counted as raised and the client is made anew
  from the Sentinels), and a subscriber that, on any error, waits 0.1 s, makes a
  new client from the Sentinels and subscribes again (a reconnect loop).

With `--deployment cluster`, a 3-master cluster with a replica each
(`cluster-node-timeout 1000`) instead, both clients started through a node
that does not own the namespace's slot, and the slot's master SIGKILLed; plain
redis-py is then `RedisCluster.from_url()`, `publish` on a channel in the
namespace's slot (its pub/sub goes to that master), a new client after an
error, and `client.pubsub()` subscribed again 0.1 s after any error.

With `--deployment managed`, the Sentinel deployment behind one endpoint that
follows the master, as a managed Redis's primary DNS name does: a relay in the
orchestrating process that connects each new connection to the master the
Sentinels name at that moment (connections to the killed master break). Both
clients get its `redis://` URL; plain redis-py is `Redis.from_url()`, a new
client after an error, and a subscriber that subscribes again 0.1 s after any
error.

Per run and kind: acknowledged messages lost (never heard by the other
process) and heard twice, publishes that raised, and the time from the kill
until both processes hear messages again (for each, the end of the longest
silence after the kill; the later of the two). Printed as a table of medians with every run's
figures; `--json` prints them raw.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHANNEL = "cmp:live"
ROOT = Path(__file__).resolve().parents[2]


# -- a peer process ------------------------------------------------------------------


async def _peer(kind: str, deployment: str, url: str, folder: Path, name: str, other: str) -> None:
    heard: list[tuple[int, float]] = []  # (seq, monotonic time heard)
    acked = 0
    raised = 0
    stop = folder / "stop"
    sentinels, service = _sentinels(url)

    def hear(data: Any) -> None:
        if data["from"] == other:
            heard.append((int(data["seq"]), time.monotonic()))

    if kind == "ivip":
        from ivip_ipc_async import AsyncIPC

        ipc = AsyncIPC(url, namespace=f"cmp-{folder.name}", retry_timeout=30)
        ipc.on("m", hear)
        await ipc.start()

        async def publish(message: dict[str, Any]) -> None:
            await ipc.notify("m", message)

        async def listen() -> None:
            await asyncio.Event().wait()

        async def close() -> None:
            await ipc.destroy()

    elif deployment == "cluster":  # plain redis-py on a Redis Cluster
        from redis.asyncio.cluster import RedisCluster

        # The channel in the namespace's slot: its pub/sub goes to the same master.
        channel = f"ivip:{{cmp-{folder.name}}}:plain"
        cluster_clients = [RedisCluster.from_url(url, socket_timeout=5.0)]
        subscribed = asyncio.Event()

        async def publish(message: dict[str, Any]) -> None:
            try:
                await cluster_clients[0].publish(channel, json.dumps(message))
            except Exception:
                old = cluster_clients[0]
                cluster_clients[0] = RedisCluster.from_url(url, socket_timeout=5.0)
                with contextlib.suppress(Exception):
                    await old.aclose()
                raise

        async def listen() -> None:
            while True:
                client = RedisCluster.from_url(url, socket_timeout=5.0)
                pubsub = client.pubsub()
                try:
                    await pubsub.subscribe(channel)
                    subscribed.set()
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None and message["type"] == "message":
                            hear(json.loads(message["data"]))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    await asyncio.sleep(0.1)
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                        await client.aclose()

        async def close() -> None:
            await cluster_clients[0].aclose()

    else:  # plain redis-py through the Sentinels, or one address that follows the master
        if deployment == "managed":
            from redis.asyncio import Redis

            def make() -> Any:
                return Redis.from_url(url, socket_timeout=5.0)

        else:
            from redis.asyncio.sentinel import Sentinel

            sentinel = Sentinel(sentinels, sentinel_kwargs={"socket_timeout": 2.0})

            def make() -> Any:
                return sentinel.master_for(service, socket_timeout=5.0)

        clients = [make()]
        subscribed = asyncio.Event()

        async def publish(message: dict[str, Any]) -> None:
            try:
                await clients[0].publish(CHANNEL, json.dumps(message))
            except Exception:
                old, clients[0] = clients[0], make()
                with contextlib.suppress(Exception):
                    await old.aclose()
                raise

        async def listen() -> None:
            while True:
                client = make()
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(CHANNEL)
                    subscribed.set()
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None and message["type"] == "message":
                            hear(json.loads(message["data"]))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    await asyncio.sleep(0.1)
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                        await client.aclose()

        async def close() -> None:
            await clients[0].aclose()

    listener = asyncio.create_task(listen())
    if kind != "ivip":
        await asyncio.wait_for(subscribed.wait(), 10)
    (folder / f"{name}.ready").touch()
    while not (folder / f"{other}.ready").exists():  # noqa: ASYNC110
        await asyncio.sleep(0.01)

    async def progress() -> None:
        while True:
            (folder / f"{name}.progress").write_text(
                json.dumps([t for _, t in heard[-1:]] + [len(heard)])
            )
            await asyncio.sleep(0.02)

    reporter = asyncio.create_task(progress())
    while not stop.exists():
        try:
            await publish({"from": name, "seq": acked})
            acked += 1
        except Exception:
            raised += 1
        await asyncio.sleep(0.005)
    (folder / f"{name}.sent").write_text(str(acked))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sent = folder / f"{other}.sent"
        if sent.exists() and len({s for s, _ in heard}) >= int(sent.read_text() or 0):
            break
        await asyncio.sleep(0.05)
    reporter.cancel()
    listener.cancel()
    await asyncio.gather(reporter, listener, return_exceptions=True)
    await close()
    print(json.dumps({"heard": heard, "acked": acked, "raised": raised}))


class FollowingRelay:
    """One address that follows the master: each new connection is relayed to the
    master the Sentinels name when it arrives (as a managed Redis's primary DNS
    name is re-pointed at a failover); connections to a dead master break."""

    def __init__(self, master_port: Any) -> None:
        self.master_port = master_port  # () -> int, asks a Sentinel
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            port = await asyncio.get_running_loop().run_in_executor(None, self.master_port)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except Exception:
            writer.transport.abort()  # no master now: refused, as a dead address is
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (OSError, RuntimeError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _sentinels(url: str) -> tuple[list[tuple[str, int]], str]:
    hosts, _, path = url.partition("://")[2].partition("/")
    pairs = [(h.rpartition(":")[0], int(h.rpartition(":")[2])) for h in hosts.split(",")]
    return pairs, path.split("/")[0]


# -- one run ---------------------------------------------------------------------------


async def _progress(folder: Path, name: str) -> tuple[float | None, int]:
    try:
        *last, count = json.loads((folder / f"{name}.progress").read_text())
        return (last[0] if last else None), int(count)
    except (OSError, ValueError):
        return None, 0


async def one_run(kind: str, deployment: str = "sentinel") -> dict[str, Any]:
    """One failover under load; the figures of this run."""
    from ..redis_server import Cluster, SentinelGroup

    loop = asyncio.get_running_loop()
    folder = Path(tempfile.mkdtemp(prefix="ivip-cmp-"))
    group: Any = Cluster() if deployment == "cluster" else SentinelGroup()
    await loop.run_in_executor(None, group.start)
    endpoint: FollowingRelay | None = None
    if deployment == "sentinel":
        url = group.url()

        def fault() -> None:
            group.kill_master()

    elif deployment == "managed":
        endpoint = FollowingRelay(group.master_port)
        url = f"redis://127.0.0.1:{await endpoint.start()}/0"

        def fault() -> None:
            group.kill_master()

    else:
        namespace = f"cmp-{folder.name}"
        url = group.other_master(namespace).url  # (through a node that does not own it)

        def fault() -> None:
            group.kill(group.owner(namespace))

    names = ("a", "b")
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.redis_backend.failover_compare",
            "--peer",
            kind,
            deployment,
            url,
            str(folder),
            me,
            other,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        for me, other in (names, names[::-1])
    ]
    try:

        async def counts() -> list[int]:
            return [(await _progress(folder, n))[1] for n in names]

        deadline = time.monotonic() + 30
        while min(await counts()) < 100:
            assert time.monotonic() < deadline, "the peers did not start exchanging"
            await asyncio.sleep(0.05)
        before = await counts()
        killed = time.monotonic()
        fault()
        deadline = killed + 30
        while time.monotonic() < deadline:
            now = await counts()
            if all(n >= b + 100 for n, b in zip(now, before, strict=True)):
                break
            await asyncio.sleep(0.05)
        (folder / "stop").touch()
        outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if endpoint is not None:
            await endpoint.close()
        group.close()
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    reports = {n: json.loads(out) for n, (out, _) in zip(names, outputs, strict=True)}
    lost = doubled = raised = 0
    firsts: list[float] = []
    for me, other in (names, names[::-1]):
        seqs = [s for s, _ in reports[me]["heard"]]
        lost += len(set(range(reports[other]["acked"])) - set(seqs))
        doubled += len(seqs) - len(set(seqs))
        raised += reports[other]["raised"]
        # The end of the longest silence after the kill (a message in flight at
        # the kill, heard a moment after it, is not "flowing again").
        times = [killed, *sorted(t for _, t in reports[me]["heard"] if t > killed)]
        if len(times) < 2:
            firsts.append(float("inf"))
            continue
        gap_end = max(range(1, len(times)), key=lambda i: times[i] - times[i - 1])
        firsts.append(times[gap_end] - killed)
    return {
        "kind": kind,
        "acked": sum(r["acked"] for r in reports.values()),
        "lost": lost,
        "doubled": doubled,
        "raised": raised,
        "flowing_again_s": max(firsts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per client (default 3)")
    parser.add_argument("--json", action="store_true", help="print every run as JSON")
    parser.add_argument(
        "--deployment",
        choices=("sentinel", "cluster", "managed"),
        default="sentinel",
        help="a Sentinel deployment (default); a 3-master cluster with replicas "
        "whose master of the namespace's slot is killed; or the Sentinel "
        "deployment behind one endpoint that follows the master (managed Redis)",
    )
    parser.add_argument("--peer", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        kind, deployment, url, folder, name, other = args.peer
        asyncio.run(_peer(kind, deployment, url, Path(folder), name, other))
        return
    runs: list[dict[str, Any]] = []
    for _ in range(args.runs):
        for kind in ("ivip", "redis-py"):
            runs.append(asyncio.run(one_run(kind, args.deployment)))
            print(json.dumps(runs[-1]), file=sys.stderr)
    if args.json:
        print(json.dumps(runs))
        return
    print(
        "| client | acknowledged | lost | heard twice | publishes raised | messages again after |"
    )
    print("|---|---|---|---|---|---|")
    for kind, label in (("ivip", "ivip-ipc-async"), ("redis-py", "plain redis-py")):
        mine = [r for r in runs if r["kind"] == kind]

        def cell(field: str, fmt: str = "{:g}") -> str:
            values = [r[field] for r in mine]  # noqa: B023
            median = statistics.median(values)
            every = ", ".join(fmt.format(v) for v in values)
            return f"{fmt.format(median)} ({every})"

        print(
            f"| {label} | {cell('acked')} | {cell('lost')} | {cell('doubled')} | "
            f"{cell('raised')} | {cell('flowing_again_s', '{:.2f} s')} |"
        )


if __name__ == "__main__":
    main()
