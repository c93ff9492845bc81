"""The watcher: the namespace's directories watched for peers joining and leaving.

On Linux, an inotify descriptor read by the event loop itself
(`loop.add_reader`): no thread and no periodic wake-up, so an idle process pays
nothing for it. Where inotify cannot be had (another system, no libc, the
per-user inotify limits reached), or with `IVIP_IPC_WATCHER=watchfiles`, a
`watchfiles.watch` thread polling every `watch_step` ms. It watches peers/
(peers join, leave, die), log/ too when there is no doorbell (appends), and
the namespace's directories for their own removal or renaming.

A change only says "look"; it is handed on through callbacks `backend.py`
injects: `on_news(peer, segment)` and `on_look()` (the reader), `on_peers()`
(the doorbell's ringers), `on_displaced()` (rejoin), then `on_read()`. A
watcher that stops is restarted with backoff (`supervise`); the maintenance
round's safety re-scan covers the meantime.

Depends on: `state`, `layout`, `inotify`, `logs`; `watchfiles` (the fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

# Imported with the package, not in the watcher thread: importing it there
# holds the GIL for ~20 ms, a stall of the event loop at every start.
import watchfiles

from ...logs import logger, rate_limited
from .inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    LIBC,
    open_inotify,
    read_events,
)
from .layout import SEGMENT_RE, Dirs
from .state import Config, Counters, Life

__all__ = ["WATCHER_ENV", "Watcher"]

WATCHER_ENV: Final = "IVIP_IPC_WATCHER"  # "watchfiles": the thread even where inotify works
_WATCHERS: Final = ("", "auto", "inotify", "watchfiles")

# A peer joins (its lock renamed into place, its socket bound), leaves (both
# unlinked) or dies (the kernel closes its lock file, opened for writing); a
# segment is created. Appends (IN_MODIFY) only when log/ has no doorbells.
_IN_PEERS: Final = IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM | IN_CLOSE_WRITE | IN_ONLYDIR
_IN_LOG: Final = _IN_PEERS | IN_MODIFY
_IN_APPEARED: Final = IN_CREATE | IN_MOVED_TO | IN_MODIFY | IN_CLOSE_WRITE
# The namespace directory, peers/ or log/ itself renamed (see rejoin.py); removed:
# the kernel says so only once no process holds it open, so what says it is the
# removal of this peer's own files from peers/, and of log/ or peers/ from the
# namespace (`_IN_ROOT`), before the directory itself goes.
_IN_SELF: Final = IN_DELETE_SELF | IN_MOVE_SELF
_IN_ROOT: Final = _IN_SELF | IN_DELETE | IN_ONLYDIR
_GONE: Final = IN_DELETE | IN_MOVED_FROM


class Watcher:
    """The directory watcher: inotify on the event loop, or the watchfiles thread.

    Example:
        >>> import tempfile
        >>> config, counters = Config.of(tempfile.mkdtemp() + "/ns"), Counters()
        >>> watcher = Watcher(
        ...     config, Dirs(config.path), counters, Life(counters),
        ...     watch_log=lambda: False, on_news=print, on_look=print, on_peers=print,
        ...     on_displaced=print, on_read=print,
        ... )
        >>> watcher.kind, watcher.alive
        (None, False)
    """

    def __init__(
        self,
        config: Config,
        dirs: Dirs,
        counters: Counters,
        life: Life,
        *,
        watch_log: Callable[[], bool],
        on_news: Callable[[str, bytes], object],
        on_look: Callable[[], object],
        on_peers: Callable[[], object],
        on_displaced: Callable[[], object],
        on_read: Callable[[], object],
    ) -> None:
        self._config = config
        self._dirs = dirs
        self._counters = counters
        self._life = life
        # Whether log/ is watched too, for appends: when this peer has no doorbell.
        self._watch_log = watch_log
        self._on_news = on_news  # a writer's segment appeared or grew
        self._on_look = on_look  # look at every writer: events were lost, or unclear
        self._on_peers = on_peers  # peers/ changed
        self._on_displaced = on_displaced  # a directory of the namespace removed or renamed
        self._on_read = on_read  # read now what was said
        self.kind: str | None = None  # "inotify" or "watchfiles", once started
        self._inotify: int | None = None  # the inotify fd, read by `_inotify_loop`
        self._inotify_loop: asyncio.AbstractEventLoop | None = None
        self._own_prefix = f"{config.peer}-"
        # Deleted by another process (this one deletes them only when closing, or
        # announcing again): this peer was removed from peers/.
        self._own_files = (f"{config.peer}.lock", f"{config.peer}.sock", "log", "peers")
        self.watch_thread: threading.Thread | None = None
        self._watch_stop = threading.Event()
        self._watch_done: asyncio.Future[None] | None = None
        self._watch_error: BaseException | None = None
        self._watch_backoff = 0.0
        self._watch_retry_at = 0.0

    # -- the watcher --------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the watcher is watching (False before start and after a failure)."""
        if self.kind == "inotify":
            return self._inotify is not None
        thread = self.watch_thread
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        """Watch with inotify on the event loop; with the watchfiles thread where
        inotify cannot be had, or when `IVIP_IPC_WATCHER=watchfiles` asks for it."""
        choice = os.environ.get(WATCHER_ENV, "").strip().lower()
        if choice not in _WATCHERS:
            rate_limited(
                logging.WARNING,
                WATCHER_ENV,
                "%s=%r is not a watcher (inotify, watchfiles): using the default",
                WATCHER_ENV,
                choice,
            )
        if choice != "watchfiles" and LIBC is not None and sys.platform == "linux":
            try:
                self._start_inotify()
                return
            except (OSError, NotImplementedError) as exc:
                # Out of inotify instances (max_user_instances) or watches
                # (max_user_watches): watchfiles will likely fail the same way,
                # but it is tried, and restarted, all the same. Or a loop
                # without `add_reader` (NotImplementedError): the thread works.
                logger.warning("cannot watch with inotify (%s): using the watchfiles thread", exc)
        self._start_watchfiles()

    def _paths(self) -> list[tuple[str, int]]:
        """The directories to watch, with their inotify masks: peers/, and log/ when
        there is no doorbell. With doorbells, log/ is not watched: every append to a
        watched segment would cost each watching process an inotify event
        (measured: a 1 us write became 9 us with two watchers)."""
        paths = [("peers", _IN_PEERS)]
        if self._watch_log():
            paths.append(("log", _IN_LOG))
        return paths

    def _start_inotify(self) -> None:
        path, fds = self._config.path, self._dirs.fds
        loop = asyncio.get_running_loop()
        # Each directory of the namespace is watched for its own removal or
        # renaming too (rejoin.py); the namespace itself for nothing else.
        masks = dict(self._paths())
        masks.setdefault("log", IN_ONLYDIR)
        wanted: list[tuple[int, str | None, int]] = [
            (fds[name], str(path / name), mask | _IN_SELF) for name, mask in masks.items()
        ]
        wanted.append((fds["root"], str(path), _IN_ROOT))
        fd = open_inotify(wanted)
        try:
            loop.add_reader(fd, self._on_inotify)
        except BaseException:
            os.close(fd)
            raise
        self._inotify, self._inotify_loop = fd, loop
        self.kind = "inotify"
        self._watch_error = None

    def _on_inotify(self) -> None:
        fd = self._inotify
        if fd is None:
            return
        try:
            events = read_events(fd)
        except OSError as exc:
            # Never seen: the kernel's queue cannot fail. Stop, and let the
            # supervisor start a new watcher with backoff (re-scans deliver).
            self._stop_inotify()
            self._watch_failed(exc)
            return
        own = self._own_prefix
        count = 0
        lost = False
        displaced = False
        look = peers = False
        for _wd, mask, name in events:
            if mask & _IN_SELF or (mask & _GONE and name in self._own_files):
                displaced = True
                continue
            if mask & (IN_Q_OVERFLOW | IN_IGNORED):
                # Events were dropped, or a watched directory is gone: look at
                # everything. IN_IGNORED: the watch is dead, start a new one.
                look = peers = True
                lost = lost or bool(mask & IN_IGNORED)
                continue
            if name.startswith(own) or not name.endswith((".seg", ".sock", ".lock")):
                continue
            count += 1
            if not name.endswith(".seg"):
                peers = True
                continue
            m = SEGMENT_RE.match(name)
            if m is not None and mask & _IN_APPEARED:
                # What a doorbell would say: read this writer (a writer not known
                # yet asks for a full scan).
                self._on_news(m.group(1), m.group(2).encode())
            else:
                look = True
        self._counters.watch_events += count
        if look:
            self._on_look()
        if peers:
            self._on_peers()
        if displaced:
            self._on_displaced()
        if lost:
            self._stop_inotify()
            if not displaced:  # else the rejoin starts a new watcher, or says what is wrong
                self._watch_failed(OSError("a watched directory was removed or unmounted"))
        if count or look or peers:
            self._on_read()

    def _stop_inotify(self) -> None:
        """Stop reading the inotify fd and close it (safe when the loop is closed)."""
        fd, self._inotify = self._inotify, None
        loop, self._inotify_loop = self._inotify_loop, None
        if fd is None:
            return
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _start_watchfiles(self) -> None:
        step = self._config.watch_step
        loop = asyncio.get_running_loop()
        self.kind = "watchfiles"
        self._watch_done = loop.create_future()
        self._watch_stop.clear()
        paths = [str(self._config.path / name) for name, _mask in self._paths()]
        own = self._own_prefix

        def keep(_change: Any, path: str) -> bool:
            name = os.path.basename(path)
            return not name.startswith(own) and name.endswith((".seg", ".sock", ".lock"))

        def run() -> None:
            try:
                for changes in watchfiles.watch(
                    *paths,
                    watch_filter=keep,
                    step=step,
                    debounce=step * 4,
                    stop_event=self._watch_stop,
                    rust_timeout=0,
                    raise_interrupt=False,
                    recursive=False,
                    ignore_permission_denied=True,
                ):
                    _call_soon(loop, self._on_watch, changes)
            except Exception as exc:
                _call_soon(loop, self._watch_failed, exc)
            finally:
                _call_soon(loop, _resolve, self._watch_done)

        self.watch_thread = threading.Thread(target=run, name="ivip-ipc-watch", daemon=True)
        self.watch_thread.start()

    def _watch_failed(self, exc: BaseException) -> None:
        if not self._life.closing:
            self._watch_error = exc
            logger.warning(
                "the %s watcher stopped (%s): falling back to doorbells plus a re-scan "
                "every %.1fs until it can be restarted",
                self.kind,
                exc,
                self._config.rescan_interval,
            )

    def restart(self) -> None:
        """Watch the directories now at the namespace's path (rejoin.py): an
        inotify watcher is replaced at once; the watchfiles thread is told to
        stop, and its supervisor starts a new one at the next round."""
        if self._life.closing or self.kind is None:
            return
        self._watch_backoff = 0.0
        self._watch_retry_at = 0.0
        if self.kind == "inotify" or self._inotify is not None:
            self._stop_inotify()
            self.start()
        else:
            self._watch_error = OSError("the namespace directory was re-created")
            self._watch_stop.set()

    def supervise(self) -> None:
        """Restart a watcher that stopped, with a growing pause between tries (a
        new inotify watcher first, the watchfiles thread if that cannot be had)."""
        if self._life.closing or self.kind is None or self.alive:
            return
        now = time.monotonic()
        if now < self._watch_retry_at:
            return
        self._watch_backoff = min(60.0, max(1.0, self._watch_backoff * 2))
        self._watch_retry_at = now + self._watch_backoff
        self._counters.watcher_restarts += 1
        logger.warning("restarting the watcher (it stopped: %s)", self._watch_error)
        self.start()

    def _on_watch(self, changes: set[tuple[Any, str]]) -> None:
        self._counters.watch_events += len(changes)
        look = peers = False
        for _change, path in changes:
            if path.endswith(".seg"):
                look = True
            else:
                peers = True
        if look:
            self._on_look()
        if peers:
            self._on_peers()
        self._on_read()

    # -- the end -----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop watching: at once with inotify; the watchfiles thread is told to
        stop, and does within one `watch_step`."""
        self._stop_inotify()
        self._watch_stop.set()

    async def wait(self) -> None:
        """Wait for the watchfiles thread, if any, to end."""
        if self._watch_done is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._watch_done)
        if self.watch_thread is not None:
            self.watch_thread.join(1.0)  # it has said it is done: this is its last breath

    def close(self) -> None:
        """Close the inotify fd (the watchfiles thread is stopped by `stop`)."""
        self._stop_inotify()

    def drop_inherited(self) -> None:
        """In a forked child: close the parent's inotify fd, and leave the event
        loop alone (its epoll instance is the parent's too)."""
        inotify, self._inotify, self._inotify_loop = self._inotify, None, None
        if inotify is not None:
            with contextlib.suppress(OSError):
                os.close(inotify)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
        loop.call_soon_threadsafe(fn, *args)


def _resolve(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)
