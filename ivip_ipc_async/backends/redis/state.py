"""The namespace's state in Redis, as one process sees it: loading the cache
entries into the mirror, the namespace's marker (and the expiry of its keys),
the server's run id and evictions, and the periodic check that finds a
namespace Redis lost (FLUSHALL, eviction, a failover): a gap, and a reload."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from ...logs import logger, rate_limited
from ...records import FrameReader, Kind, Record
from .connections import Connections, redacted
from .position import Position
from .replies import StreamInfo, field, is_no_such_key, parse_info, text
from .scripts import KEEP_SHA, load_scripts
from .settings import Shared

__all__ = ["NamespaceState"]


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

        Changes made during the scan are in the stream after that position, so
        reading on from it brings the state up to date.
        """
        client = self._connections.control
        assert client is not None
        assert self._shared.sink is not None
        reader = FrameReader(self._settings.max_record_size, self._garbage)
        cursor = 0
        pattern = self._settings.entry_prefix + b"*"
        while True:
            cursor, keys = await client.scan(cursor, match=pattern, count=1000)
            if keys:
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.hget(key, "r")
                frames = await pipe.execute()
                records: list[Record] = []
                for frame in frames:
                    if frame:
                        records += reader.feed(frame)
                        reader.discard_pending()  # one frame per entry: never joined
                self._shared.sink.restore(records)
            if int(cursor) == 0:
                break

    async def reload(self) -> None:
        """Drop the mirror, load the entries again, and have the mirror serve reads."""
        assert self._shared.sink is not None
        self._shared.sink.mirror_ready(False)
        await self.load()
        self._shared.sink.mirror_ready(True)

    # -- the marker, and losses ----------------------------------------------------------

    async def keep(self) -> bool:
        """Check the namespace's marker (and refresh the keys' expiry): False when
        Redis lost the namespace's state since the last check."""
        from redis.exceptions import NoScriptError

        settings = self._settings
        client = self._connections.control
        call = (
            KEEP_SHA,
            2,
            settings.marker_key,
            settings.stream_key,
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
