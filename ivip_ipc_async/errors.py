"""Exceptions raised by ivip_ipc_async.

Every error the library raises about its own state or its shared medium is an
`IPCError` (bad arguments stay `TypeError` / `ValueError`). Errors from Redis
are wrapped in a `BackendError` subclass, with redis-py's exception chained as
`__cause__`; each also keeps the built-in base it had before (`ConnectionError`,
`PermissionError`), so existing `except` clauses still match.
"""

from __future__ import annotations

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


class IPCClosedError(IPCError, RuntimeError):
    """The instance was destroyed while the call was waiting.

    Example:
        >>> str(IPCClosedError("destroyed"))
        'destroyed'
    """


class BackendError(IPCError):
    """The shared medium (the Redis server) refused or failed a request.

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


class BackendFullError(BackendError):
    """The medium is full and refused a write: that record was not stored.

    Redis: out of memory (`OOM`, `maxmemory` reached with policy
    `noeviction`). The directory backend: the cache's live state would pass
    `max_state_bytes` (the message names the limit and the option).

    Example:
        >>> issubclass(BackendFullError, BackendError)
        True
    """
