"""A private `redis-server` for tests and measurements that reconfigure, stop,
freeze or flush their server (the shared test server is left alone), and a TCP
relay to a server that a test cuts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    """A TCP port nobody listens on now (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A private `redis-server` on a free port, in its own directory."""

    def __init__(self, *config: str, port: int | None = None) -> None:
        self.port = free_port() if port is None else port
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix="ivip-redis-", dir=shm))
        self.config = [
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "no", "--protected-mode", "no", *config,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [REDIS_SERVER, *self.config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop it as a restart would (SIGTERM: with AOF, everything is kept)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def admin(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def entry_keys(admin: Any, namespace: str) -> set[Any]:
    """The cache keys Redis holds (live entries; tombstones left out)."""
    from ivip_ipc_async.records import FrameReader, Kind, decode_key

    prefix = f"ivip:{{{namespace}}}:c:default\x00".encode()
    keys = set()
    for key in admin.scan_iter(match=prefix + b"*", count=1000):
        frame = admin.hget(key, "r")
        records = FrameReader(1 << 24, lambda *_: None).feed(frame) if frame else []
        if records and records[0].kind is Kind.CACHE_SET:
            keys.add(decode_key(key[len(prefix) :]))
    return keys


class Relay:
    """A TCP relay to Redis that a test can cut, restore, or make drop replies."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.up = True
        self.drop_replies = False  # requests reach Redis, answers never come back
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()  # refused
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer, up_writer}
        self.writers |= pair

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    if replies and self.drop_replies:
                        continue
                    dst.write(data)
                    await dst.drain()
            except (OSError, RuntimeError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))
        self.writers -= pair

    def cut(self) -> None:
        """Drop every connection, and refuse new ones until `restore()`."""
        self.up = False
        for writer in list(self.writers):
            writer.transport.abort()

    def restore(self) -> None:
        self.up = True
        self.drop_replies = False

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _down(replica: Any) -> bool:
    """Whether a Sentinel says this replica is down (redis-py 8 parses the reply
    into a dict of `is_<flag>`; 7 leaves it a flat list with a `flags` field)."""
    if isinstance(replica, dict):
        return any(replica.get(f"is_{f}") for f in ("sdown", "odown", "disconnected"))
    fields = dict(zip(replica[::2], replica[1::2], strict=True))
    return bool({"s_down", "o_down", "disconnected"} & set(str(fields["flags"]).split(",")))


def _tls_options(files: dict[str, Path], port: int) -> list[str]:
    """redis-server options for a TLS port besides the plain one, whose own
    connections to other servers (replication, Sentinels) use TLS too."""
    return [
        "--tls-port", str(port), "--tls-cert-file", str(files["server.crt"]),
        "--tls-key-file", str(files["server.key"]), "--tls-ca-cert-file", str(files["ca.crt"]),
        "--tls-auth-clients", "no", "--tls-replication", "yes",
    ]  # fmt: skip


class SentinelServer(Server):
    """A `redis-server --sentinel` on a free port, watching `service` on `master_port`
    (a master down for 300 ms is failed over, within seconds); with `tls`, also
    on `tls_port`, and speaking TLS to the servers and the other Sentinels."""

    def __init__(self, service: str, master_port: int, tls: dict[str, Path] | None = None) -> None:
        super().__init__()
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.dir}\n"
            f"logfile {self.dir / 'log'}\n"
            f"sentinel monitor {service} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {service} 300\n"
            f"sentinel failover-timeout {service} 2000\n"
            f"sentinel parallel-syncs {service} 1\n"
        )
        self.tls_port = free_port() if tls else 0
        self.config = [str(conf), "--sentinel", *(_tls_options(tls, self.tls_port) if tls else [])]


