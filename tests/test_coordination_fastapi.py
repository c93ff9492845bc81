"""FastAPI under `uvicorn --workers 3`: run_once at start-up and a memoized endpoint,
on the directory and on Redis (the `medium` fixture of tests/test_backends.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .test_backends import medium  # noqa: F401 - the parametrized fixture
from .test_integrations import _all_workers, _free_port

ROOT = Path(__file__).parent.parent

APP = textwrap.dedent(
    """
    import asyncio, contextlib, os
    from fastapi import FastAPI
    from ivip_ipc_async import AsyncCache, AsyncIPC
    from ivip_ipc_async.integrations.starlette import ipc_lifespan
    from ivip_ipc_async import run_once

    medium, log = os.environ["COORD_MEDIUM"], os.environ["COORD_LOG"]
    if "#" in medium:
        url, namespace = medium.split("#")
        ipc = AsyncIPC(url, namespace=namespace)
    else:
        ipc = AsyncIPC(medium)
    cache = AsyncCache(ipc, name="reports")

    def note(what):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, f"{what} {os.getpid()}\\n".encode())
        os.close(fd)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async def migrate():
            note("job")
            await asyncio.sleep(0.3)
        yield {"ran": await run_once(ipc, "migrations", migrate)}

    app = FastAPI(lifespan=ipc_lifespan(ipc, lifespan=lifespan))

    @cache.memoize("report", ttl=60)
    async def report(n):
        note(f"compute-{n}")
        await asyncio.sleep(0.5)
        return {"n": n, "by": os.getpid()}

    @app.get("/pid")
    async def pid():
        return {"pid": os.getpid()}

    @app.get("/report/{n}")
    async def get_report(n: int):
        return {"pid": os.getpid(), "report": await report(n)}
    """
)


@pytest.fixture
def server(medium: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:  # noqa: F811
    """The app under `uvicorn --workers 3`; yields its URL and the workers' log."""
    (tmp_path / "coord_app.py").write_text(APP)
    log = tmp_path / "events"
    port = _free_port()
    output = tmp_path / "server.log"
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "coord_app:app",
        "--app-dir",
        str(tmp_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "3",
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "COORD_MEDIUM": medium, "COORD_LOG": str(log)}
    with output.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        text = output.read_text(errors="replace")
        print(f"--- server output ---\n{text}")
    assert "Traceback" not in text, text


async def test_run_once_and_memoize_under_uvicorn_workers(server: tuple[str, Path]) -> None:
    base, log = server
    pids = await _all_workers(base)  # every worker is through its start-up (run_once)
    assert len(pids) == 3

    async def one(n: int) -> tuple[int, dict[str, int]]:
        async with httpx.AsyncClient(timeout=20) as client:  # a connection per request
            body = (await client.get(f"{base}/report/{n}")).json()
            return body["pid"], body["report"]

    # 40 cold requests at once, for a fresh key each round, until a round has
    # reached several workers (on a loaded machine one worker may accept all).
    for n in range(1, 6):
        answers = await asyncio.gather(*(one(n) for _ in range(40)))
        served_by = {pid for pid, _ in answers}
        reports = {tuple(sorted(report.items())) for _, report in answers}
        events = [e.split()[0] for e in log.read_text().splitlines()]
        assert len(reports) == 1  # every request got the one result
        assert events.count(f"compute-{n}") == 1, events  # memoize: once in all workers
        if len(served_by) > 1:
            break
    assert len(served_by) > 1, "no round of requests reached several workers"
    assert events.count("job") == 1  # run_once: one worker
