"""Exceptions raised by ivip_ipc_async."""

from __future__ import annotations

__all__ = ["IPCClosedError", "UnsafeDirectoryError"]


class UnsafeDirectoryError(PermissionError):
    """The shared directory is a symlink, owned by another user, or writable by others.

    Example:
        >>> issubclass(UnsafeDirectoryError, PermissionError)
        True
    """


class IPCClosedError(RuntimeError):
    """The instance was destroyed while the call was waiting.

    Example:
        >>> str(IPCClosedError("destroyed"))
        'destroyed'
    """
