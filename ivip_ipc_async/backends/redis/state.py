"""The namespace's state in Redis, as one process sees it: loading the cache
entries into the mirror, the namespace's marker (and the expiry of its keys),
the server's run id and evictions, and the periodic check that finds a
namespace Redis lost (FLUSHALL, eviction, a failover): a gap, and a reload."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

from ...logs import logger, rate_limited
from ...records import FrameReader, Kind, Record
from .connections import Connections, redacted
from .position import Position
from .replies import StreamInfo, field, is_no_such_key, parse_info, text
from .scripts import FETCH_SHA, KEEP_SHA, load_scripts
from .settings import Shared

__all__ = ["NamespaceState"]

PAGE: Final = 1000
"""Members asked of the index per SSCAN (and entries per `FETCH`, about)."""
SCAN_PAGE: Final = 5000
"""Keys of the database looked at per SCAN, when a load must scan (no index)."""
SLICE: Final = 500
"""Entries decoded before the loop may run (adjusted to stay near `SLICE_S`)."""
SLICE_S: Final = 0.005
"""About the longest a load holds the loop at a time, decoding (seconds)."""


def _page(reply: Any) -> tuple[int | None, list[bytes]]:
    """A SCAN or SSCAN reply: the next cursor (None: done) and the keys (only
    bytes: anything else Redis answered is skipped)."""
    if not isinstance(reply, (list, tuple)) or len(reply) != 2:
        raise ValueError(f"Redis answered a SCAN with {type(reply).__name__}")
    cursor = int(reply[0])
    keys = [key for key in reply[1] if isinstance(key, bytes)]
    return (cursor or None), keys


class NamespaceState:
    """What this process knows of the namespace's keys in Redis: the marker's
    token, the server's run id and `evicted_keys`, as last seen.

    Args:
        shared: What the backend's parts share (settings, counters, sink).
        connections: Its connections (requests go on `connections.control`).
        position: The listener's position (a lost stream resets it).
    """

    def __init__(self, shared: Shared, connections: Connections, position: Position) -> None:
        self._shared = shared
        self._settings = shared.settings
        self._connections = connections
        self._position = position
        self._counters = shared.counters
        self._garbage = shared.garbage
        self.marker: bytes | None = None  # the namespace's token, as last seen
        self.evicted: int | None = None  # the server's evicted_keys, as last seen
        self.info_refused = False  # INFO refused (an ACL): evictions go unnoticed
        self.run_id: str | None = None  # the server's; a new one means it restarted

    # -- the server ----------------------------------------------------------------------

    async def server_info(self) -> Any:
        """INFO (server, memory, stats ...), or {} when the user may not ask."""
        from redis.exceptions import NoPermissionError, ResponseError

        try:
            return await self._connections.control.info()
        except ResponseError as exc:
            if isinstance(exc, NoPermissionError) or "no permissions" in str(exc):
                return {}
            raise

    def note_server(self, info: Any) -> None:
        """Note what INFO said at start (the run id, evictions so far), and warn
        of an evicting `maxmemory-policy`."""
        self.run_id = text(field(info, "run_id"))
        self.info_refused = not info
        self.evicted = int(field(info, "evicted_keys") or 0) if info else None
        policy = text(field(info, "maxmemory_policy"))
        if policy and policy != "noeviction":
            logger.warning(
                "Redis at %s has maxmemory-policy %s: when full it may evict this "
                "library's keys (every process then reports a gap and reloads its "
                "cache). Use noeviction (writes then fail with BackendFullError "
                "when Redis is full)",
                redacted(self._settings.url),
                policy,
            )

    async def server_restarted(self) -> bool:
        """Whether the server's run id changed since last seen (None when INFO is
        refused: then never)."""
        from redis.exceptions import ResponseError

        try:
            info = await self._connections.control.info("server")
        except ResponseError:
            run_id = None
        else:
            run_id = text(field(info, "run_id"))
        restarted = None not in (run_id, self.run_id) and run_id != self.run_id
        self.run_id = run_id
        return restarted

    async def stream_info(self) -> StreamInfo | None:
        """XINFO STREAM, or None when the stream does not exist."""
        from redis.exceptions import ResponseError

        try:
            return parse_info(
                await self._connections.control.xinfo_stream(self._settings.stream_key)
            )
        except ResponseError as exc:
            if is_no_such_key(exc):
                return None
            raise

    # -- the cache entries ---------------------------------------------------------------

    async def load(self) -> None:
        """Load every cache entry into the sink (the caller noted the stream's position).

        Changes made during the load are in the stream after that position, so
        reading on from it brings the state up to date.

        The entries come from the namespace's index (`Settings.index_key`): a
        cost in this namespace's entries, whatever else the database holds.
        An index without its empty member (written by the previous version,
        lost, expired while entries without TTL stayed) is not trusted: the
        entries come from a SCAN of the database instead, which builds the
        index as it goes (every write adds to it, so once the SCAN is done
        the index holds every entry) and marks it complete.
        """
        from redis.exceptions import NoScriptError

        client = self._connections.control
        assert client is not None
        assert self._shared.sink is not None
        settings = self._settings
        index = settings.index_key
        complete = bool(await client.sismember(index, b""))
        cut = len(settings.entry_prefix)
        if complete:
            await self._load_pages(
                lambda pipe, cursor: pipe.sscan(index, cursor, count=PAGE),
                lambda members: [settings.entry_prefix + m for m in members if m],
                build=False,
            )
            return
        pattern = settings.entry_prefix + b"*"
        built = await self._load_pages(
            lambda pipe, cursor: pipe.scan(cursor, match=pattern, count=SCAN_PAGE),
            lambda keys: [key for key in keys if len(key) > cut],
            build=True,
        )
        if not built:  # Redis was full: the next load scans again
            return
        # Every entry is in the index now: mark it complete (unless Redis is full).
        done = (FETCH_SHA, 1, index, cut, b"2", int(settings.state_ttl * 1000))
        try:
            await client.evalsha(*done)
        except NoScriptError:  # Redis restarted meanwhile
            await load_scripts(client)
            await client.evalsha(*done)

    async def _load_pages(
        self,
        page: Callable[[Any, int], Any],
        keys_of: Callable[[list[bytes]], list[bytes]],
        *,
        build: bool,
    ) -> bool:
        """The load's pages: each round trip asks for the next page of keys
        (`page(pipeline, cursor)` queues an SSCAN or a SCAN) and the entries of
        the page before (one `FETCH` script), while this process decodes the
        entries of the page before that, in slices that give the loop back.
        Returns whether every entry found was added to the index (`build`)."""
        from redis.exceptions import NoScriptError

        client = self._connections.control
        settings = self._settings
        head = (len(settings.entry_prefix), b"1" if build else b"0")
        ttl = int(settings.state_ttl * 1000)
        cursor: int | None = 0
        keys: list[bytes] = []
        frames: list[Any] = []
        fetched: list[bytes] = []
        built = True
        while cursor is not None or keys:
            pipe = client.pipeline(transaction=False)
            if cursor is not None:
                page(pipe, cursor)
            if keys:
                pipe.evalsha(FETCH_SHA, 1 + len(keys), settings.index_key, *keys, *head, ttl)
            request = asyncio.ensure_future(pipe.execute(raise_on_error=False))
            try:
                await self._restore(fetched, frames)  # meanwhile
            except BaseException:
                request.cancel()
                raise
            replies = list(await request)
            frames, fetched = [], []
            if cursor is not None:
                reply = replies.pop(0)
                if isinstance(reply, Exception):
                    raise reply
                cursor, found = _page(reply)
                next_keys = keys_of(found)
            else:
                next_keys = []
            if keys:
                reply = replies.pop(0)
                if isinstance(reply, NoScriptError):  # Redis restarted: this page again
                    await load_scripts(client)
                    next_keys = keys + next_keys
                elif isinstance(reply, Exception):
                    raise reply
                elif isinstance(reply, list) and len(reply) == len(keys) + 1:
                    frames, fetched = reply[:-1], keys
                    built = built and reply[-1] == 1
                else:  # not one answer per entry: none of them is trusted
                    self._garbage(0, "an answer to FETCH that is not one per entry")
                    built = False
            keys = next_keys
        await self._restore(fetched, frames)
        return built

    async def _restore(self, keys: list[bytes], frames: list[Any]) -> None:
        """Decode a page's frames and hand their records to the sink, a slice at a
        time, giving the loop back between slices (each at most ~`SLICE_S`).
        Anything but a frame or "none" is garbage: skipped and counted."""
        assert self._shared.sink is not None
        loop = asyncio.get_running_loop()
        at, size = 0, SLICE
        while at < len(frames):
            began = loop.time()
            found: list[bytes] = []
            for key, frame in zip(keys[at : at + size], frames[at : at + size], strict=False):
                if isinstance(frame, bytes):
                    if frame:
                        found.append(frame)
                elif frame != 0:  # -1: the key is no hash; anything else: not ours
                    self._garbage(len(key), "a cache entry that is not a hash")
            self._shared.sink.restore(self._decode(found))
            at += size
            took = loop.time() - began
            if took > SLICE_S and size > 50:
                size //= 2
            elif took < SLICE_S / 2:
                size = min(size * 2, 4 * SLICE)
            if at < len(frames):
                await asyncio.sleep(0)

    async def reload(self) -> None:
        """Drop the mirror, load the entries again, and have the mirror serve reads."""
        assert self._shared.sink is not None
        self._shared.sink.mirror_ready(False)
        await self.load()
        self._shared.sink.mirror_ready(True)

    def _decode(self, frames: list[bytes]) -> list[Record]:
        """The records of entries' frames: parsed joined (half the cost of one
        parse each), unless that finds garbage; then one at a time, so that an
        entry's garbage (a forged length, say) cannot hide the entries after it."""
        max_size = self._settings.max_record_size
        joined = FrameReader(max_size, None)
        records = joined.feed(b"".join(frames))
        if len(records) == len(frames) and not joined.skipped_bytes and not joined.pending:
            return records
        reader = FrameReader(max_size, self._garbage)
        records = []
        for frame in frames:
            records += reader.feed(frame)
            reader.discard_pending()  # one frame per entry: never joined
        return records

    # -- the marker, and losses ----------------------------------------------------------

    async def keep(self) -> bool:
        """Check the namespace's marker (and refresh the keys' expiry): False when
        Redis lost the namespace's state since the last check."""
        from redis.exceptions import NoScriptError

        settings = self._settings
        client = self._connections.control
        call = (
            KEEP_SHA,
            3,
            settings.marker_key,
            settings.stream_key,
            settings.index_key,
            secrets.token_hex(8),
            int(settings.state_ttl * 1000),
        )
        try:
            token = await client.evalsha(*call)
        except NoScriptError:  # Redis restarted, or SCRIPT FLUSH
            await load_scripts(client)
            token = await client.evalsha(*call)
        token = token if isinstance(token, bytes) else str(token).encode()
        kept = self.marker is None or token == self.marker
        self.marker = token
        return kept

    async def marker_lost(self) -> bool:
        """`keep`, with a refusal (OOM, a read-only replica: the writes say so)
        logged and taken for "not lost"."""
        from redis.exceptions import ResponseError

        try:
            return not await self.keep()
        except ResponseError as exc:
            rate_limited(
                logging.WARNING,
                ("redis-keep", self._settings.stream_key),
                "Redis refused the namespace check (%s)",
                exc,
            )
            return False

    async def lost(self, why: str) -> None:
        """Redis lost (some of) the namespace's keys: report a gap of unknown size
        (the caller reloads the cache state)."""
        assert self._shared.sink is not None
        self._counters["gaps"] += 1
        self._counters["state_losses"] += 1
        # The stream's counts are not the ones this reader kept. A stream that is
        # gone is all news when it comes back (reported here, not again later).
        self._position.added = None
        if await self.stream_info() is None:
            self._position.last_id, self._position.added = b"0-0", 0
        logger.warning(
            "records may have been lost before this process read them from Redis "
            "(%s; how many is unknown): reloading the cache state",
            why,
        )
        self._shared.sink.gap("redis", None)

    async def check(self) -> None:
        """The periodic check (from the listener): did Redis lose the namespace's
        keys (the marker gone or made anew: FLUSHALL, FLUSHDB, eviction, a
        failover) or evict keys (ours may be among them)? Then report a gap and
        reload. Also refreshes the keys' expiry, and closes the connection of
        cache reads once the mirror serves them again."""
        from redis.exceptions import ResponseError

        assert self._shared.sink is not None
        self._counters["state_checks"] += 1
        await self._connections.close_read_client()
        why = None
        if await self.marker_lost():
            why = "the namespace's keys are gone from Redis"
        if not self.info_refused:
            try:
                stats = await self._connections.control.info("stats")
            except ResponseError:  # INFO refused (an ACL): evictions go unnoticed
                self.info_refused = True
            else:
                evicted = int(field(stats, "evicted_keys") or 0)
                before, self.evicted = self.evicted, evicted
                if before is not None and evicted > before and why is None:
                    missing = await self._entries_missing()
                    if missing:
                        why = f"Redis evicted {missing} or more of this namespace's cache entries"
        if why is not None:
            self._shared.sink.mirror_ready(False)
            await self.lost(why)
            await self.load()
            self._shared.sink.mirror_ready(True)

    async def _entries_missing(self) -> int:
        """How many of the mirror's live entries (not about to expire) Redis no
        longer has: after evictions, whether ours were among them (a cost in
        this namespace's size, where a reload would scan the whole database)."""
        assert self._shared.sink is not None
        soon = time.time() + 1.0
        keys = [
            self._settings.entry_key(record.topic, record.key)
            for record in self._shared.sink.state()
            if record.kind is Kind.CACHE_SET and (not record.expires or record.expires > soon)
        ]
        missing = 0
        for at in range(0, len(keys), 1000):
            chunk = keys[at : at + 1000]
            missing += len(chunk) - int(await self._connections.control.exists(*chunk))
        return missing