class SentinelGroup:
    """A master, a replica of it, and three Sentinels watching them (service `svc`):
    what a Sentinel deployment runs, on free ports. `url()` is the backend's URL.

    With `tls` (from `tls_files`), every server also listens with TLS, replicates
    and is watched over TLS, and `url()` is a `rediss+sentinel://` one naming the
    Sentinels' TLS ports (the Sentinels then give the master's TLS port); the
    plain ports stay for the test's own checks."""

    service = "svc"

    def __init__(self, tls: dict[str, Path] | None = None) -> None:
        self.tls = tls
        master_tls = replica_tls = 0
        extra: list[str] = []
        if tls:
            master_tls, replica_tls = free_port(), free_port()
        self.master = Server(
            "--repl-diskless-sync-delay", "0", *(_tls_options(tls, master_tls) if tls else extra)
        )
        self.replica = Server(
            "--replicaof", "127.0.0.1", str(master_tls or self.master.port),
            *(_tls_options(tls, replica_tls) if tls else extra),
        )  # fmt: skip
        self.master.tls_port, self.replica.tls_port = master_tls, replica_tls
        watched = master_tls or self.master.port
        self.sentinels = [SentinelServer(self.service, watched, tls) for _ in range(3)]

    def url(self) -> str:
        if self.tls:
            hosts = ",".join(f"127.0.0.1:{s.tls_port}" for s in self.sentinels)
            return f"rediss+sentinel://{hosts}/{self.service}/0"
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self) -> None:
        """Start them all, and return once every Sentinel knows the replica and the
        other Sentinels (then a failover can happen)."""
        import redis

        self.master.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = True
            for sentinel in self.sentinels:
                with redis.Redis(port=sentinel.port, decode_responses=True) as client:
                    replicas = client.execute_command("SENTINEL", "REPLICAS", self.service)
                    peers = client.execute_command("SENTINEL", "SENTINELS", self.service)
                ready = ready and len(peers) == 2 and len(replicas) == 1
                ready = ready and not any(_down(r) for r in replicas)
            with redis.Redis(port=self.replica.port, decode_responses=True) as client:
                ready = ready and client.info("replication")["master_link_status"] == "up"
            if ready:
                return
            time.sleep(0.1)
        raise RuntimeError("the Sentinels did not see each other and the replica in 30 s")

    def master_port(self) -> int:
        """The port of the master, as the first Sentinel says (its TLS port, with TLS)."""
        import redis

        with redis.Redis(port=self.sentinels[0].port, decode_responses=True) as client:
            _host, port = client.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
            )
        return int(port)

    def kill_master(self) -> None:
        """SIGKILL the master (no shutdown, no last replication)."""
        assert self.master.process is not None
        self.master.process.kill()
        self.master.process.wait(timeout=10)
        self.master.process = None

    def logs(self) -> str:
        """The Sentinels' logs (to say why a failover did not happen)."""
        return "\n".join((s.dir / "log").read_text(errors="replace") for s in self.sentinels)

    def close(self) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            server.close()


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 above) is free too."""
    while True:
        port = free_port()
        if port < 55536:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    pass


class Cluster:
    """A Redis Cluster of three masters, each with a replica, on free ports (a node
    unreachable for 1 s is failed over)."""

    def __init__(self) -> None:
        options = ("--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
                   "--repl-diskless-sync-delay", "0")  # fmt: skip
        self.nodes = [Server(*options, port=_cluster_port()) for _ in range(6)]
        for node in self.nodes:
            node.config += ["--cluster-config-file", str(node.dir / "nodes.conf")]

    def start(self) -> None:
        """Start the nodes, make the cluster, and return once every node says it is ok."""
        import redis

        for node in self.nodes:
            node.start()
        redis_cli = shutil.which("redis-cli")
        assert redis_cli is not None
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [redis_cli, "--cluster", "create", *addresses, "--cluster-replicas", "1",
             "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        for node in self.nodes:
            with redis.Redis(port=node.port, decode_responses=True) as client:
                # Ok, and every replica in sync (else it could not take over).
                while client.cluster("info")["cluster_state"] != "ok" or (
                    client.info("replication")["role"] == "slave"
                    and client.info("replication")["master_link_status"] != "up"
                ):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the cluster did not become ok in 30 s")
                    time.sleep(0.05)

    def owner(self, namespace: str) -> Server:
        """The master serving the slot of `namespace`'s keys, as the live nodes say."""
        import redis
        from redis.crc import key_slot

        slot = key_slot(f"ivip:{{{namespace}}}:log".encode())
        for node in self.nodes:
            if node.process is None:
                continue
            with redis.Redis(port=node.port) as client:
                for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return next(n for n in self.nodes if n.port == int(master[1]))
        raise RuntimeError(f"no node serves slot {slot}")

    def other_master(self, namespace: str) -> Server:
        """A master that does not serve `namespace`'s slot."""
        import redis

        owner = self.owner(namespace)
        for node in self.nodes:
            with redis.Redis(port=node.port, decode_responses=True) as client:
                if node is not owner and client.info("replication")["role"] == "master":
                    return node
        raise RuntimeError("no other master")

    def kill(self, node: Server) -> None:
        assert node.process is not None
        node.process.kill()
        node.process.wait(timeout=10)
        node.process = None

    def migrate(self, namespace: str, target: Server) -> None:
        """Move `namespace`'s slot, and its keys, to `target` (a resharding)."""
        import redis
        from redis.crc import key_slot

        slot = key_slot(f"ivip:{{{namespace}}}:log".encode())
        source = self.owner(namespace)
        src, dst = redis.Redis(port=source.port), redis.Redis(port=target.port)
        try:
            src_id, dst_id = src.cluster("myid"), dst.cluster("myid")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command(
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "REPLACE", "KEYS", *keys
                )
            for client in (dst, src):
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        finally:
            src.close()
            dst.close()

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def tls_files(folder: Path) -> dict[str, Path]:
    """A CA, and a certificate it signed for 127.0.0.1, made by `openssl` in
    `folder` (empty when `openssl` is missing)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return {}
    files = {name: folder / f"{name}" for name in ("ca.crt", "ca.key", "server.crt", "server.key")}
    run = [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    quiet: dict[str, Any] = {"check": True, "capture_output": True, "timeout": 60}
    # Extensions as Python 3.13's default context wants them (VERIFY_X509_STRICT:
    # a CA's key usage, the server's key identifiers), or its handshake fails.
    subprocess.run(
        [*run, "-x509", "-keyout", files["ca.key"], "-out", files["ca.crt"], "-subj", "/CN=ca",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        **quiet,
    )  # fmt: skip
    csr = folder / "server.csr"
    subprocess.run(
        [*run, "-keyout", files["server.key"], "-out", csr, "-subj", "/CN=127.0.0.1"], **quiet
    )
    ext = folder / "ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    subprocess.run(
        [openssl, "x509", "-req", "-in", csr, "-CA", files["ca.crt"], "-CAkey", files["ca.key"],
         "-CAcreateserial", "-out", files["server.crt"], "-days", "1", "-extfile", ext],
        **quiet,
    )  # fmt: skip
    return files


class TlsServer(Server):
    """A private server that also listens with TLS (`tls_url`), its certificate
    signed by `files["ca.crt"]`."""

    def __init__(self, files: dict[str, Path], *config: str) -> None:
        self.tls_port = free_port()
        super().__init__(
            "--tls-port", str(self.tls_port), "--tls-cert-file", str(files["server.crt"]),
            "--tls-key-file", str(files["server.key"]), "--tls-ca-cert-file",
            str(files["ca.crt"]), "--tls-auth-clients", "no", *config,
        )  # fmt: skip
        self.tls_url = f"rediss://127.0.0.1:{self.tls_port}/0"
