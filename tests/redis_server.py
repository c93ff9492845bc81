"""A private `redis-server` for tests and measurements that reconfigure, stop,
freeze or flush their server (the shared test server is left alone)."""

from __future__ import annotations

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

    def __init__(self, *config: str) -> None:
        self.port = free_port()
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
