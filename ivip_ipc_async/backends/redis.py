"""The Redis backend: the same records, through a Redis stream, for several hosts.

Selected by `AsyncIPC("redis://host:6379/0", namespace=...)` (also `rediss://`
and `unix://`); redis-py is imported only then (`pip install ivip-ipc-async[redis]`).

Keys of a namespace (the `{ns}` hash tag keeps them in one cluster slot):

    ivip:{ns}:log          a stream: one entry per record, field "r" = the frame
    ivip:{ns}:c:<topic>\\0<key>   a hash per cache entry: "r" = frame, "v" = version

Why a stream and not pub/sub: `XADD` returning means the record is stored in
Redis, and each peer reads the stream from the last id it saw, so a peer that
was disconnected for a moment gets what was sent meanwhile (pub/sub would drop
it), and one that fell behind the trim window knows it (`max-deleted-entry-id`).
Order is the stream's: one total order, so per-sender order holds.

Cache writes go through one Lua script that keeps the entry only if its
`(hlc, node)` is newer (last writer wins, as in the mirror) and appends the
record to the stream, atomically. Entries carry their TTL (`PEXPIREAT`); deletes
are tombstones that expire after `tombstone_ttl`. A joiner scans the entries,
then reads the stream from the id it noted before the scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from ..logs import logger
from ..records import FrameReader, Kind, Record, encode_frame
from .base import RecordSink

__all__ = ["RedisBackend"]

_SET_IF_NEWER: Final = """
local current = redis.call('HGET', KEYS[1], 'v')
if current and current >= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'r', ARGV[1])
local expires = tonumber(ARGV[3])
if expires > 0 then
  redis.call('PEXPIREAT', KEYS[1], expires)
else
  redis.call('PERSIST', KEYS[1])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'r', ARGV[1])
