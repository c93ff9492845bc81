"""Where processes meet: the base directory and the namespace inside it.

Backend-neutral (the command line and `AsyncIPC` use it whatever the backend):
a namespace is a directory name under the base directory, and a key prefix on
Redis.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Final

__all__ = ["check_namespace", "default_namespace", "default_root"]

_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")


def default_root() -> Path:
    """The per-user base directory used when no path is given.

    `$XDG_RUNTIME_DIR/ivip-ipc` when the session has one, else
    `/dev/shm/ivip-ipc-<uid>` (memory-backed), else `<tmp>/ivip-ipc-<uid>`.

    Example:
        >>> default_root().name.startswith("ivip-ipc")
        True
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "ivip-ipc"
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return Path("/dev/shm") / f"ivip-ipc-{os.geteuid()}"
    return Path(tempfile.gettempdir()) / f"ivip-ipc-{os.geteuid()}"


def default_namespace(cwd: str | None = None) -> str:
    """The namespace of an application that names none: one per working directory.

    Example:
        >>> default_namespace("/srv/app") == default_namespace("/srv/app")
        True
        >>> default_namespace("/srv/app") == default_namespace("/srv/other")
        False
    """
    where = os.path.realpath(cwd if cwd is not None else os.getcwd())
    return "app-" + hashlib.sha256(where.encode()).hexdigest()[:16]


def check_namespace(namespace: str) -> str:
    """Refuse namespaces that are not a plain directory name; returns it.

    Example:
        >>> check_namespace("orders")
        'orders'
        >>> check_namespace("../x")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: invalid namespace '../x': use 1-100 characters ...
    """
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be str, not {type(namespace).__name__}")
    if not _NAMESPACE_RE.match(namespace):
        raise ValueError(
            f"invalid namespace {namespace!r}: use 1-100 characters from "
            "letters, digits, '.', '_' and '-', not starting with '.' or '-'"
        )
    return namespace
