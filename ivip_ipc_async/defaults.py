"""The default `IPC` instance, in a module of its own so that `AsyncCache(ipc=None)`
can reach it without importing the package's top (which imports `cache.py`).

The package re-exports it as `ivip_ipc_async.IPC`; that is the name to use.
"""

from __future__ import annotations

from .ipc import AsyncIPC

__all__ = ["IPC"]


class _Misconfigured(AsyncIPC):
    """The default instance when `$IVIP_IPC_CODEC` names no usable codec (or
    `$IVIP_IPC_SLOW_HANDLER` no threshold).

    Importing the package (and `ivip-ipc --help`) must not fail on a bad
    environment: the error is raised where the instance is used instead.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(codec="json", slow_handler_threshold=None)
        self._error = error

    async def start(self) -> AsyncIPC:
        text = str(self._error)
        named = text if text.startswith("$IVIP_IPC_") else f"$IVIP_IPC_CODEC: {text}"
        raise ValueError(named) from self._error


def _default_ipc() -> AsyncIPC:
    try:
        return AsyncIPC()
    except (ValueError, ImportError) as exc:  # only the environment is read here
        return _Misconfigured(exc)


IPC = _default_ipc()
