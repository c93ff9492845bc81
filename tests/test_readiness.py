"""The readiness route (`health_endpoint`) served by a real uvicorn process:
503 with the problems while Redis is down, 200 once it is back; 200 on the
directory backend (issue #25)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from .redis_server import REDIS_SERVER, Server, free_port

ROOT = Path(__file__).resolve().parent.parent

APP = textwrap.dedent(
    """
    import os
    from fastapi import FastAPI
    from ivip_ipc_async import AsyncIPC
    from ivip_ipc_async.integrations.starlette import health_endpoint, ipc_lifespan

    ipc = AsyncIPC(os.environ["READY_URL"], namespace="readiness")
    app = FastAPI(lifespan=ipc_lifespan(ipc))
    app.add_route("/readyz", health_endpoint())
    """
)


@contextlib.asynccontextmanager
async def uvicorn_app(url: str, tmp_path: Path) -> AsyncIterator[str]:
    """The app under a real `uvicorn`; yields its base URL."""
    (tmp_path / "ready_app.py").write_text(APP)
    port = free_port()
    output = tmp_path / "server.log"
    command = [
        sys.executable, "-m", "uvicorn", "ready_app:app", "--app-dir", str(tmp_path),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    with output.open("wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "READY_URL": url},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = output.read_text(errors="replace")
    assert "Traceback" not in text, text


async def probe_until(
    client: httpx.AsyncClient, accept: Callable[[httpx.Response], bool], timeout: float = 30
) -> httpx.Response:
    """GET /readyz until `accept(response)`; fails past the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        try:
            last = await client.get("/readyz")
            if accept(last):
                return last
        except httpx.TransportError as exc:  # not listening yet
            last = exc
        assert loop.time() < deadline, f"last answer: {last!r} {getattr(last, 'text', '')}"
        await asyncio.sleep(0.05)


@pytest.mark.skipif(REDIS_SERVER is None, reason="no redis-server binary")
async def test_readiness_is_503_while_redis_is_down_and_200_once_back(tmp_path: Path) -> None:
    # AOF: a restart keeps everything, so it is no gap (a gap would keep it 503 for 60 s)
    server = Server("--appendonly", "yes", "--appendfsync", "always")
    server.start()
    try:
        async with (
            uvicorn_app(server.url, tmp_path) as base,
            httpx.AsyncClient(base_url=base, timeout=5) as client,
        ):
            up = await probe_until(client, lambda r: r.status_code == 200)
            assert up.json()["healthy"] is True
            assert up.json()["problems"] == []
            assert up.headers["cache-control"] == "no-store"
            server.stop()
            down = await probe_until(client, lambda r: r.status_code == 503)
            body = down.json()
            assert body["healthy"] is False
            assert any("not connected to Redis" in p for p in body["problems"]), body
            server.start()
            back = await probe_until(client, lambda r: r.status_code == 200)
            assert back.json()["problems"] == []
    finally:
        server.close()


async def test_readiness_on_the_directory_backend(tmp_path: Path, ipc_dir: Path) -> None:
    async with (
        uvicorn_app(str(ipc_dir), tmp_path) as base,
        httpx.AsyncClient(base_url=base, timeout=5) as client,
    ):
        up = await probe_until(client, lambda r: r.status_code != 0)
        assert up.status_code == 200, up.text
        body = up.json()
        assert body["healthy"] is True
        assert body["problems"] == []
        assert body["errors"]["gaps"] == 0
