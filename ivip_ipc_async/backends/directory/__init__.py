"""The shared-directory backend: one module per concern (see docs/design.md).

- `layout`: where the directory is, file names, safe opening, the shared `Namespace`
- `segments`: own segments, group commit, rotation, the size cap, retention
- `reader`: reading the other writers in order, a slice at a time; the safety re-scan
- `recovery`: torn, stuck and truncated frames; gaps: their cause, report, cache resync
- `wakeups`: doorbells and the directory watcher (inotify, or the watchfiles thread)
- `peers`: this peer's lock file, liveness and collection of the dead
- `snapshots`: snapshot.bin written, checked, loaded
- `locks`: the lock capability (flock, inotify wake-ups)
- `inotify`: the kernel's inotify through libc, shared by `wakeups` and `locks`
- `backend`: `DirectoryBackend`, composing them: life, maintenance, stats

Where processes meet (`default_root`, `default_namespace`, `check_namespace`) is
backend-neutral: `ivip_ipc_async/namespaces.py`; re-exported here as before.
"""

from ...namespaces import check_namespace as check_namespace
from ...namespaces import default_namespace, default_root
from .backend import DirectoryBackend
from .layout import UnsafeFileError as UnsafeFileError
from .layout import secure_directory

__all__ = [
    "DirectoryBackend",
    "default_namespace",
    "default_root",
    "secure_directory",
]
