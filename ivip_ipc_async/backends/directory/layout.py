"""The directory's layout: where each file is, what it is called, how it is opened safely.

Layout of one namespace (docs/format.md describes every byte)::

    <root>/<namespace>/              0700, owned by the user, never a symlink
        log/<peer>-<segment>.seg     append-only records of one writer (0600)
        peers/<peer>.lock            held with flock(LOCK_EX) for the peer's life
        peers/<peer>.sock            the peer's doorbell (unix datagram socket)
        snapshot.lock                flock of the one peer that writes snapshots
        snapshot.bin                 cache state, replaced atomically
        locks/, fences/              the lock capability (locks.py)

`Dirs` holds the namespace's directory fds, checks they are still the ones at
the path, and opens them again. The helpers open what may have been planted
(`open_regular`), read untrusted JSON (`json_object`) and compare files by
identity (`same_file`).

Depends on: `errors`, `logs`. No part of the backend.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Final

from ...errors import UnsafeDirectoryError
from ...logs import logger

# ASCII digits and the very end of the name (`\d` takes any Unicode digit, `$`
# a trailing newline): names in the directory are untrusted input.
SEGMENT_RE: Final = re.compile(r"([0-9a-f]{16})-([0-9]{8})\.seg\Z")
LOCK_RE: Final = re.compile(r"([0-9a-f]{16})\.lock\Z")
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
SNAPSHOT: Final = "snapshot.bin"
READ_CHUNK: Final = 256 << 10  # bytes read from a segment or a snapshot in one pread


# -- where the directory is: ivip_ipc_async/namespaces.py (shared with the CLI) --


def secure_directory(path: Path | str, *, dir_fd: int | None = None, create: bool = True) -> int:
    """Create (0700) or open a directory the current user may trust; returns its fd.

    Refuses, with `UnsafeDirectoryError`, a symlink, a directory owned by another
    user, or one that group or others can write. With `dir_fd`, `path` is a name
    relative to that directory, so no symlink can be swapped in between. With
    `create=False`, a directory that is not there is `FileNotFoundError`.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     fd = secure_directory(os.path.join(tmp, "ipc"))
        ...     oct(os.fstat(fd).st_mode & 0o777)
        ...     os.close(fd)
        '0o700'
    """
    path = os.fspath(path)
    if create and dir_fd is None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700, dir_fd=dir_fd)
    try:
        fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeDirectoryError(
                f"refusing {path!r}: it is a symlink or not a directory"
            ) from None
        raise
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"it is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = f"group or others can write to it (mode {stat.filemode(st.st_mode)})"
    if problem:
        os.close(fd)
        raise UnsafeDirectoryError(f"refusing shared directory {path!r}: {problem}")
    return fd


# -- opening what may have been planted -------------------------------------------


class UnsafeFileError(OSError):
    """A name in the namespace is not a regular file of this user (a FIFO, a
    device, a directory, a link or another user's file): never opened."""


def open_regular(name: str, flags: int, dir_fd: int, mode: int = 0o600) -> int:
    """Open `name` only if it is a regular file owned by this user.

    `O_NONBLOCK` keeps a FIFO planted under the name from blocking the open
    (the loop would freeze), `O_NOFOLLOW` refuses a symlink, and the checks
    after opening refuse whatever else was planted.
    """
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
        return fd
    os.close(fd)
    what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"owned by uid {st.st_uid}"
    raise UnsafeFileError(errno.EPERM, f"refusing {name!r}: {what}")


def json_object(data: bytes) -> dict[str, Any]:
    """`data` parsed as one JSON object, or {} when it is not one.

    Every JSON record read from the directory (a lock's record, a peer's note, a
    snapshot's header) goes through here: the bytes are untrusted, and
    `json.loads` raises more than ValueError (RecursionError on deep nesting).

    Example:
        >>> json_object(b'{"pid": 7}'), json_object(b"[" * 5000), json_object(b"[1]")
        ({'pid': 7}, {}, {})
    """
    try:
        value = json.loads(data)
    except Exception:  # damaged, nested too deep, too large: no record at all
        return {}
    return value if isinstance(value, dict) else {}


def unlink(name: str, dir_fd: int) -> bool:
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("could not delete %s: %s", name, exc)
        return False


def exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


FileId = tuple[int, int]  # (st_dev, st_ino): which file, on which device


def file_id(st: os.stat_result) -> FileId:
    """The identity of the file `st` describes: device and inode number."""
    return (st.st_dev, st.st_ino)


def same_file(name: str, dir_fd: int | None, held: int | FileId, *, unknown: bool = True) -> bool:
    """Whether `name` (relative to `dir_fd`) is still the file `held` is: an open
    fd, or the `file_id` it had. Not there: False. Not known (EACCES, ELOOP...):
    `unknown`. Never follows a symlink. An inode number is not reused while a
    descriptor keeps the file, and is unique only on its device.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     fd = os.open(tmp, os.O_RDONLY)
        ...     kept = same_file(tmp, None, fd)
        ...     os.rmdir(tmp); os.mkdir(tmp)
        ...     print(kept, same_file(tmp, None, fd), same_file("gone", fd, (0, 0)))
        ...     os.close(fd)
        True False False
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return unknown
    return file_id(st) == (file_id(os.fstat(held)) if isinstance(held, int) else held)


def _moved(name: str, fd: int, dir_fd: int | None) -> bool:
    """Whether `name` (relative to `dir_fd`) is no longer the directory `fd` is
    (not known to be gone, EACCES, ELOOP...: not moved, no repair for that)."""
    return not same_file(name, dir_fd, fd)


def segment_name(peer: str, number: int) -> str:
    """The file name of segment `number` of `peer` in log/."""
    return f"{peer}-{number:08d}.seg"


# -- the namespace's directories, as this process opened them ----------------------


class Dirs:
    """The namespace at `path` as this process opened it: the fds of the
    namespace directory ("root"), log/ and peers/.

    Example:
        >>> import tempfile
        >>> dirs = Dirs(Path(tempfile.mkdtemp()) / "ns")
        >>> dirs.open()
        >>> sorted(dirs.fds), dirs.displaced()
        (['log', 'peers', 'root'], '')
        >>> dirs.close()
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fds: dict[str, int] = {}  # "root", "log", "peers"
        self.retired: list[int] = []  # fds of directories removed or moved, see reopen

    def open(self) -> None:
        """Open (creating them 0700) the namespace directory, log/ and peers/.

        The directory given (or the default root) and the namespace inside it are
        both checked; the namespace is opened through the root's fd."""
        base = secure_directory(self.path.parent)
        try:
            root = secure_directory(self.path.name, dir_fd=base)
        finally:
            os.close(base)
        self.fds["root"] = root
        for name in ("log", "peers"):
            self.fds[name] = secure_directory(name, dir_fd=root)

    def displaced(self) -> str:
        """What of the namespace is no longer where this process opened it ("":
        nothing): the directory at `path`, and its log/ and peers/, must be the
        very ones this process's fds refer to (same device and inode). A logout
        may clear `$XDG_RUNTIME_DIR`, a cleaner may `rm -rf`, someone may rename."""
        root = self.fds.get("root")
        if root is None:
            return ""
        if _moved(str(self.path), root, None):
            return f"the namespace directory {self.path} was removed or moved"
        for name in ("log", "peers"):
            fd = self.fds.get(name)
            if fd is not None and _moved(name, fd, root):
                return f"{self.path / name} was removed or moved"
        return ""

    def reopen(self) -> set[str]:
        """Open (creating them 0700, with the checks of `secure_directory`) the
        namespace at `path` and its log/ and peers/, in place of those that were
        removed or moved; returns the names of the fds replaced. The fds replaced
        are kept open in `retired` (a snapshot being written may still use the old
        root) until `close_retired`."""
        root = self.fds["root"]
        fresh = Dirs(self.path)
        try:
            if _moved(str(self.path), root, None):
                fresh.open()
            else:
                for name in ("log", "peers"):
                    if _moved(name, self.fds[name], root):
                        fresh.fds[name] = secure_directory(name, dir_fd=root)
        except BaseException:
            fresh.close()
            raise
        replaced = set(fresh.fds)
        for name in replaced:
            self.retired.append(self.fds[name])
            self.fds[name] = fresh.fds[name]
        return replaced

    def close_retired(self) -> None:
        """Close the fds of directories replaced by `reopen`."""
        retired, self.retired = self.retired, []
        for fd in retired:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Close every fd, the retired ones too."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.close_retired()

    def drop_inherited(self) -> None:
        """In a forked child: close the parent's fds, touch nothing else."""
        fds = [*self.fds.values(), *self.retired]
        self.fds.clear()
        self.retired = []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def segments_of(self, peer: str, newer_than: float | None = None) -> list[str]:
        """The names of `peer`'s segments in log/ (modified after `newer_than`)."""
        out = []
        for name in os.listdir(self.fds["log"]):
            if not name.startswith(peer + "-"):
                continue
            if newer_than is not None:
                try:
                    st = os.stat(name, dir_fd=self.fds["log"], follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_mtime <= newer_than:
                    continue
            out.append(name)
        return out

    def footprint(self) -> int:
        """Bytes the namespace holds: segments, snapshots and their leftovers."""
        total = 0
        for where in ("log", "root"):
            fd = self.fds.get(where)
            if fd is None:
                continue
            with contextlib.suppress(OSError):
                for name in os.listdir(fd):
                    with contextlib.suppress(OSError):
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):
                            total += st.st_size
        return total
