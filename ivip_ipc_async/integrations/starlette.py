"""Starlette and FastAPI: run an `AsyncIPC` with the app, reach it from requests.

`ipc_lifespan()` starts the IPC when the app starts and destroys it when the app
stops, in every worker process (`uvicorn --workers N`, gunicorn), and puts the
IPC and a cache in the lifespan state. Requests reach them as
`request.state.ipc` / `request.state.cache`, through the FastAPI dependencies
`get_ipc` / `get_cache`, or with `ipc_from(request)` / `cache_from(request)`.

`health_endpoint()` is a readiness route: 200 while `ipc.health()` says the
instance is healthy, 503 with its problems otherwise (a Kubernetes
`readinessProbe` takes the worker out of rotation meanwhile).

Starlette is imported only when FastAPI inspects a dependency or a health
route answers, never when this module is imported (install it with `ivip-ipc-async[starlette]`).

Example:
    A FastAPI app, run here in process (a server does the same per worker):

    >>> import asyncio, tempfile, httpx
    >>> from typing import Any
    >>> from fastapi import Depends, FastAPI
    >>> from ivip_ipc_async import AsyncCache, AsyncIPC
    >>> app = FastAPI(lifespan=ipc_lifespan(AsyncIPC(tempfile.mkdtemp())))
    >>> @app.put("/users/{uid}")
    ... async def save(uid: int, cache: AsyncCache[Any] = Depends(get_cache)) -> None:
    ...     await cache.set(uid, {"id": uid}, 300)   # every worker sees it
    >>> @app.get("/users/{uid}")
    ... async def load(uid: int, cache: AsyncCache[Any] = Depends(get_cache)) -> Any:
    ...     return await cache.get(uid)              # from this worker's memory
    >>> async def main():
    ...     async with app.router.lifespan_context(app) as state:
    ...         async def with_state(scope, receive, send):  # what servers do
    ...             await app({**scope, "state": dict(state)}, receive, send)
    ...         transport = httpx.ASGITransport(app=with_state)
    ...         async with httpx.AsyncClient(transport=transport, base_url="http://a") as c:
    ...             await c.put("/users/7")
    ...             return (await c.get("/users/7")).json()
    >>> asyncio.run(main())
    {'id': 7}
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar

from ..cache import AsyncCache
from ..ipc import AsyncIPC

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection, Request
    from starlette.responses import Response

__all__ = [
    "IPCLifespan",
    "UserLifespan",
    "cache_from",
    "get_cache",
    "get_ipc",
    "health_endpoint",
    "ipc_from",
    "ipc_lifespan",
]

T = TypeVar("T")

UserLifespan: TypeAlias = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]
"""A lifespan of your own: `app -> async context manager` yielding None or a state mapping."""

IPCLifespan: TypeAlias = Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]
"""What `ipc_lifespan` returns: a lifespan for `Starlette(lifespan=...)` / `FastAPI(...)`."""

_KEYS = ("ipc", "cache")


def ipc_lifespan(
    ipc: AsyncIPC | None = None,
    *,
    cache: AsyncCache[Any] | None = None,
    lifespan: UserLifespan | None = None,
) -> IPCLifespan:
    """A lifespan that runs an `AsyncIPC` with the app: `FastAPI(lifespan=ipc_lifespan())`.

    At start-up it starts the IPC (in each worker: start it here, never at import,
    so that a forking server such as `gunicorn --preload` gives every worker its
    own peer), then runs your `lifespan` if you give one. At shutdown, your
    lifespan ends first, then the IPC is destroyed, which also drops its
    listeners and ends its `subscribe` streams (open WebSocket loops finish).

    The lifespan state holds `ipc` and `cache`, plus whatever your lifespan yields.

    Args:
        ipc: The instance to run. None: `cache.ipc` if a cache is given, else the
            default `IPC`.
        cache: The cache requests get. None: the default `Cache` with the default
            `IPC`, else `AsyncCache(ipc)`.
        lifespan: Your own lifespan, run inside this one: the IPC is up during
            your start-up and your shutdown. A mapping it yields is merged into
            the state (the keys "ipc" and "cache" are taken).

    Returns:
        The lifespan: a callable taking the app and returning an async context
        manager that yields the state. To nest it in your own lifespan instead
        of passing yours in, enter it yourself::

            @contextlib.asynccontextmanager
            async def lifespan(app):
                async with ipc_lifespan(ipc)(app) as state:
                    yield {**state, "db": db}

    Raises:
        ValueError: `cache` is on another `AsyncIPC` than `ipc`.

    Example:
        >>> import asyncio, contextlib, tempfile
        >>> from ivip_ipc_async import AsyncIPC
        >>> ipc = AsyncIPC(tempfile.mkdtemp())
        >>> @contextlib.asynccontextmanager
        ... async def mine(app):
        ...     yield {"started_with_ipc": ipc.started}
        >>> async def main():
        ...     async with ipc_lifespan(ipc, lifespan=mine)(None) as state:
        ...         inside = state["ipc"] is ipc, state["started_with_ipc"]
        ...     return inside, ipc.started
        >>> asyncio.run(main())
        ((True, True), False)
    """
    if ipc is not None and cache is not None and cache.ipc is not ipc:
        raise ValueError("the cache given to ipc_lifespan must use the AsyncIPC given to it")

    @contextlib.asynccontextmanager
    async def run(app: Any) -> AsyncIterator[dict[str, Any]]:
        instance, chosen = _resolve(ipc, cache)
        await instance.start()
        try:
            state: dict[str, Any] = {"ipc": instance, "cache": chosen}
            if lifespan is None:
                yield state
            else:
                async with lifespan(app) as extra:
                    if extra:
                        taken = sorted(set(_KEYS) & set(extra))
                        if taken:
                            raise ValueError(
                                f"your lifespan's state uses the key(s) {taken}, "
                                "which ipc_lifespan keeps for the IPC and the cache"
                            )
                        state.update(extra)
                    yield state
        finally:
            await instance.destroy()

    return run


def _resolve(
    ipc: AsyncIPC | None, cache: AsyncCache[Any] | None
) -> tuple[AsyncIPC, AsyncCache[Any]]:
    if cache is not None:
        return (ipc if ipc is not None else cache.ipc), cache
    from .. import IPC, Cache

    if ipc is None or ipc is IPC:
        return IPC, Cache
    return ipc, AsyncCache(ipc)


# -- reaching them from a request ------------------------------------------------------------


def ipc_from(conn: HTTPConnection) -> AsyncIPC:
    """The `AsyncIPC` of `ipc_lifespan`, from a `Request` or a `WebSocket`.

    For Starlette endpoints and any code holding the connection; FastAPI
    endpoints use `Depends(get_ipc)`.

    Raises:
        RuntimeError: the app was not started with `ipc_lifespan`.

    Example:
        >>> from types import SimpleNamespace
        >>> from ivip_ipc_async import IPC
        >>> ipc_from(SimpleNamespace(state=SimpleNamespace(ipc=IPC))) is IPC
        True
    """
    ipc = getattr(conn.state, "ipc", None)
    if not isinstance(ipc, AsyncIPC):
        raise RuntimeError(
            "no AsyncIPC in the request state: create the app with lifespan=ipc_lifespan() "
            "(and a server that supports lifespan state, as uvicorn does)"
        )
    return ipc


def cache_from(conn: HTTPConnection) -> AsyncCache[Any]:
    """The `AsyncCache` of `ipc_lifespan`, from a `Request` or a `WebSocket`.

    Raises:
        RuntimeError: the app was not started with `ipc_lifespan`.

    Example:
        >>> from types import SimpleNamespace
        >>> from ivip_ipc_async import Cache
        >>> cache_from(SimpleNamespace(state=SimpleNamespace(cache=Cache))) is Cache
        True
    """
    cache = getattr(conn.state, "cache", None)
    if not isinstance(cache, AsyncCache):
        raise RuntimeError(
            "no AsyncCache in the request state: create the app with lifespan=ipc_lifespan() "
            "(and a server that supports lifespan state, as uvicorn does)"
        )
    return cache


class StateDependency(Generic[T]):
    """A FastAPI dependency that reads the lifespan state: `get_ipc` and `get_cache`.

    Calling it returns a coroutine, so FastAPI awaits it in the event loop: a
    plain function would run in FastAPI's thread pool on every request, waiting
    for a token of the limiter that sync endpoints share. Outside FastAPI's
    dependency injection, call the plain functions `ipc_from(conn)` and
    `cache_from(conn)` instead (or `await get_ipc(conn)`). Its signature names
    Starlette's `HTTPConnection`, imported when FastAPI asks for it, so FastAPI
    passes the `Request` or the `WebSocket`.

    Example:
        >>> import asyncio
        >>> from types import SimpleNamespace
        >>> from ivip_ipc_async import IPC
        >>> asyncio.run(get_ipc(SimpleNamespace(state=SimpleNamespace(ipc=IPC)))) is IPC
        True
    """

    def __init__(self, read: Callable[[HTTPConnection], T], returns: type, name: str) -> None:
        self._read = read
        self._returns = returns
        self._name = name

    def __repr__(self) -> str:
        return f"<dependency {self._name}>"

    async def __call__(self, conn: HTTPConnection) -> T:
        return self._read(conn)

    @property
    def __signature__(self) -> inspect.Signature:
        from starlette.requests import HTTPConnection

        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        param = inspect.Parameter("conn", kind, annotation=HTTPConnection)
        return inspect.Signature([param], return_annotation=self._returns)


get_ipc: StateDependency[AsyncIPC] = StateDependency(ipc_from, AsyncIPC, "get_ipc")
"""FastAPI dependency: the `AsyncIPC` of `ipc_lifespan` (HTTP and WebSocket endpoints).

