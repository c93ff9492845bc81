"""Starlette/FastAPI: the lifespan and dependencies, then real multi-worker servers."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.integrations.starlette import (
    cache_from,
    get_cache,
    get_ipc,
    ipc_from,
    ipc_lifespan,
)

from .processes import reap

ROOT = Path(__file__).parent.parent


# -- in process ---------------------------------------------------------------------------


async def test_lifespan_composes_and_the_dependencies_work(ipc_dir: Path) -> None:
    from fastapi import Depends, FastAPI

    ipc = AsyncIPC(ipc_dir)
    order: list[str] = []

    @contextlib.asynccontextmanager
    async def mine(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        order.append(f"user startup, ipc started: {ipc.started}")
        yield {"answer": 42}
        order.append(f"user shutdown, ipc started: {ipc.started}")

    app = FastAPI(lifespan=ipc_lifespan(ipc, lifespan=mine))

    @app.get("/")
    async def index(
        cache: AsyncCache[Any] = Depends(get_cache), got: AsyncIPC = Depends(get_ipc)
    ) -> dict[str, Any]:
        await cache.set("k", "v")
        return {"same": got is ipc, "value": await cache.get("k")}

    async with app.router.lifespan_context(app) as state:
        assert state["answer"] == 42  # the user's state is merged in
        assert ipc.started

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(state)  # what the server does with lifespan state
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            assert (await client.get("/")).json() == {"same": True, "value": "v"}
    assert not ipc.started
    assert order == ["user startup, ipc started: True", "user shutdown, ipc started: True"]


async def test_dependencies_without_the_lifespan_say_what_to_do() -> None:
    from types import SimpleNamespace

    request: Any = SimpleNamespace(state=SimpleNamespace())
    # The FastAPI dependencies are coroutine functions, so FastAPI awaits them in the
    # event loop instead of running them in the thread pool that sync endpoints share.
    assert inspect.iscoroutinefunction(get_ipc.__call__)
    with pytest.raises(RuntimeError, match="lifespan=ipc_lifespan"):
        await get_ipc(request)
    with pytest.raises(RuntimeError, match="lifespan=ipc_lifespan"):
        await get_cache(request)
    # Code that holds the connection (Starlette endpoints, WebSockets) reads them directly.
    with pytest.raises(RuntimeError, match="lifespan=ipc_lifespan"):
        ipc_from(request)
    with pytest.raises(RuntimeError, match="lifespan=ipc_lifespan"):
        cache_from(request)


# -- real servers -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


SERVERS = {
    "uvicorn": lambda port: [
        sys.executable,
        "-m",
        "uvicorn",
        "examples.fastapi_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "3",
        "--log-level",
        "warning",
    ],
    "gunicorn": lambda port: [
        sys.executable,
        "-m",
        "gunicorn",
        "examples.fastapi_app:app",
        "-k",
        "uvicorn.workers.UvicornWorker",
        "-w",
        "3",
        "-b",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
    ],
}


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest, ipc_dir: Path, tmp_path: Path) -> Iterator[str]:
    """A server with 3 workers; what it logged is checked (and shown) when it stops."""
    port = _free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            SERVERS[request.param](port),
            cwd=ROOT,
            env={**os.environ, "IVIP_IPC_DIR": str(ipc_dir)},
            stdout=log,
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
        output = log_path.read_text(errors="replace")
        print(f"--- {request.param} output ---\n{output}")  # shown with -rA, or on an error
    # An exception in a worker (in the app, the lifespan, the IPC) fails the test.
    assert "Traceback" not in output, output


def _fresh() -> httpx.AsyncClient:
    """A client that opens a new connection per request, so workers take turns."""
    return httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=10)


async def _all_workers(base: str, count: int = 3, timeout: float = 40) -> set[int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pids: set[int] = set()
    async with _fresh() as client:
        while len(pids) < count:
            assert loop.time() < deadline, f"only saw workers {pids}"
            try:
                pids.add((await client.get(f"{base}/pid")).json()["pid"])
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    return pids


async def _from_each(
    base: str, path: str, pids: set[int], accept: Any, timeout: float = 20
) -> dict[int, Any]:
    """GET `path` over new connections until every worker gave an accepted answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    answers: dict[int, Any] = {}
    async with _fresh() as client:
        while set(answers) != pids:
            assert loop.time() < deadline, f"answered: {answers}"
            body = (await client.get(f"{base}{path}")).json()
            if accept(body):
                answers[body["pid"]] = body
    return answers


async def test_workers_share_the_cache_and_events(server: str) -> None:
    pids = await _all_workers(server)
    async with _fresh() as client:
        writer = (await client.put(f"{server}/cache/user", json={"name": "Ana"})).json()["pid"]
        sender = (await client.post(f"{server}/notify/announce", json={"n": 1})).json()["pid"]
    seen = await _from_each(server, "/cache/user", pids, lambda b: b["value"] == {"name": "Ana"})
    assert set(seen) == pids  # written through one worker, read through all
    assert writer in pids
    events = await _from_each(server, "/events-seen", pids, lambda b: {"n": 1} in b["events"])
    assert set(events) == pids
    assert sender in pids
    # run_once: exactly one worker warmed up, however many started
    warmers = {e["warmed_by"] for b in events.values() for e in b["events"] if "warmed_by" in e}
    assert len(warmers) <= 1
    assert warmers <= pids


async def test_websocket_on_one_worker_gets_what_another_publishes(server: str) -> None:
    from httpx_ws import aconnect_ws

    await _all_workers(server)
    loop = asyncio.get_running_loop()
    async with (
        httpx.AsyncClient(timeout=10) as ws_client,
        aconnect_ws(f"{server}/ws/news", ws_client) as ws,
    ):
        ws_pid = (await ws.receive_json())["pid"]
        deadline = loop.time() + 20
        async with _fresh() as client:
            while True:  # publish until a *different* worker handles the POST
                assert loop.time() < deadline
                via = (await client.post(f"{server}/publish/news", json={"t": 1})).json()["pid"]
                message = await asyncio.wait_for(ws.receive_json(), 10)
                # the app forwards {"message": <the JSON body>, "via": <publishing pid>}
                assert message == {"message": {"t": 1}, "via": via}
                if via != ws_pid:
                    break


LEADER = textwrap.dedent(
    """
    import asyncio, os, sys
    from ivip_ipc_async import AsyncIPC
    from ivip_ipc_async import Leadership

    async def main():
        async with AsyncIPC(sys.argv[1]) as ipc:
            print("waiting", flush=True)
            async with Leadership(ipc, "scheduler", poll_interval=0.05):  # waits to lead
                print(f"leader {os.getpid()}", flush=True)
                await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_leadership_is_handed_over_when_the_leader_dies(ipc_dir: Path) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", LEADER, str(ipc_dir), stdout=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert (await asyncio.wait_for(p.stdout.readline(), 15)).strip() == b"waiting"
        reads = {asyncio.ensure_future(p.stdout.readline()): p for p in procs if p.stdout}
        done, _ = await asyncio.wait(reads, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1  # exactly one leads
        first = reads.pop(done.pop())
        first.send_signal(signal.SIGKILL)
        await first.wait()
        done, _ = await asyncio.wait(reads, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1  # one follower took over
        line = done.pop().result()
        assert line.startswith(b"leader ")
        for fut in reads:
            fut.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
    finally:
        for p in procs:
            await reap(p)
