"""A FastAPI app whose workers share a cache and events, and fan messages out to clients.

Run it with several workers: every worker sees every other's cache writes and
events, and a WebSocket or SSE client on any worker receives what is published
through any worker:

    uvicorn examples.fastapi_app:app --workers 4 --timeout-graceful-shutdown 5
    gunicorn -k uvicorn.workers.UvicornWorker -w 4 --graceful-timeout 5 examples.fastapi_app:app

(An open SSE stream never ends by itself: without the time limit, uvicorn
waits for it for ever before shutting down; see docs/fastapi.md.)

Workers started from the same directory meet with no configuration; set
IVIP_IPC_DIR to choose the shared directory. The test suite runs this app with
both commands (tests/test_integrations.py).

Endpoints:
    GET  /pid               this worker's pid, and whether it ran the warm-up job
    GET  /cache/{key}       read the shared cache (from this worker's memory)
    PUT  /cache/{key}       write it (JSON body), for every worker
    POST /notify/{event}    send an event (JSON body) to every worker
    GET  /events-seen       the "announce" events this worker received
    POST /publish/{channel} publish a message (JSON body) to the channel's clients
    WS   /ws/{channel}      a WebSocket client of a channel
    GET  /sse/{channel}     a server-sent events client of a channel

A channel's clients first receive {"pid": <their worker>} once subscribed, then
{"message": <the published JSON body>, "via": <the pid of the publishing worker>}
for each message published.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from ivip_ipc_async import IPC, AsyncCache, AsyncIPC, Cache, MessageStream, run_once
from ivip_ipc_async.integrations.starlette import get_cache, get_ipc, ipc_lifespan

IPCDep = Annotated[AsyncIPC, Depends(get_ipc)]
CacheDep = Annotated[AsyncCache[Any], Depends(get_cache)]
JSONBody = Annotated[Any, Body()]

events_seen: list[Any] = []


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """Runs inside `ipc_lifespan`: the IPC is up here, in every worker."""
    # Listeners registered here come back if the lifespan runs again (tests).
    announce = IPC.on("announce", events_seen.append)

    async def warm_up() -> None:  # one worker runs it; the others wait for it
        await Cache.set("warmed_by", os.getpid(), 0)

    ran_warm_up = await run_once(IPC, "warm-up", warm_up)
    try:
        yield {"ran_warm_up": ran_warm_up}  # merged into the lifespan state
    finally:
        announce.stop()


app = FastAPI(lifespan=ipc_lifespan(lifespan=lifespan))


@app.get("/pid")
async def pid(request: Request) -> dict[str, Any]:
    return {"pid": os.getpid(), "ran_warm_up": request.state.ran_warm_up}


@app.get("/cache/{key}")
async def cache_get(key: str, cache: CacheDep) -> dict[str, Any]:
    return {"pid": os.getpid(), "value": await cache.get(key)}


@app.put("/cache/{key}")
async def cache_put(key: str, value: JSONBody, cache: CacheDep) -> dict[str, Any]:
    await cache.set(key, value, 60)  # in the shared directory when this returns
    return {"pid": os.getpid()}


@app.post("/notify/{event}")
async def notify(event: str, message: JSONBody, ipc: IPCDep) -> dict[str, Any]:
    await ipc.notify(event, message, include_self=True)  # this worker's listeners too
    return {"pid": os.getpid()}


@app.get("/events-seen")
async def seen() -> dict[str, Any]:
    return {"pid": os.getpid(), "events": events_seen}


# -- fan-out: a message published through any worker reaches the clients of all ----------


@app.post("/publish/{channel}")
async def publish(channel: str, message: JSONBody, ipc: IPCDep) -> dict[str, Any]:
    via = os.getpid()
    await ipc.notify(f"channel:{channel}", {"message": message, "via": via}, include_self=True)
    return {"pid": via}


@app.websocket("/ws/{channel}")
async def websocket(ws: WebSocket, channel: str, ipc: IPCDep) -> None:
    await ws.accept()
    async with ipc.subscribe(f"channel:{channel}") as stream, asyncio.TaskGroup() as tasks:
        await ws.send_json({"pid": os.getpid()})  # subscribed: nothing published is missed
        forward = tasks.create_task(_forward(stream, ws))
        with contextlib.suppress(WebSocketDisconnect):
            while True:  # read until the client leaves, to notice it even when idle
                await ws.receive_text()
        forward.cancel()


async def _forward(stream: MessageStream, ws: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        async for message in stream:  # ends when the IPC is destroyed at shutdown
            await ws.send_json(message)


@app.get("/sse/{channel}")
async def sse(channel: str, ipc: IPCDep) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        # Subscribe inside the generator: it is closed, and the stream with it,
        # when the client leaves.
        async with ipc.subscribe(f"channel:{channel}") as stream:
            yield f"data: {json.dumps({'pid': os.getpid()})}\n\n"  # subscribed
            while True:
                try:
                    message = await asyncio.wait_for(stream.get(), 15)
                except TimeoutError:
                    yield ": keep-alive\n\n"  # a comment: keeps proxies from timing out
                    continue
                except StopAsyncIteration:  # the IPC was destroyed: shutting down
                    return
                yield f"data: {json.dumps(message)}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