`ipc: AsyncIPC = Depends(get_ipc)`, or `Annotated[AsyncIPC, Depends(get_ipc)]`.
A coroutine function: elsewhere, `ipc_from(conn)` reads it without awaiting.

Example:
    >>> from typing import Annotated
    >>> from fastapi import Depends, FastAPI
    >>> from ivip_ipc_async import AsyncIPC
    >>> app = FastAPI(lifespan=ipc_lifespan())
    >>> @app.post("/invalidate")
    ... async def invalidate(ipc: Annotated[AsyncIPC, Depends(get_ipc)]) -> None:
    ...     await ipc.notify("invalidate", {"all": True}, include_self=True)
"""

get_cache: StateDependency[AsyncCache[Any]] = StateDependency(cache_from, AsyncCache, "get_cache")
"""FastAPI dependency: the `AsyncCache` of `ipc_lifespan`.

`cache: AsyncCache[Any] = Depends(get_cache)`. A coroutine function: elsewhere,
`cache_from(conn)` reads it without awaiting.

Example:
    >>> from typing import Annotated, Any
    >>> from fastapi import Depends, FastAPI
    >>> from ivip_ipc_async import AsyncCache
    >>> app = FastAPI(lifespan=ipc_lifespan())
    >>> @app.get("/users/{uid}")
    ... async def load(uid: int, cache: Annotated[AsyncCache[Any], Depends(get_cache)]) -> Any:
    ...     return await cache.get(uid)
