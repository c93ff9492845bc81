"""ivip_ipc_async: events and a shared cache between processes on one machine.

Every public name is exported here: the default instances, `AsyncIPC`,
`AsyncCache`, locks and leadership, the codecs and every error type.

Example:
    >>> from ivip_ipc_async import IPC, Cache, AsyncIPC, AsyncCache
    >>> Cache.ipc is IPC
    True
"""

from __future__ import annotations

from . import defaults
from .backends.base import LossCause
from .cache import AsyncCache, Memoized, MemoizeDecorator
from .coordination import Leadership, Lock
from .emitter import MessageStream, Subscription
from .errors import (
    BackendError,
    BackendFullError,
    BackendPermissionError,
    BackendUnavailableError,
    IPCClosedError,
    IPCError,
    UnsafeDirectoryError,
)
from .ipc import GAP_EVENT, AsyncIPC
from .jobs import reset_run_once, run_once
from .records import Codec, JsonCodec, OrjsonCodec

__all__ = [
    "GAP_EVENT",
    "IPC",
    "AsyncCache",
    "AsyncIPC",
    "BackendError",
    "BackendFullError",
    "BackendPermissionError",
    "BackendUnavailableError",
    "Cache",
    "Codec",
    "IPCClosedError",
    "IPCError",
    "JsonCodec",
    "Leadership",
    "Lock",
    "LossCause",
    "MemoizeDecorator",
    "Memoized",
    "MessageStream",
    "OrjsonCodec",
    "Subscription",
    "UnsafeDirectoryError",
    "reset_run_once",
    "run_once",
]

__version__ = "0.1.0"


IPC = defaults.IPC
"""The default instance: `$IVIP_IPC_DIR`, or the per-application default directory.

Register handlers at import time with `IPC.on(...)`; it starts itself on first
use in a running loop (`notify`, `wait_for`, `subscribe`, any cache call). A
program that only listens calls `await IPC.start()` or uses `async with IPC:`.
It restarts itself in a new event loop and after `fork()`.

Example:
    >>> from ivip_ipc_async import IPC, AsyncIPC
    >>> isinstance(IPC, AsyncIPC), IPC.started  # creating it touched nothing
    (True, False)
    >>> sub = IPC.on("user:updated", print)  # fine at import time
    >>> sub.stop()
"""

Cache = AsyncCache(IPC)
"""The default cache (name "default", 60 s default TTL) on the default `IPC`.

Example:
    >>> from ivip_ipc_async import IPC, Cache
    >>> Cache.ipc is IPC, Cache.name, Cache.default_ttl
    (True, 'default', 60.0)
"""
