"""Backends: where records go and come from.

`open_backend` makes the backend a path or URL names, for `AsyncIPC` and the
command line alike: a directory path (or `file://`) is the directory backend;
`redis://`, `rediss://`, `unix://`, `redis+sentinel://` and `rediss+sentinel://` are the Redis
backend, imported only then (redis-py is an optional extra).

Example:
    >>> import tempfile
    >>> backend = open_backend(tempfile.mkdtemp(), namespace="docs", max_record_size=1 << 20)
    >>> type(backend).__name__, backend.max_record_size
    ('DirectoryBackend', 1048576)
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any, Final

from .base import Backend

# The default backend, imported with the package: importing it at the first
# start() would hold a running event loop for ~50-70 ms.
from .directory import DirectoryBackend

__all__ = ["REDIS_SCHEMES", "backend_imports", "check_location", "check_url", "open_backend"]

REDIS_SCHEMES: Final = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
"""The URL schemes of the Redis backend (a Cluster is reached through any node's
`redis://` or `rediss://` URL). Anything else with `://` but `file://` is refused."""

_REDIS_LIKE: Final = re.compile(r"(?i)(rediss?|unix|rediss?\+sentinel):")


def check_url(text: str) -> None:
    """Refuse what looks like a Redis URL but is not a valid one (`ValueError`
    naming the problem), rather than take it for a directory path.

    Example:
        >>> check_url("/srv/ipc"); check_url("redis://cache:6379/0")
        >>> check_url("redis:cache")
        Traceback (most recent call last):
        ...
        ValueError: bad Redis URL 'redis:cache': redis: must be followed by // ...
    """
    match = _REDIS_LIKE.match(text)
    if match is None:
        return
    scheme = match.group(1).lower()
    if not text[match.end() :].startswith("//"):
        raise ValueError(
            f"bad Redis URL {text!r}: {scheme}: must be followed by // (as in "
            f"{scheme}://host:6379/0); for a directory path that starts like this, "
            "use file:// or ./"
        )
    from .redis import check_redis_url

    check_redis_url(text)


def backend_imports(location: str | os.PathLike[str] | None) -> tuple[str, ...]:
    """The modules the backend `location` names will import (None:
    `$IVIP_IPC_DIR`), read from its form alone: nothing is imported or checked
    here (`open_backend` does).

    `AsyncIPC.start` imports them in a thread first: redis-py takes ~150 ms to
    import, too long to hold the event loop.

    Example:
        >>> backend_imports("/srv/ipc")
        ('ivip_ipc_async.backends.directory',)
        >>> backend_imports("redis://cache:6379/0")
        ('redis.asyncio', 'ivip_ipc_async.backends.redis')
    """
    raw = location if location is not None else os.environ.get("IVIP_IPC_DIR")
    text = "" if raw is None else os.fspath(raw)
    scheme = text.partition("://")[0].lower() if "://" in text else ""
    if scheme in REDIS_SCHEMES:
        return ("redis.asyncio", f"{__name__}.redis")
    return (f"{__name__}.directory",)


def check_location(location: str) -> str:
    """Which backend `location` names, "directory" or "redis", refusing what
    `open_backend` would refuse before reaching it.

    Raises:
        ValueError: a bad Redis URL, or a URL scheme no backend serves.
        ImportError: a Redis URL without redis-py installed (the message says
            which extra to install).

    Example:
        >>> check_location("/srv/ipc"), check_location("file:///srv/ipc")
        ('directory', 'directory')
        >>> check_location("ftp://user:secret@host/x")
        Traceback (most recent call last):
        ...
        ValueError: unsupported backend URL scheme 'ftp' in 'ftp://user:***@host/x' (use ...)
    """
    check_url(location)
    if "://" not in location:
        return "directory"
    scheme = location.partition("://")[0].lower()
    if scheme == "file":
        return "directory"
    if scheme not in REDIS_SCHEMES:
        known = ", ".join(f"{s}://" for s in ("file", *REDIS_SCHEMES[:-1]))
        raise ValueError(
            f"unsupported backend URL scheme {scheme!r} in {_redacted(location)!r} "
            f"(use a directory path, {known} or {REDIS_SCHEMES[-1]}://)"
        )
    try:
        importlib.import_module("redis")
    except ImportError:
        raise ImportError(
            f"{_redacted(location)} needs redis-py: pip install 'ivip-ipc-async[redis]'"
        ) from None
    return "redis"


def open_backend(
    location: str | os.PathLike[str] | None,
    *,
    namespace: str | None,
    max_record_size: int,
    **options: Any,
) -> Backend:
    """The backend `location` names, for `namespace` (not started).

    Args:
        location: A directory path, a `file://` or Redis URL; None:
            `$IVIP_IPC_DIR` if set, else the per-user default directory (see
            the README, "Where processes meet").
        namespace: None: "default" with a location, and a name derived from
            the working directory without one.
        max_record_size: Largest record in bytes.
        **options: The backend's own (see `DirectoryBackend`, `RedisBackend`).

    Raises:
        ValueError, ImportError: as `check_location`.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> backend = open_backend(f"file://{root}", namespace=None, max_record_size=4096)
        >>> type(backend).__name__, backend.max_record_size
        ('DirectoryBackend', 4096)
    """
    raw = location if location is not None else os.environ.get("IVIP_IPC_DIR")
    if raw is None:
        from ..namespaces import default_namespace, default_root

        root = default_root()
        namespace = namespace or default_namespace()
    else:
        text = os.fspath(raw)
        if check_location(text) == "redis":
            from .redis import RedisBackend

            return RedisBackend(
                text, namespace=namespace or "default", max_record_size=max_record_size, **options
            )
        if "://" in text:
            text = text.partition("://")[2]
        root = Path(text).expanduser().absolute()
        namespace = namespace or "default"
    return DirectoryBackend(root / namespace, max_record_size=max_record_size, **options)


def _redacted(url: str) -> str:
    from .redis.connections import redacted

    return redacted(url)
