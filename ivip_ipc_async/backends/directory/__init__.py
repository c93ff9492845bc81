"""The shared-directory backend: parts around passive state (see docs/design.md;
the bytes on disk: docs/format.md).

- `backend`: `DirectoryBackend`, the only module that knows every part: it
  makes the passive state, wires the parts with callbacks, runs their life
- passive state: `state` (config, counters, life, the writer table, own log,
  snapshot positions), `cap` (the budget, and the whole cap rule)
- the writer: `segments` (own segments, group commit), keeping to `cap`
- the reader: `reader` (read pass, scan, restore, barrier), `recovery` (frames
  not whole), `gaps` (records never read: cause, report, resync)
- `snapshots` (written by one peer), `joining` (how a late joiner loads state)
- `liveness` (this peer's lock file, the dead collected, the peer count)
- `doorbell` and `watcher` (wake-ups: each only calls the callbacks it is given)
- `rejoin` (the namespace removed or moved under this process)
- `conditional` (conditional cache writes), `locks` and `lock_handover` (the
  lock capability, and how a lock passes to a waiter)
- helpers: `layout` (names, safe opening, `Dirs`), `pacing` (slices),
  `peerfiles` (other peers' lock files), `inotify`

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
