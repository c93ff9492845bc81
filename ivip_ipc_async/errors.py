"""Exceptions raised by ivip_ipc_async.

Every error the library raises about its own state or its shared medium is an
`IPCError` (bad arguments stay `TypeError` / `ValueError`), and the same
condition raises the same type on both backends: a medium out of room is a
`BackendFullError` (a full disk, or Redis's `maxmemory`), a write to a closed
instance an `IPCClosedError`. Errors from Redis are wrapped in a `BackendError`
subclass, with redis-py's exception chained as `__cause__`; a refused write to
the directory chains the `OSError` the kernel gave. Each also keeps the
built-in base it had before (`ConnectionError`, `PermissionError`, `OSError`),
so existing `except` clauses still match.
"""

from __future__ import annotations

import errno

__all__ = [
    "BackendError",
    "BackendFullError",
    "BackendPermissionError",
    "BackendUnavailableError",
    "IPCClosedError",
    "IPCError",
    "UnsafeDirectoryError",
]


class IPCError(Exception):
    """Base class of the errors ivip_ipc_async raises itself.

    Example:
        >>> issubclass(BackendUnavailableError, IPCError)
        True
    """


class UnsafeDirectoryError(IPCError, PermissionError):
    """The shared directory is a symlink, owned by another user, or writable by others.

    Example:
        >>> issubclass(UnsafeDirectoryError, PermissionError)
        True
    """


class IPCClosedError(IPCError, RuntimeError, ConnectionAbortedError):
    """The instance was destroyed while the call was waiting, or its backend is
    closed. Also a `RuntimeError` (what `wait_for` raised before) and a
    `ConnectionAbortedError` (what a write to a closed backend raised before).

    Example:
        >>> str(IPCClosedError("destroyed"))
        'destroyed'
        >>> issubclass(IPCClosedError, ConnectionAbortedError)
        True
    """


class BackendError(IPCError):
    """The shared medium (the directory, the Redis server) refused or failed a request.

    The message says what was asked and what the server answered; redis-py's
    own exception is chained (`__cause__`). Raised as is for answers that no
    retry would change (`DB index is out of range`, a wrong key type).

    Example:
        >>> isinstance(BackendError("Redis refused SELECT"), IPCError)
        True
    """


class BackendUnavailableError(BackendError, ConnectionError):
    """Redis could not be reached, or did not answer, within the configured time.

    For a write (`notify`, `cache.set`): the record was not acknowledged and
    may or may not have been stored. If it was, every process, the writer's
    included, applies it within seconds of Redis answering again.

    Example:
        >>> issubclass(BackendUnavailableError, ConnectionError)
        True
    """


class BackendPermissionError(BackendError, PermissionError):
    """Redis refused the credentials, or a command, key or channel the backend
    needs (ACL `NOPERM`, `WRONGPASS`, `NOAUTH`). Checked at `start()`, before
    anything is stored.

    Example:
        >>> issubclass(BackendPermissionError, PermissionError)
        True
    """


class BackendFullError(BackendError, OSError):
    """The medium has no room for a write: that record was not stored.

    On Redis: `OOM` (`maxmemory` reached with policy `noeviction`). On the
    directory: the disk or quota is full, the file size limit is reached
    (`ENOSPC`, `EDQUOT`, `EFBIG`, the kernel's error chained), or the namespace
    is at its `max_footprint` and no snapshot made room in time, or the cache's
    live state would pass `max_state_bytes` (the message names the limit and
    the option). Also an `OSError` (what the directory raised before), with
    `errno` the kernel's, or `ENOSPC` when none was given.

    Example:
        >>> import errno
        >>> exc = BackendFullError("Redis at localhost is out of memory")
        >>> isinstance(exc, OSError), exc.errno == errno.ENOSPC, str(exc)
        (True, True, 'Redis at localhost is out of memory')
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        if self.errno is None:
            self.errno = errno.ENOSPC
