"""Other peers' files in peers/, read as data: a lock file's notes, and whether
its peer is alive (holds its `flock`).

A peer's lock file (`peers/<peer>.lock`, docs/format.md) is held with `flock`
for the peer's life, and holds one JSON object: who it is, and the causes of
records its readers may miss (`capped_through`, `displaced_through`: the last
segment deleted under the size cap, or written in a namespace directory that
was removed or moved). Anyone of this user can write there: what is read is
untrusted.

Depends on: `layout`. No part of the backend.
"""

from __future__ import annotations

import fcntl
import os

from .layout import json_object, open_regular

__all__ = ["CAPPED", "DISPLACED", "holds_lock", "read_note"]

CAPPED = "capped_through"
DISPLACED = "displaced_through"


def read_note(peers_fd: int | None, peer: str, key: str) -> int:
    """The segment number `peer` noted for `key` in its lock file (0: none, or
    nothing that reads as a positive count).

    Example:
        >>> import tempfile
        >>> fd = os.open(tempfile.mkdtemp(), os.O_RDONLY)
        >>> with open(f"/proc/self/fd/{fd}/00000000000000aa.lock", "w") as f:
        ...     _ = f.write('{"capped_through": 7}')
        >>> read_note(fd, "00000000000000aa", CAPPED), read_note(fd, "00000000000000bb", CAPPED)
        (7, 0)
        >>> os.close(fd)
    """
    if peers_fd is None:
        return 0
    try:
        fd = open_regular(f"{peer}.lock", os.O_RDONLY, peers_fd)
    except OSError:
        return 0
    try:
        value = json_object(os.pread(fd, 4096, 0)).get(key)
    except OSError:
        return 0
    finally:
        os.close(fd)
    return value if type(value) is int and value > 0 else 0  # untrusted: a count


def holds_lock(peers_fd: int, peer: str) -> bool:
    """Whether `peer` is alive: its lock file is there and locked.

    Example:
        >>> import tempfile
        >>> fd = os.open(tempfile.mkdtemp(), os.O_RDONLY)
        >>> holds_lock(fd, "00000000000000aa")
        False
        >>> os.close(fd)
    """
    try:
        fd = open_regular(f"{peer}.lock", os.O_RDONLY, peers_fd)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