"""


# -- readiness ---------------------------------------------------------------------------------


def health_endpoint(
    ipc: AsyncIPC | None = None,
) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """A readiness route: 200 while the IPC is healthy, 503 with its problems.

    The body is `ipc.health()` as JSON: `healthy`, `problems` (plain sentences:
    "not connected to Redis ...", a recent gap, a maintenance task that is not
    running), `peers`, `lag_bytes`, `errors`. Answered in the event loop, no I/O:
    cheap enough for a probe every second. Not cached (`Cache-Control: no-store`).

    Mount it with `app.add_route(path, health_endpoint())` (Starlette and
    FastAPI alike; FastAPI leaves such routes out of its OpenAPI schema), or
    `Route(path, health_endpoint())`. For Kubernetes, point the
    `readinessProbe` at it; a `livenessProbe` should not (restarting a worker
    does not bring Redis back): see docs/fastapi.md.

    Args:
        ipc: The instance to report on. None: the one `ipc_lifespan` put in the
            lifespan state (a `RuntimeError` names the fix when there is none).

    Example:
        >>> import asyncio, tempfile, httpx
        >>> from starlette.applications import Starlette
        >>> from ivip_ipc_async import AsyncIPC
        >>> ipc = AsyncIPC(tempfile.mkdtemp())
        >>> app = Starlette()  # with lifespan=ipc_lifespan(ipc), health_endpoint() finds it
        >>> app.add_route("/readyz", health_endpoint(ipc))
        >>> async def probe():
        ...     transport = httpx.ASGITransport(app=app)
        ...     async with httpx.AsyncClient(transport=transport, base_url="http://a") as c:
        ...         response = await c.get("/readyz")
        ...     return response.status_code, response.json()["problems"]
        >>> async def main():
        ...     before = await probe()              # not started: out of rotation
        ...     async with ipc:
        ...         return before, await probe()
        >>> asyncio.run(main())
        ((503, ['not started']), (200, []))
    """

    async def health(request: Request) -> Response:
        from starlette.responses import JSONResponse

        instance = ipc if ipc is not None else ipc_from(request)
        report = instance.health()
        return JSONResponse(
            report,
            status_code=200 if report["healthy"] else 503,
            headers={"Cache-Control": "no-store"},
        )

    return health