return 1
"""


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _id_tuple(stream_id: bytes | str) -> tuple[int, int]:
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class RedisBackend:
    """Records through a Redis stream; cache state in Redis hashes.

    Args:
        url: `redis://`, `rediss://` or `unix://` URL (as redis-py takes it).
        namespace: Instances in different namespaces do not hear each other.
        max_record_size: Largest record, in bytes.
        stream_maxlen: Entries kept in the stream (approximately): the window a
            disconnected or slow peer can catch up on.
        tombstone_ttl: Seconds a delete is remembered in Redis.
        block_ms: Longest wait of one `XREAD BLOCK` call.
        **redis_options: Passed to `redis.asyncio.Redis.from_url` (e.g. `protocol=2`).

    Example:
        >>> backend = RedisBackend("redis://127.0.0.1:6379/0", namespace="docs")
        >>> backend.stream_key
        'ivip:{docs}:log'
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "default",
        max_record_size: int = 16 << 20,
        stream_maxlen: int = 100_000,
        tombstone_ttl: float = 120.0,
        block_ms: int = 10_000,
        **redis_options: Any,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.max_record_size = max_record_size
        self.stream_maxlen = stream_maxlen
        self.tombstone_ttl = tombstone_ttl
        self.block_ms = block_ms
        self.redis_options = redis_options
        self.node = secrets.randbits(63) or 1
        self.stream_key = f"ivip:{{{namespace}}}:log"
        self.entry_prefix = f"ivip:{{{namespace}}}:c:".encode()
        self._client: Any = None
        self._reader_client: Any = None
        self._script: Any = None
        self._sink: RecordSink | None = None
        self._last_id: bytes | str = b"0-0"
        self._seq = 0
        self._listener: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._queue: list[tuple[Sequence[Record], asyncio.Future[None]]] = []
        self._closing = False
        self._connected = False
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "records_written",
                "records_read",
                "reconnects",
                "connection_errors",
                "gaps",
                "resyncs",
                "garbage_bytes",
                "task_failures",
            ),
            0,
        )

    # -- life -------------------------------------------------------------------------

    def _make_client(self) -> Any:
        import redis.asyncio as aioredis

        return aioredis.Redis.from_url(self.url, **self.redis_options)

    async def start(self, sink: RecordSink) -> None:
        """Connect, load the cache state, and start the listener task."""
        self._sink = sink
        self._client = self._make_client()
        self._reader_client = self._make_client()
        try:
            await self._client.ping()
            self._script = self._client.register_script(_SET_IF_NEWER)
            await self._load_state()
        except BaseException:
            await self._close_clients()
            raise
        self._connected = True
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(), name="ivip-ipc-redis-listener"
        )

    async def close(self) -> None:
        """Stop the listener and close the connections."""
        if self._writer is not None:  # what was accepted is sent first
            await asyncio.gather(self._writer, return_exceptions=True)
        self._closing = True
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await self._close_clients()

    async def _close_clients(self) -> None:
        for client in (self._client, self._reader_client):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._client = self._reader_client = None

    def abandon(self) -> None:
        """The loop is gone: drop the connections without awaiting."""
        self._closing = True
        if self._listener is not None and not self._listener.get_loop().is_closed():
            self._listener.cancel()
        self._client = self._reader_client = None

    # -- state -------------------------------------------------------------------------

    def _entry_key(self, topic: str, key: bytes) -> bytes:
        return self.entry_prefix + topic.encode() + b"\x00" + key

    async def _load_state(self) -> None:
        """Note where the stream ends, then load every cache entry (a joiner's view)."""
        assert self._client is not None
        assert self._sink is not None
        newest = await self._client.xrevrange(self.stream_key, count=1)
        self._last_id = newest[0][0] if newest else b"0-0"
        reader = FrameReader(self.max_record_size)
        cursor = 0
        pattern = self.entry_prefix + b"*"
        while True:
            cursor, keys = await self._client.scan(cursor, match=pattern, count=1000)
            if keys:
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.hget(key, "r")
                frames = await pipe.execute()
                records: list[Record] = []
                for frame in frames:
                    if frame:
                        records += reader.feed(frame)
                self._sink.restore(records)
            if cursor == 0:
                break

    async def fetch(self, topic: str, key: bytes) -> Record | None:
        """One cache entry, read from Redis (while the mirror is being rebuilt)."""
        if self._client is None:
            return None
        frame = await self._client.hget(self._entry_key(topic, key), "r")
        if not frame:
            return None
        records = FrameReader(self.max_record_size).feed(frame)
        return records[0] if records else None

    # -- writing -------------------------------------------------------------------------

    async def append(self, records: Sequence[Record]) -> None:
        """Queue records for the one writer task; return once Redis has them.

        One writer sends everything queued as one pipeline (group commit), so
        concurrent appends share a round trip and keep their order.
        """
        if self._closing or self._client is None:
            raise ConnectionAbortedError("the IPC instance is closed")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((records, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_queued())
        await fut

    async def _write_queued(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self._send([r for records, _ in batch for r in records])
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def _send(self, records: list[Record]) -> None:
        """XADD messages; cache records through the last-writer-wins script."""
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        now_ms = int(time.time() * 1000)
        for record in records:
            self._seq += 1
            frame = encode_frame(record, self._seq)
            if record.kind is Kind.MESSAGE:
                pipe.xadd(
                    self.stream_key,
                    {"r": frame},
                    maxlen=self.stream_maxlen,
                    approximate=True,
                )
                continue
            if record.kind is Kind.CACHE_SET:
                expires_ms = int(record.expires * 1000) if record.expires else 0
            else:
                expires_ms = now_ms + int(self.tombstone_ttl * 1000)
            version = f"{record.hlc:020d}{record.node:020d}"
            await self._script(
                keys=[self._entry_key(record.topic, record.key), self.stream_key],
                args=[frame, version, expires_ms, self.stream_maxlen],
                client=pipe,
            )
        await pipe.execute()
        self.counters["records_written"] += len(records)

    # -- reading -------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Read the stream forever; reconnect with backoff; never die silently."""
        backoff = 0.1
        while not self._closing:
            try:
                await self._read_forever()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection lost, server restarting, ...
                # (close() cancels this task: a closing instance never gets here)
                self.counters["connection_errors"] += 1
                if self._connected:
                    self._connected = False
                    if self._sink is not None:
                        self._sink.mirror_ready(False)  # reads go to Redis meanwhile
                    logger.warning("lost the Redis connection (%s); reconnecting", exc)
                await asyncio.sleep(backoff * (1 + random.random() / 2))
                backoff = min(backoff * 2, 5.0)
                try:
                    await self._reconnect()
                except Exception as again:
                    logger.info("Redis still unavailable (%s); retrying in %.1fs", again, backoff)
                    continue
                backoff = 0.1

    async def _reconnect(self) -> None:
        """Back after a disconnect: check for a gap, rebuild the cache state."""
        assert self._client is not None
        assert self._sink is not None
        await self._client.ping()
        self.counters["reconnects"] += 1
        try:
            info = await self._client.xinfo_stream(self.stream_key)
        except Exception:
            info = None  # no stream: a restarted server without persistence
        last_seen = _id_tuple(self._last_id)
        lost = False
        if info is None:
            lost = last_seen != (0, 0)
        else:
            deleted = info.get("max-deleted-entry-id") or info.get(b"max-deleted-entry-id")
            newest = info.get("last-generated-id") or info.get(b"last-generated-id")
            if deleted is not None and _id_tuple(deleted) > last_seen:
                lost = True  # entries after our position were trimmed away
            if newest is not None and _id_tuple(newest) < last_seen:
                lost = True  # the server forgot what we had read: it restarted
                self._last_id = b"0-0"
        if lost:
            self.counters["gaps"] += 1
            logger.warning(
                "records may have been lost while disconnected from Redis "
                "(trimmed or a server restart): reloading the cache state"
            )
            self._sink.gap("redis", 0)
        # The stream may have had a gap: rebuild the mirror from Redis's state.
        self.counters["resyncs"] += 1
        position = self._last_id
        await self._load_state()
        if not lost:
            self._last_id = position  # messages sent meanwhile are still to be read
        self._connected = True
        self._sink.mirror_ready(True)
        logger.info("reconnected to Redis")

    async def _read_forever(self) -> None:
        assert self._reader_client is not None
        assert self._sink is not None
        reader = FrameReader(self.max_record_size)
        while not self._closing:
            response = await self._reader_client.xread(
                {self.stream_key: self._last_id}, count=1000, block=self.block_ms
            )
            if not response:
                continue
            streams = response.items() if isinstance(response, dict) else response
            for _name, entries in streams:
                if entries and isinstance(entries[0], list):
                    entries = entries[0]  # RESP3 nests the entries one level deeper
                fresh: list[Record] = []
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    frame = fields.get(b"r") or fields.get("r")
                    if not frame:
                        continue
                    for record in reader.feed(frame):
                        if record.node != self.node:
                            fresh.append(record)
                if fresh:
                    self.counters["records_read"] += len(fresh)
                    self._sink.deliver(fresh)

    # -- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Connection state and counters."""
        listener = self._listener
        return {
            "backend": "redis",
            "url": _redacted(self.url),
            "namespace": self.namespace,
            "peer": f"{self.node:016x}",
            "connected": self._connected,
            "maintenance_alive": listener is not None and not listener.done(),
            "last_id": self._last_id.decode()
            if isinstance(self._last_id, bytes)
            else str(self._last_id),
            **self.counters,
        }
