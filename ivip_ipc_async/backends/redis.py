"""The Redis backend: the same records, stored in a Redis stream and pushed by
pub/sub, for processes on several hosts.

Selected by `AsyncIPC("redis://host:6379/0", namespace=...)` (also `rediss://`
and `unix://`); redis-py is imported only then (`pip install ivip-ipc-async[redis]`).
Works with redis-py 5 to 8, over RESP2 and RESP3 (`protocol=2` or `3`).

Keys of a namespace (the `{ns}` hash tag keeps them in one cluster slot):

    ivip:{ns}:log          a stream: one entry per write, field "r" = the frame
    ivip:{ns}:live         the channel: "<stream id> <frame>" per entry
    ivip:{ns}:id           the namespace's marker: a token (see the gaps below)
    ivip:{ns}:c:<topic>\\0<key>   a hash per cache entry: "r" = frame, "v" = version

Why both: `XADD` returning means the record is stored in Redis, and a peer that
was disconnected catches up from the stream where it was (pub/sub alone would
drop what was sent meanwhile, and tell nobody); live peers get each record
pushed, with no read request per record (a stream alone costs every instance a
read per write, its own included: half the throughput). Each write is one Lua
script that stores and publishes atomically, so pushes follow the stream's
order: one total order, so per-sender order holds.

Cache writes go through a script that keeps the entry only if its `(hlc, node)`
is newer (last writer wins, as in the mirror), then stores and publishes the
record. Entries carry their TTL (`PEXPIREAT`); deletes are tombstones that
expire after `tombstone_ttl`. A joiner notes where the stream ends, scans the
entries, then subscribes and reads the stream on from the id it noted.

The guarantee, and what a lost connection does:

- **Acknowledged means stored in Redis.** `notify` / `cache.set` return once
  Redis has the record. A connection that breaks meanwhile (server restart,
  failover, `CLIENT KILL`, network) is retried with backoff for up to
  `retry_timeout` seconds, then the call raises `BackendUnavailableError` (a
  `ConnectionError`): that record was not acknowledged, and may or may not
  have been stored. Retried writes are never delivered twice nor out of order
  (readers drop a sender's sequence numbers they have already seen; a retried
  cache write loses to itself in the last-writer-wins script). A write whose
  outcome is unknown and that Redis did store (or runs late, after a freeze)
  reaches every process, the writer's own mirror included: the writer applies
  its own records pushed back by Redis for a while after such a failure, and
  a reconnection reloads the state anyway. A write Redis refuses (`OOM`, an
  ACL) raises `BackendFullError` / `BackendPermissionError`: nothing stored;
  in a pipeline of several, the others are stored, acknowledged and applied.
  What Redis itself loses (a restart without persistence, an asynchronous
  replica promoted, `FLUSHALL`, eviction) is beyond this guarantee, and is
  reported as a gap (below).
- **A subscribed peer loses nothing**, whatever happens to the stream: Redis
  pushes it every record. One too slow for Redis's output buffer limit is
  disconnected by Redis, which is a disconnect like any other.
- **The listener never dies silently.** Any error, any reconnection of its
  connection (a guard: redis-py can reopen one silently when sending, and would
  call the backend back), and a PING unanswered (sent after `ping_interval`
  seconds of silence) count as a disconnect: `stats()["connected"]` turns False,
  the cache mirror is dropped (cache reads go to Redis meanwhile, and raise
  `BackendUnavailableError` after `read_timeout`), the listener reconnects with
  backoff (0.1 s to 5 s, counted in `reconnects` / `connection_errors`,
  logged), subscribes, reloads the cache state from Redis, and catches up from
  the stream where it was: messages sent while it was away are delivered, in
  order.
- **Gaps are reported.** The catch-up reads are checked (a `MULTI` of `XINFO
  STREAM` and `XREAD`): if entries after the reader's position were trimmed
  before it read them (the oldest entry left is past its position and
  `entries-added` says more were added after it than are left; Redis 7+, on
  Redis 6 a full stream past the position counts), or deleted (the counts, or
  `max-deleted-entry-id`), or the server restarted and lost what this reader
  had read (its `run_id` changed and the stream is behind the position; a
  restart that kept everything is no gap), or the stream was deleted, the
  backend logs a warning, emits `ivip:gap` (`{"peer": "redis", "lost": n}`,
  `n` the stream entries lost, None when unknown), counts `gaps` /
  `records_lost`, drops the mirror and reloads it from Redis, then reads on
  from the oldest entry left. Every `state_check_interval` seconds the
  listener also checks the namespace's marker key (`ivip:{ns}:id`, a token
  made by the first process) and the server's `evicted_keys`: a marker gone
  or replaced (FLUSHALL, FLUSHDB, eviction, a failover to a replica without
  it), or after evictions an entry of the mirror gone from Redis, is a gap of
  unknown size, and a reload.
- **Nothing of ours outlives its use.** The stream and the marker expire
  `state_ttl` seconds after the last process stopped refreshing them; cache
  entries carry their own TTL (those written without one stay); the stream is
  trimmed by count (`stream_maxlen`) and by bytes (`stream_max_bytes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NamedTuple, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

from ..errors import (
    BackendError,
    BackendFullError,
    BackendPermissionError,
    BackendUnavailableError,
)
from ..logs import logger, rate_limited
from ..records import (
    HEADER_SIZE,
    MAGIC,
    NODE_OFFSET,
    FrameReader,
    Kind,
    Record,
    encode_frame,
)
from .base import RecordSink
from .redis_lease import RedisLeases

__all__ = ["RedisBackend", "check_redis_url"]

_T = TypeVar("_T")

# Both scripts store the record in the stream and publish it, with its stream id, in
# one atomic step: live readers get it pushed, in stream order, and tell a push
# from an entry they already read (while catching up) by its id.
_APPEND: Final = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'r', ARGV[1])
redis.call('PUBLISH', ARGV[3], id .. ' ' .. ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return id
"""

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
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'r', ARGV[1])
redis.call('PUBLISH', ARGV[5], id .. ' ' .. ARGV[1])
if redis.call('PTTL', KEYS[2]) == -1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
return 1
"""

# The namespace's marker: a token made by the first process; a process that finds
# it gone, or another token in its place, knows that Redis lost the namespace's
# state (FLUSHALL, eviction, a failover) and reloads. It also keeps the stream and
# itself expiring `state_ttl` after the last process stopped refreshing them.
_KEEP: Final = """
local ttl = tonumber(ARGV[2])
local token = redis.call('GET', KEYS[1])
if not token then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  token = ARGV[1]
end
for _, key in ipairs(KEYS) do
  local left = redis.call('PTTL', key)
  if left == -1 or (left >= 0 and left < ttl / 2) then
    redis.call('PEXPIRE', key, ttl)
  end
end
return token
"""

# Every write command the backend sends, on a key of the namespace that is gone
# when the script ends, and a PUBLISH of nothing (readers skip it): a user that
# lacks one of them is refused at start, before anything is stored.
_PROBE: Final = """
redis.call('HSET', KEYS[1], 'v', '')
redis.call('HGET', KEYS[1], 'v')
redis.call('PERSIST', KEYS[1])
redis.call('PEXPIRE', KEYS[1], 60000)
redis.call('PTTL', KEYS[1])
redis.call('PEXPIREAT', KEYS[1], 1)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', 1, '*', 'r', '')
redis.call('PEXPIREAT', KEYS[1], 1)
redis.call('SET', KEYS[1], '', 'PX', 60000)
redis.call('GET', KEYS[1])
redis.call('PEXPIREAT', KEYS[1], 1)
redis.call('PUBLISH', ARGV[1], '')
return 1
"""

_SCRIPTS: Final = (_APPEND, _SET_IF_NEWER, _KEEP, _PROBE)
_APPEND_SHA, _SET_IF_NEWER_SHA, _KEEP_SHA, _PROBE_SHA = (
    hashlib.sha1(script.encode()).hexdigest() for script in _SCRIPTS
)

_READ_COUNT: Final = 1000  # stream entries per catch-up read
_SEEN_PEERS: Final = 4096  # senders whose last sequence number is remembered (LRU)

StreamId = tuple[int, int]
# An encoded write: frame, cache entry key (None: messages), version, expiry ms,
# and the cache record it carries (None: messages).
_Op = tuple[bytes, bytes | None, str, int, Record | None]
_OWN_WINDOW: Final = 30.0  # seconds own pushes are applied after an unknown outcome
_STORED: Final[list[Exception | None]] = [None]  # `_send`'s answer for one op, stored


class _Reconnected(ConnectionError):
    """The listener's connection was re-established behind its back (by redis-py)."""


class _StreamInfo(NamedTuple):
    """What `XINFO STREAM` says, normalised (Redis 6 lacks `deleted` and `added`)."""

    last: StreamId  # last-generated-id
    last_raw: bytes | str
    length: int
    first: StreamId | None  # the oldest entry still there
    deleted: StreamId | None  # max-deleted-entry-id (Redis 7+)
    added: int | None  # entries-added (Redis 7+)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def check_redis_url(url: str) -> None:
    """Refuse, with a `ValueError` naming the problem, a Redis URL that redis-py
    would misread (a missing host, a database that is not a number, ...).

    Example:
        >>> check_redis_url("redis://cache.internal:6379/2")
        >>> check_redis_url("redis://cache/abc")
        Traceback (most recent call last):
        ...
        ValueError: bad Redis URL 'redis://cache/abc': the database must be a number, not 'abc'
    """
    shown = _redacted(url) if "://" in url else url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()

    def bad(problem: str) -> ValueError:
        return ValueError(f"bad Redis URL {shown!r}: {problem}")

    if scheme not in ("redis", "rediss", "unix") or not url[len(scheme) :].startswith("://"):
        raise bad("it must start with redis://, rediss:// or unix://")
    try:
        port = parts.port
    except ValueError as exc:  # not a number, or out of range
        raise bad(f"the port must be a number from 1 to 65535 ({exc})") from None
    query = parse_qs(parts.query)
    db_texts = [parts.path.strip("/")] if scheme != "unix" else []
    db_texts += query.get("db", [])
    if scheme == "unix":
        if not parts.path:
            raise bad("no socket path (unix:///path/to/redis.sock)")
    else:
        if not parts.hostname:
            raise bad("no host (redis://host:6379/0)")
        if port == 0:
            raise bad("the port must be a number from 1 to 65535")
    for text in db_texts:
        if text and not (text.isascii() and text.isdigit()):
            raise bad(f"the database must be a number, not {text!r}")


def _wrap(exc: BaseException, doing: str, url: str) -> Exception:
    """A redis-py error (or a timeout) as one of the library's documented errors,
    with the original as its `__cause__`."""
    wrapped = _wrapped(exc, doing, url)
    if wrapped is not exc:
        wrapped.__cause__ = exc
    return wrapped


def _wrapped(exc: BaseException, doing: str, url: str) -> Exception:
    from redis import exceptions as rx

    where = f"Redis at {_redacted(url)}"
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError | rx.NoPermissionError):
        return BackendPermissionError(f"{where} refused {doing}: {exc}")
    text = str(exc)
    if isinstance(exc, rx.ResponseError) and (
        re.search(r"\b(NOPERM|WRONGPASS|NOAUTH)\b", text) or "can't run this command" in text
    ):
        return BackendPermissionError(f"{where} refused {doing}: {exc}{_script_command(text)}")
    if isinstance(exc, rx.OutOfMemoryError) or (
        isinstance(exc, rx.ResponseError) and "OOM command not allowed" in text
    ):
        return BackendFullError(f"{where} is out of memory and refused {doing}: {exc}")
    if isinstance(exc, rx.ConnectionError | rx.TimeoutError | OSError):
        return BackendUnavailableError(f"{where} could not be reached ({doing}): {exc}")
    return BackendError(f"{where} refused {doing}: {exc}")


def _script_command(error: str) -> str:
    """The command of ours at the script line a Redis error names (Redis 7.0 says
    only "can't run this command ... script: <sha>, on @user_script:<line>")."""
    found = re.search(r"script: ([0-9a-f]{40}), on @user_script:(\d+)", error)
    if found is None:
        return ""
    scripts = dict(
        zip((_APPEND_SHA, _SET_IF_NEWER_SHA, _KEEP_SHA, _PROBE_SHA), _SCRIPTS, strict=True)
    )
    lines = scripts.get(found.group(1), "").splitlines()
    line = int(found.group(2))
    command = (
        re.search(r"redis\.call\('(\w+)'", lines[line - 1]) if 0 < line <= len(lines) else None
    )
    return f" (the command refused: {command.group(1)})" if command else ""


def _id_tuple(stream_id: bytes | str) -> StreamId:
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _field(mapping: Any, name: str) -> Any:
    """`mapping[name]` whether redis-py decoded the keys (str) or not (bytes)."""
    if isinstance(mapping, (list, tuple)):  # a flat [k, v, k, v] reply
        mapping = dict(zip(mapping[::2], mapping[1::2], strict=False))
    if not isinstance(mapping, dict):
        return None
    value = mapping.get(name)
    return mapping.get(name.encode()) if value is None else value


def _parse_info(raw: Any) -> _StreamInfo:
    last_raw = _field(raw, "last-generated-id") or b"0-0"
    first_entry = _field(raw, "first-entry")
    deleted = _field(raw, "max-deleted-entry-id")
    added = _field(raw, "entries-added")
    return _StreamInfo(
        last=_id_tuple(last_raw),
        last_raw=last_raw,
        length=int(_field(raw, "length") or 0),
        first=_id_tuple(first_entry[0]) if first_entry else None,
        deleted=_id_tuple(deleted) if deleted is not None else None,
        added=int(added) if added is not None else None,
    )


def _stream_entries(response: Any) -> list[tuple[Any, Any]]:
    """The `(id, fields)` pairs of an XREAD reply on one stream, RESP2 or RESP3."""
    if not response:
        return []
    streams = response.values() if isinstance(response, dict) else [s[1] for s in response]
    out: list[tuple[Any, Any]] = []
    for entries in streams:
        if (
            entries
            and isinstance(entries[0], list)
            and not (entries[0] and isinstance(entries[0][0], bytes | str))
        ):
            entries = entries[0]  # RESP3 nests the entries one level deeper
        out += [(entry[0], entry[1]) for entry in entries]
    return out


def _is_kind(response: Any, kind: str) -> bool:
    """Whether a reply on the subscribed connection is a `kind` push (RESP2 or 3)."""
    return (
        isinstance(response, list) and len(response) >= 3 and response[0] in (kind, kind.encode())
    )


def _messages_op(frames: list[bytes], first_seq: int, node: int) -> _Op:
    """Message frames (sequence numbers from `first_seq` on) as one stream entry: a
    BATCH frame when there are several (readers get all or none; one XADD)."""
    if len(frames) == 1:
        return frames[0], None, "", 0, None
    batch = Record(Kind.BATCH, "", b"", b"".join(frames), node=node)
    return encode_frame(batch, first_seq), None, "", 0, None


def _id_before(stream_id: StreamId) -> bytes:
    """The greatest stream id below `stream_id` (an XREAD position just before it)."""
    ms, seq = stream_id
    if seq:
        return f"{ms}-{seq - 1}".encode()
    return f"{ms - 1}-{(1 << 64) - 1}".encode() if ms else b"0-0"


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)


def _is_no_such_key(exc: BaseException) -> bool:
    return "no such key" in str(exc).lower()


def _retryable(exc: BaseException) -> bool:
    """An error that a reconnection can cure (the request may have been executed)."""
    from redis import exceptions as rx

    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError | BackendError):
        return False  # (redis-py's auth errors are ConnectionErrors; no retry cures them)
    # ReadOnlyError: connected to a replica after a failover; NoScriptError: the
    # server restarted between loading the script and running it.
    return isinstance(
        exc, rx.ConnectionError | rx.TimeoutError | rx.ReadOnlyError | rx.NoScriptError | OSError
    )


class RedisBackend:
    """Records stored in a Redis stream and pushed by pub/sub; cache state in hashes.

    Args:
        url: `redis://`, `rediss://` or `unix://` URL (as redis-py takes it).
        namespace: Instances in different namespaces do not hear each other.
        max_record_size: Largest record, in bytes.
        stream_maxlen: Entries kept in the stream (at least; it is trimmed
            approximately): the window a disconnected peer can catch up on.
            The same for every peer of a namespace.
        tombstone_ttl: Seconds a delete is remembered in Redis.
        ping_interval: Seconds of silence after which the listener PINGs Redis;
            no answer within as long again counts as a lost connection.
        retry_timeout: Seconds a write, or `start()`, keeps retrying a lost
            connection before it raises `BackendUnavailableError` (a
            `ConnectionError`; each write attempt gets at least 1 s, so the
            call may end up to a second past it).
        read_timeout: Seconds a cache read waits while the mirror is being
            rebuilt (it goes to Redis, or, for `keys()`, waits for the
            mirror) before it raises `BackendUnavailableError`.
        stream_max_bytes: About the most bytes of records the stream keeps
            (each write trims it to as many entries of its size as fit in
            half of this; a record larger than that is kept alone).
        state_ttl: Seconds the namespace's own keys (the stream, its marker)
            live after the last process stopped refreshing them.
        state_check_interval: Seconds between checks that Redis still holds
            the namespace's keys (marker gone or replaced: FLUSHALL, eviction,
            a failover; or, after the server's `evicted_keys` grew, entries
            of the mirror gone): then every process reports a gap and reloads.
        **redis_options: Passed to `redis.asyncio.Redis.from_url` (e.g. `protocol=2`).
            The listener's connection always has redis-py's own retries off and
            a socket timeout above `ping_interval` (it reconnects, and
            resynchronises, itself). By default writes time out after
            `retry_timeout` (at least 1 s), and the connections are named
            `ivip:<namespace>:<peer>:<role>` in `CLIENT LIST` (role `w` writes,
            `r` listens, `c` serves the listener's requests, `g` reads cache
            entries while the mirror is rebuilt, and is closed after;
            `client_name=None` to leave them unnamed). At most these four
            connections per instance.

    Raises:
        ValueError: a URL that is not a valid Redis URL, or a bad option.

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
        ping_interval: float = 10.0,
        retry_timeout: float = 10.0,
        read_timeout: float = 5.0,
        stream_max_bytes: int = 64 << 20,
        state_ttl: float = 3600.0,
        state_check_interval: float = 2.0,
        **redis_options: Any,
    ) -> None:
        check_redis_url(url)
        if stream_maxlen < 1:
            raise ValueError("stream_maxlen must be at least 1")
        if stream_max_bytes < 1:
            raise ValueError("stream_max_bytes must be at least 1")
        if not ping_interval > 0:
            raise ValueError("ping_interval must be above 0 seconds")
        for name, value in (
            ("retry_timeout", retry_timeout),
            ("read_timeout", read_timeout),
            ("state_ttl", state_ttl),
            ("state_check_interval", state_check_interval),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be above 0 seconds")
        if redis_options.get("decode_responses"):
            raise ValueError("decode_responses must be off: records are binary frames")
        self.url = url
        self.namespace = namespace
        self.max_record_size = max_record_size
        self.stream_maxlen = stream_maxlen
        self.tombstone_ttl = tombstone_ttl
        self.ping_interval = ping_interval
        self.retry_timeout = retry_timeout
        self.read_timeout = read_timeout
        self.stream_max_bytes = stream_max_bytes
        self.state_ttl = state_ttl
        self._ttl_ms = int(state_ttl * 1000)
        self._half_bytes = stream_max_bytes >> 1
        self.state_check_interval = state_check_interval
        self.redis_options = redis_options
        self.node = secrets.randbits(63) or 1
        self._node_bytes = self.node.to_bytes(8, "little")  # as in a frame's header
        self.stream_key = f"ivip:{{{namespace}}}:log"
        self.channel = f"ivip:{{{namespace}}}:live"
        self.entry_prefix = f"ivip:{{{namespace}}}:c:".encode()
        self.marker_key = f"ivip:{{{namespace}}}:id"
        self._probe_key = f"ivip:{{{namespace}}}:probe:{self.node:016x}"
        self._client: Any = None  # the listener's requests (control)
        self._read_client: Any = None  # cache reads while the mirror is rebuilt (lazy)
        self._reads = 0  # cache reads under way on it
        self._subscribed = False  # the listener's connection is subscribed
        self._marker: bytes | None = None  # the namespace's token, as last seen
        self._evicted: int | None = None  # the server's evicted_keys, as last seen
        self._info_refused = False  # INFO refused (an ACL): evictions go unnoticed
        # Until then (loop time), this process's own cache records pushed back by
        # Redis are applied here too: a write whose outcome is unknown may be run.
        self._own_until = 0.0
        self._write_client: Any = None
        self._reader_client: Any = None  # the subscription
        self._sink: RecordSink | None = None
        # The reader's position: the last stream id read, and how many entries the
        # stream had ever received up to it (XINFO entries-added; None if unknown).
        self._last_id: bytes | str = b"0-0"
        self._added: int | None = None
        self._deleted_seen: StreamId | None = None  # max-deleted-entry-id already handled
        self._run_id: str | None = None  # the server's; a new one means it restarted
        self._reader_reconnected = False  # set by redis-py when it reconnects the listener
        self._replayed: StreamId | None = None  # where the last catch-up read up to
        self._seen: OrderedDict[int, int] = OrderedDict()  # sender -> last seq delivered
        self._seq = 0
        self._listener: asyncio.Task[None] | None = None
        self._writer: asyncio.Future[None] | None = None  # the write under way
        self._queue: list[tuple[Sequence[Record], asyncio.Future[None]]] = []
        self._closing = False
        self._leases: RedisLeases | None = None  # made by locks() on first use
        self._connected = False
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "records_written",
                "records_read",
                "reconnects",
                "connection_errors",
                "write_retries",
                "duplicates_dropped",
                "gaps",
                "records_lost",
                "resyncs",
                "garbage_bytes",
                "task_failures",
                "state_checks",
                "state_losses",
            ),
            0,
        )

    # -- life -------------------------------------------------------------------------

    def _make_client(self, role: str) -> Any:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        options = dict(self.redis_options)
        label = re.sub(r"[^!-~]", "_", self.namespace)  # names allow no spaces
        options.setdefault("client_name", f"ivip:{label}:{self.node:016x}:{role}")
        options.setdefault("socket_connect_timeout", 5.0)
        if role == "r":
            # The listener must see every disconnect (to check for a gap and
            # resynchronise), and must not wait forever on a half-open connection.
            for name in ("retry_on_error", "retry_on_timeout", "health_check_interval"):
                options.pop(name, None)
            options["retry"] = Retry(NoBackoff(), 0)
            options["single_connection_client"] = True  # one reader: no pool per read
            timeout = options.get("socket_timeout") or 0.0
            options["socket_timeout"] = max(float(timeout), self.ping_interval + 5.0)
        else:
            # Writes retry in `_retrying` (counted, logged, deduplicated by readers).
            options.setdefault("retry", Retry(NoBackoff(), 0))
            # Writes have no socket timeout (redis-py 8 sets 5 s by default):
            # `_retrying` times each attempt, at the cost of one timer, where a
            # socket timeout wraps every command in `asyncio.wait_for` (a task per
            # command on Python 3.11).
            timeout = max(self.retry_timeout, 1.0) if role == "c" else None
            options.setdefault("socket_timeout", timeout)
            if role == "g":  # cache reads during a rebuild: one connection, serialised
                options["single_connection_client"] = True
        return aioredis.Redis.from_url(self.url, **options)

    async def start(self, sink: RecordSink) -> None:
        """Connect, check what the backend needs, load the cache state, and start
        the listener task.

        A connection refused, lost or unanswered is retried for `retry_timeout`
        seconds; anything else fails at once.

        Raises:
            BackendUnavailableError: Redis could not be reached in time.
            BackendPermissionError: the credentials, or a command, key or
                channel the backend needs, were refused (nothing was stored).
            BackendError: any other refusal (say, `DB index is out of range`).
        """
        self._sink = sink
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_timeout
        delay = 0.1
        while True:
            self._client = self._make_client("c")
            self._write_client = self._make_client("w")
            self._reader_client = self._make_client("r")
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.1)):
                    await self._join()
                await self._load_state()  # (its own requests time out; no overall limit)
                break
            except Exception as exc:
                await self._close_clients()
                if not _retryable(exc) or loop.time() + delay > deadline:
                    if isinstance(exc, TimeoutError) and not str(exc):
                        exc = TimeoutError(f"no answer in {self.retry_timeout:g}s")
                    raise _wrap(exc, "the start", self.url) from exc
                logger.info("Redis not available yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except BaseException:
                await self._close_clients()
                raise
        self._connected = True
        self._listener = loop.create_task(self._listen(), name="ivip-ipc-redis-listener")

    async def _join(self) -> None:
        """`start`'s requests: each checks something the backend needs, in the order
        that stores nothing until every permission is known to be there."""
        from redis.exceptions import OutOfMemoryError

        client = self._client
        await client.ping()
        await self._load_scripts(client)
        info = await self._server_info()
        self._run_id = _text(_field(info, "run_id"))
        self._info_refused = not info
        self._evicted = int(_field(info, "evicted_keys") or 0) if info else None
        self._warn_if_evicting(info)
        full = None
        try:
            # Every write command and PUBLISH, on a key that is gone when it ends.
            await client.evalsha(_PROBE_SHA, 1, self._probe_key, self.channel)
        except OutOfMemoryError as exc:  # a reader may start: writes will say it
            full = exc
        await self._note_reader_connection()
        await self._subscribe()
        # The reads of the catch-up (a MULTI of XINFO, XREAD, XRANGE): the position.
        pipe = client.pipeline(transaction=True)
        pipe.xinfo_stream(self.stream_key)
        pipe.xread({self.stream_key: b"0-0"}, count=1)
        pipe.xrange(self.stream_key, b"-", b"+", count=1)
        raw_info, *rest = await pipe.execute(raise_on_error=False)
        for reply in (raw_info, *rest):
            if isinstance(reply, Exception) and not _is_no_such_key(reply):
                raise reply
        info = None if isinstance(raw_info, Exception) else _parse_info(raw_info)
        self._last_id, self._added = (info.last_raw, info.added) if info else (b"0-0", 0)
        await client.scan(0, match=self.entry_prefix + b"*", count=1)  # (the reload's)
        if full is None:
            with contextlib.suppress(OutOfMemoryError):
                await self._keep()  # the marker, and the keys' expiry: the first write
        if full is not None:
            logger.warning(
                "Redis at %s is full (%s): writes fail until it has room",
                _redacted(self.url),
                full,
            )

    async def _server_info(self) -> Any:
        """INFO (server, memory, stats ...), or {} when the user may not ask."""
        from redis.exceptions import NoPermissionError, ResponseError

        try:
            return await self._client.info()
        except ResponseError as exc:
            if isinstance(exc, NoPermissionError) or "no permissions" in str(exc):
                return {}
            raise

    def _warn_if_evicting(self, info: Any) -> None:
        policy = _text(_field(info, "maxmemory_policy"))
        if policy and policy != "noeviction":
            logger.warning(
                "Redis at %s has maxmemory-policy %s: when full it may evict this "
                "library's keys (every process then reports a gap and reloads its "
                "cache). Use noeviction (writes then fail with BackendFullError "
                "when Redis is full)",
                _redacted(self.url),
                policy,
            )

    async def _keep(self) -> bool:
        """Check the namespace's marker (and refresh the keys' expiry): False when
        Redis lost the namespace's state since the last check."""
        from redis.exceptions import NoScriptError

        call = (
            _KEEP_SHA,
            2,
            self.marker_key,
            self.stream_key,
            secrets.token_hex(8),
            int(self.state_ttl * 1000),
        )
        try:
            token = await self._client.evalsha(*call)
        except NoScriptError:  # Redis restarted, or SCRIPT FLUSH
            await self._load_scripts(self._client)
            token = await self._client.evalsha(*call)
        token = token if isinstance(token, bytes) else str(token).encode()
        kept = self._marker is None or token == self._marker
        self._marker = token
        return kept

    async def close(self) -> None:
        """Stop the listener and close the connections."""
        # What was accepted is sent first: the write under way, and the writer task
        # it may hand the queue to. (`wait`, unlike `gather`, never cancels them.)
        while self._writer is not None and not self._writer.done():
            await asyncio.wait({self._writer})
        if self._leases is not None:
            await self._leases.close()  # held leases are released, not left to expire
        self._closing = True
        listener = self._listener
        if listener is not None:
            # Cancelled until it ends: a redis-py read with a socket timeout that
            # completes just as the cancellation lands can swallow it (Python 3.11).
            while not listener.done():
                listener.cancel()
                await asyncio.wait({listener}, timeout=0.05)
            await asyncio.gather(listener, return_exceptions=True)
        await self._close_clients()

    async def _close_clients(self) -> None:
        clients = (self._client, self._write_client, self._reader_client, self._read_client)
        self._client = self._write_client = self._reader_client = self._read_client = None
        self._subscribed = False
        for client in clients:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    def abandon(self) -> None:
        """The loop is gone: drop the connections without awaiting."""
        if self._leases is not None:
            self._leases.abandon()
        self._closing = True
        if self._listener is not None and not self._listener.get_loop().is_closed():
            self._listener.cancel()
        self._client = self._write_client = self._reader_client = self._read_client = None

    def locks(self) -> RedisLeases:
        """The lock capability: leases with fencing tokens (backends/redis_lease.py)."""
        if self._leases is None:
            self._leases = RedisLeases(lambda: self._make_client("l"), self.namespace)
        return self._leases

    # -- state -------------------------------------------------------------------------

    def _entry_key(self, topic: str, key: bytes) -> bytes:
        return self.entry_prefix + topic.encode() + b"\x00" + key

    async def _server_run_id(self) -> str | None:
        """The server's run id (a new one after every restart); None if INFO is refused."""
        from redis.exceptions import ResponseError

        try:
            info = await self._client.info("server")
        except ResponseError:
            return None
        return _text(_field(info, "run_id"))

    async def _note_reader_connection(self) -> None:
        """Connect the listener, and have redis-py say if it ever reconnects it.

        redis-py reopens a connection found closed, when it sends, without
        raising anything. The listener only sends on a connection it has just
        read from, so this is a guard: a reconnection behind its back would lose
        the subscription silently.
        """
        client = self._reader_client
        await client.ping()  # connects the listener's single connection
        connection = client.connection
        if connection is not None:
            # Held weakly by redis-py: a bound method of this backend.
            connection.register_connect_callback(self._on_reader_connect)
            # redis-py's own health check would PING, and read the answer, on the
            # subscribed connection, throwing away a push that came first (RESP3)
            # or failing on it (RESP2); `ping_interval` does that job. (A URL's
            # `?health_check_interval=` overrides options, hence here.)
            connection.health_check_interval = 0
        self._reader_reconnected = False

    async def _subscribe(self) -> None:
        """SUBSCRIBE the listener's connection to the channel (a refusal raises)."""
        connection = self._reader_client.connection
        await connection.send_command("SUBSCRIBE", self.channel)
        while not _is_kind(await connection.read_response(push_request=True), "subscribe"):
            pass  # (a stale PING answer)
        self._subscribed = True

    async def _drop_reader_connection(self) -> None:
        """Close the listener's connection (subscribed, maybe half-read): the
        resync opens a fresh one."""
        self._subscribed = False
        connection = self._reader_client.connection if self._reader_client else None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.disconnect()

    def _on_reader_connect(self, _connection: Any) -> None:
        self._reader_reconnected = True

    async def _stream_info(self) -> _StreamInfo | None:
        """XINFO STREAM, or None when the stream does not exist."""
        from redis.exceptions import ResponseError

        try:
            return _parse_info(await self._client.xinfo_stream(self.stream_key))
        except ResponseError as exc:
            if _is_no_such_key(exc):
                return None
            raise

    async def _load_state(self) -> None:
        """Load every cache entry into the sink (the caller noted the stream's position).

        Changes made during the scan are in the stream after that position, so
        reading on from it brings the state up to date.
        """
        assert self._client is not None
        assert self._sink is not None
        reader = FrameReader(self.max_record_size, self._garbage)
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
                        reader.discard_pending()  # one frame per entry: never joined
                self._sink.restore(records)
            if int(cursor) == 0:
                break

    async def fetch(self, topic: str, key: bytes) -> Record | None:
        """One cache entry, read from Redis (while the mirror is being rebuilt).

        Reads share one connection, opened for the rebuild and closed after it.

        Raises:
            BackendUnavailableError: no answer within `read_timeout` seconds.
        """
        if self._closing or self._write_client is None:
            return None
        if self._read_client is None:
            self._read_client = self._make_client("g")
        client = self._read_client
        self._reads += 1
        try:
            frame = await self._retrying(
                lambda: client.hget(self._entry_key(topic, key), "r"),
                "cache read",
                self.read_timeout,
            )
        finally:
            self._reads -= 1
        if not frame:
            return None
        records = FrameReader(self.max_record_size, self._garbage).feed(frame)
        return records[0] if records else None

    async def _close_read_client(self) -> None:
        """Close the cache reads' connection once the mirror serves them again."""
        client = self._read_client
        if client is not None and not self._reads:
            self._read_client = None
            with contextlib.suppress(Exception):
                await client.aclose()

    def _garbage(self, size: int, why: str) -> None:
        self.counters["garbage_bytes"] += size
        rate_limited(
            logging.WARNING,
            ("redis-garbage", self.stream_key),
            "skipped %d bytes in Redis (%s)",
            size,
            why,
        )

    # -- writing -------------------------------------------------------------------------

    async def append(self, records: Sequence[Record]) -> None:
        """Write records; return once Redis has them (and their state applies here).

        A lone append of messages, with nothing else being written, is sent from
        the caller's task; otherwise appends queue for one writer task that sends
        everything queued as one pipeline (group commit), so concurrent appends
        share a round trip and keep their order.

        Raises:
            ConnectionError: Redis could not be reached for `retry_timeout`
                seconds; the records may or may not have been stored.
        """
        if self._closing or self._client is None:
            raise ConnectionAbortedError("the IPC instance is closed")
        idle = not self._queue and (self._writer is None or self._writer.done())
        if idle and all(r.kind is Kind.MESSAGE for r in records):
            # Nothing else is being written: send from this task, sparing a writer
            # task (a third of the cost of an awaited notify). Only messages: a
            # cache write cancelled on the wire must still learn whether it was
            # stored (to apply it here too), which the writer task sees through.
            self._writer = done = asyncio.get_running_loop().create_future()
            try:
                ops = self._encode(records)
                errors = await self._retrying(functools.partial(self._send, ops), "write")
                if errors is not _STORED:
                    failed = next((error for error in errors if error is not None), None)
                    if failed is not None:
                        raise failed
                self.counters["records_written"] += len(records)
            finally:
                if not done.done():
                    done.set_result(None)
                if self._queue:  # appends that came meanwhile
                    self._writer = asyncio.get_running_loop().create_task(self._write_queued())
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((records, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_queued())
        await fut

    async def _write_queued(self) -> None:
        while self._queue:
            # An append whose caller was cancelled while it waited is not sent: a
            # cancelled `notify` or `set` then happened nowhere.
            batch = [(records, fut) for records, fut in self._queue if not fut.cancelled()]
            self._queue = []
            if not batch:
                continue
            # Framed once: a retry resends the same sequence numbers, which is
            # how readers recognise (and drop) what an attempt already stored.
            # Each append is encoded alone, so its messages share one entry.
            encoded = [self._encode(records) for records, _ in batch]
            ops = [op for part in encoded for op in part]
            try:
                errors = await self._retrying(functools.partial(self._send, ops), "write")
                if len(errors) != len(ops):  # (never: a guard, so no caller waits forever)
                    raise RuntimeError(f"{len(errors)} answers to {len(ops)} writes")
            except Exception as exc:
                # Unknown outcome: Redis may have run (or may yet run) any of them.
                # What it stores it pushes back here too: applied for a while.
                if any(op[4] is not None for op in ops):
                    self._own_until = asyncio.get_running_loop().time() + _OWN_WINDOW
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            # Stored (each op for which Redis answered no error): the peers apply
            # these cache records, so this process must too, whether or not their
            # callers are still waiting (one cancelled while on the wire was
            # stored all the same), and whether or not the rest of their append was.
            if not any(errors):  # all stored: the usual case, without the bookkeeping
                state = [op[4] for op in ops if op[4] is not None]
                if state and self._sink is not None:
                    self._sink.written(state)
                self.counters["records_written"] += sum(len(records) for records, _ in batch)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
                continue
            state = [
                op[4]
                for op, error in zip(ops, errors, strict=True)
                if error is None and op[4] is not None
            ]
            if state and self._sink is not None:
                self._sink.written(state)
            at = 0
            for (records, fut), part in zip(batch, encoded, strict=True):
                failed = next((e for e in errors[at : at + len(part)] if e is not None), None)
                at += len(part)
                if failed is None:
                    self.counters["records_written"] += len(records)
                if not fut.done():
                    if failed is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(failed)

    def _encode(self, records: Sequence[Record]) -> list[_Op]:
        """`(frame, entry key, version, expiry ms)` per record (key None: a message)."""
        now_ms = int(time.time() * 1000)
        ops: list[_Op] = []
        messages: list[bytes] = []  # consecutive message frames: one stream entry
        size = 0
        for record in records:
            self._seq += 1
            frame = encode_frame(record, self._seq)
            if record.kind is Kind.MESSAGE:
                if messages and size + len(frame) > self.max_record_size - HEADER_SIZE:
                    ops.append(_messages_op(messages, self._seq - len(messages), self.node))
                    messages, size = [], 0
                messages.append(frame)
                size += len(frame)
                continue
            if messages:
                ops.append(_messages_op(messages, self._seq - len(messages), self.node))
                messages, size = [], 0
            if record.kind is Kind.CACHE_SET:
                expires_ms = int(record.expires * 1000) if record.expires else 0
            else:
                expires_ms = now_ms + int(self.tombstone_ttl * 1000)
            version = f"{record.hlc:020d}{record.node:020d}"
            ops.append(
                (frame, self._entry_key(record.topic, record.key), version, expires_ms, record)
            )
        if messages:
            ops.append(_messages_op(messages, self._seq + 1 - len(messages), self.node))
        return ops

    async def _send(self, ops: list[_Op]) -> list[Exception | None]:
        """Store and publish: messages through `_APPEND`, cache records through the
        last-writer-wins script; several in one pipeline. Returns, per op, None
        (stored) or the documented error Redis answered (nothing stored); raises
        what a retry may cure."""
        from redis.exceptions import NoScriptError

        client = self._write_client
        if client is None:
            raise ConnectionAbortedError("the IPC instance is closed")
        # EVALSHA by hand: redis-py's Script objects cost a wrapper per call, and
        # in a pipeline one more round trip (SCRIPT EXISTS) per write.
        try:
            if len(ops) == 1:
                await client.evalsha(*self._script_call(ops[0]))
                return _STORED
            pipe = client.pipeline(transaction=False)
            for op in ops:
                pipe.evalsha(*self._script_call(op))
            replies = await pipe.execute(raise_on_error=False)
            for reply in replies:
                if isinstance(reply, Exception) and _retryable(reply):
                    raise reply  # resent whole: readers drop what was stored twice
        except NoScriptError:
            # Redis lost the scripts (a restart, SCRIPT FLUSH): load them, and let
            # `_retrying` send again (readers drop what was already stored).
            await self._load_scripts(client)
            raise
        return [
            _wrap(reply, "a write", self.url) if isinstance(reply, Exception) else None
            for reply in replies
        ]

    @staticmethod
    async def _load_scripts(client: Any) -> None:
        pipe = client.pipeline(transaction=False)  # all in one round trip
        for script in _SCRIPTS:
            pipe.script_load(script)
        await pipe.execute()

    def _script_call(self, op: _Op) -> tuple[Any, ...]:
        """EVALSHA's arguments (sha, number of keys, keys, args) that store and
        publish one encoded op."""
        frame, entry_key, version, expires_ms, _ = op
        # The stream holds at most stream_maxlen entries, and about
        # stream_max_bytes: each write trims it to as many entries of its own
        # size as fit in half of that (so a run of small entries after large
        # ones can hold the large ones and fill the other half, no more).
        maxlen = min(self.stream_maxlen, max(1, self._half_bytes // len(frame)))
        ttl_ms = self._ttl_ms
        if entry_key is None:
            return _APPEND_SHA, 1, self.stream_key, frame, maxlen, self.channel, ttl_ms
        return (
            _SET_IF_NEWER_SHA, 2, entry_key, self.stream_key,
            frame, version, expires_ms, maxlen, self.channel, ttl_ms,
        )  # fmt: skip

    async def _retrying(
        self, attempt: Callable[[], Awaitable[_T]], what: str, timeout: float | None = None
    ) -> _T:
        """`attempt()`, again after connection errors, for up to `timeout` seconds
        (`retry_timeout` by default); Redis's errors raised as the documented ones."""
        loop = asyncio.get_running_loop()
        limit = self.retry_timeout if timeout is None else timeout
        deadline = loop.time() + limit
        delay = 0.05
        while True:
            try:
                # The attempt's own time limit (the connection has no socket timeout).
                async with asyncio.timeout(max(deadline - loop.time(), min(limit, 1.0))):
                    return await attempt()
            except Exception as exc:
                if not _retryable(exc) or self._client is None:
                    if isinstance(exc, ConnectionAbortedError):
                        raise
                    raise _wrap(exc, f"a {what}", self.url) from exc
                self.counters["write_retries" if what == "write" else "connection_errors"] += 1
                if loop.time() >= deadline:
                    raise BackendUnavailableError(
                        f"Redis at {_redacted(self.url)} did not answer for "
                        f"{limit:g}s ({what} not acknowledged): {exc or type(exc).__name__}"
                    ) from exc
                rate_limited(
                    logging.WARNING,
                    ("redis-retry", self.stream_key, what),
                    "Redis %s failed (%s); retrying for up to %gs",
                    what,
                    exc,
                    limit,
                    interval=5.0,
                )
                pause = delay * (1 + random.random() / 2)
                await asyncio.sleep(min(pause, max(deadline - loop.time(), 0.0)))
                delay = min(delay * 2, 1.0)

    # -- reading -------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Read the stream forever; reconnect with backoff; never die silently."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        backoff = 0.1
        resync = False
        while not self._closing:
            try:
                if resync:
                    await self._resync()
                    resync = False
                    backoff = 0.1
                await self._read_forever()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection lost, server restarting, a bug, ...
                # (close() cancels this task: a closing instance never gets here)
                if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
                    self.counters["connection_errors"] += 1
                    if self._connected:
                        logger.warning("lost the Redis connection (%s); reconnecting", exc)
                    else:
                        logger.info("Redis still unavailable (%s); retrying in %.1fs", exc, backoff)
                else:
                    self.counters["task_failures"] += 1
                    logger.error("the Redis listener failed; resynchronising", exc_info=True)
                if self._connected:
                    self._connected = False
                    if self._sink is not None:
                        self._sink.mirror_ready(False)  # reads go to Redis meanwhile
                await self._drop_reader_connection()
                resync = True
                await asyncio.sleep(backoff * (1 + random.random() / 2))
                backoff = min(backoff * 2, 5.0)

    async def _resync(self) -> None:
        """Back after a disconnect: check for a gap, reload the cache state, read on."""
        assert self._sink is not None
        await self._client.ping()
        run_id = await self._server_run_id()
        restarted = None not in (run_id, self._run_id) and run_id != self._run_id
        self._run_id = run_id
        await self._note_reader_connection()
        reported = restarted and self._check_gap(await self._stream_info(), restarted=True)
        if restarted and not reported:
            logger.info("Redis restarted; it kept everything this process had read")
        if await self._marker_lost() and not reported:
            await self._lost_state("the namespace's keys are gone from Redis")
        if self._own_until:  # own writes of unknown outcome may still be run
            loop = asyncio.get_running_loop()
            self._own_until = max(self._own_until, loop.time() + _OWN_WINDOW)
        # Anything may have been missed while away: rebuild the mirror from Redis
        # (it was dropped), then read the stream on from where this reader was (the
        # catch-up's checked reads find, and count, what was trimmed or deleted).
        self.counters["resyncs"] += 1
        await self._load_state()
        self.counters["reconnects"] += 1
        self._connected = True
        self._sink.mirror_ready(True)
        await self._close_read_client()
        logger.info("reconnected to Redis")

    async def _lost_state(self, why: str) -> None:
        """Redis lost (some of) the namespace's keys: report a gap of unknown size
        (the caller reloads the cache state)."""
        assert self._sink is not None
        self.counters["gaps"] += 1
        self.counters["state_losses"] += 1
        # The stream's counts are not the ones this reader kept. A stream that is
        # gone is all news when it comes back (reported here, not again later).
        self._added = None
        if await self._stream_info() is None:
            self._last_id, self._added = b"0-0", 0
        logger.warning(
            "records may have been lost before this process read them from Redis "
            "(%s; how many is unknown): reloading the cache state",
            why,
        )
        self._sink.gap("redis", None)

    async def _check_state(self) -> None:
        """The periodic check (from the listener): did Redis lose the namespace's
        keys (the marker gone or made anew: FLUSHALL, FLUSHDB, eviction, a
        failover) or evict keys (ours may be among them)? Then report a gap and
        reload. Also refreshes the keys' expiry, and closes the connection of
        cache reads once the mirror serves them again."""
        from redis.exceptions import ResponseError

        assert self._sink is not None
        self.counters["state_checks"] += 1
        await self._close_read_client()
        why = None
        if await self._marker_lost():
            why = "the namespace's keys are gone from Redis"
        if not self._info_refused:
            try:
                stats = await self._client.info("stats")
            except ResponseError:  # INFO refused (an ACL): evictions go unnoticed
                self._info_refused = True
            else:
                evicted = int(_field(stats, "evicted_keys") or 0)
                before, self._evicted = self._evicted, evicted
                if before is not None and evicted > before and why is None:
                    missing = await self._entries_missing()
                    if missing:
                        why = f"Redis evicted {missing} or more of this namespace's cache entries"
        if why is not None:
            self._sink.mirror_ready(False)
            await self._lost_state(why)
            await self._load_state()
            self._sink.mirror_ready(True)

    async def _entries_missing(self) -> int:
        """How many of the mirror's live entries (not about to expire) Redis no
        longer has: after evictions, whether ours were among them (a cost in
        this namespace's size, where a reload would scan the whole database)."""
        assert self._sink is not None
        soon = time.time() + 1.0
        keys = [
            self._entry_key(record.topic, record.key)
            for record in self._sink.state()
            if record.kind is Kind.CACHE_SET and (not record.expires or record.expires > soon)
        ]
        missing = 0
        for at in range(0, len(keys), 1000):
            chunk = keys[at : at + 1000]
            missing += len(chunk) - int(await self._client.exists(*chunk))
        return missing

    async def _marker_lost(self) -> bool:
        """`_keep`, with a refusal (OOM, a read-only replica: the writes say so)
        logged and taken for "not lost"."""
        from redis.exceptions import ResponseError

        try:
            return not await self._keep()
        except ResponseError as exc:
            rate_limited(
                logging.WARNING,
                ("redis-keep", self.stream_key),
                "Redis refused the namespace check (%s)",
                exc,
            )
            return False

    def _check_gap(
        self,
        info: _StreamInfo | None,
        *,
        restarted: bool = False,
        unread: int | None = None,
        at_position: bool = False,
    ) -> bool:
        """Whether records may have gone before this reader read them; if so, report
        it and move the position past what is gone. (The caller reloads the state.)

        Trimming removes the oldest entries and leaves `max-deleted-entry-id`
        alone (only XDEL moves it): what tells is the oldest entry left being
        past the position while fewer entries are left after the position than
        were ever added after it (`entries-added`, Redis 7+). `unread`, when
        known, is how many entries the stream holds after the position: then
        any entry added after the position and no longer there shows in the
        counts, wherever it was (Redis 7+). `at_position`: the entry at the
        position is still there, so the stream is the one this reader read (a
        count that went backwards then only says that the stream was made anew
        earlier, while this reader followed it live, and is righted silently).
        """
        position = _id_tuple(self._last_id)
        gap = False  # (a restart that kept the stream lost nothing: the checks below)
        lost: int | None = None  # None: how many is unknown
        if info is None:  # no stream: deleted, or a restarted server without persistence
            if position == (0, 0):
                return False  # there never was one: nothing to lose
            gap = True
            self._last_id, self._added = b"0-0", 0  # a new stream will be all news
        elif info.last < position:  # the stream is behind what was read: restarted
            gap = True
            self._last_id, self._added = info.last_raw, info.added
        elif info.first is None or info.first > position:
            # Nothing at or before the position is left: every entry left is after it.
            if info.added is not None and self._added is not None:
                lost = info.added - self._added - info.length
                if lost < 0:  # the counts do not add up: the stream was made anew
                    lost = None
                gap = gap or lost != 0
            else:  # Redis 6, or a count lost to an earlier gap: guess from a full stream
                gap = gap or (
                    position > (0, 0)
                    and (info.length >= self.stream_maxlen or info.first is None)
                    and info.last > position
                )
            if gap:  # read on from the oldest entry left
                if info.first is None:
                    self._last_id, self._added = info.last_raw, info.added
                else:
                    self._last_id = _id_before(info.first)
                    self._added = None if info.added is None else info.added - info.length
        elif unread is not None and info.added is not None and self._added is not None:
            # Added after the position = still there after it + gone unread
            # (deleted, or lost when the stream was made anew: counts that went
            # backwards). Righted here, so a gap is reported once.
            gone = info.added - self._added - unread
            if gone > 0 or (gone < 0 and not at_position):
                gap, lost = True, (gone if gone > 0 else None)
            self._added = info.added - unread
        elif (
            info.deleted is not None
            and info.deleted > position
            and (self._deleted_seen is None or info.deleted > self._deleted_seen)
        ):
            gap = True  # entries after the position were deleted (XDEL) before read
            self._added = None
        if info is not None and info.deleted is not None:
            self._deleted_seen = info.deleted  # each deletion is reported once
        if not gap:
            return False
        if restarted:
            self._added = None  # a restarted server's counts may have lost some
        self.counters["gaps"] += 1
        self.counters["records_lost"] += lost or 0
        logger.warning(
            "records may have been lost before this process read them from Redis "
            "(%s; %s): reloading the cache state",
            "the server restarted" if restarted else "trimmed or deleted from the stream",
            f"{lost} records" if lost is not None else "how many is unknown",
        )
        assert self._sink is not None
        self._sink.gap("redis", lost)
        return True

    async def _read_forever(self) -> None:
        """Subscribe, catch up from the stream, then deliver what Redis pushes.

        The subscription comes first, so every record stored after the catch-up
        read is pushed too: the catch-up reads (each a *checked* read, see
        `_checked_read`) bring this reader from its position to the end of the
        stream, and the pushes carry on from there. Both scripts store and
        publish in one atomic step, so pushes come in stream order, each with its
        stream id: one this reader already read while catching up is dropped.

        While subscribed nothing is lost, whatever happens to the stream: a
        reader too slow for Redis's output buffer limit is disconnected by Redis,
        which is a disconnect like any other (`_listen` reconnects, and the
        catch-up then finds what was trimmed meanwhile). After `ping_interval`
        seconds of silence the listener PINGs, and no answer within as long
        again counts as a lost connection.
        """
        assert self._reader_client is not None
        if not self._subscribed:
            await self._subscribe()
        connection = self._reader_client.connection
        reader = FrameReader(self.max_record_size, self._garbage)
        while await self._checked_read(reader):
            pass  # a full read: more to catch up on
        self._replayed = _id_tuple(self._last_id)
        loop = asyncio.get_running_loop()
        # (often enough, too, to refresh the keys' expiry well within state_ttl)
        interval = min(self.state_check_interval, self.state_ttl / 3)
        ping = self.ping_interval
        now = loop.time()
        silence = now + ping  # then PING (or, pinged, give up)
        check = now + interval  # when the namespace's keys are checked next
        pinged = False
        while not self._closing:
            if now >= check:
                await self._check_state()
                now = loop.time()
                check = now + interval
            timeout = max(min(check, silence) - now, 0.001)
            response = await connection.read_response(timeout=timeout, push_request=True)
            if self._reader_reconnected:
                raise _Reconnected("the listener's connection to Redis was re-established")
            if response is None:  # silence
                now = loop.time()
                if now < silence:
                    continue  # (time for the check)
                if pinged:
                    raise TimeoutError(f"Redis did not answer a PING in {ping:g}s")
                await connection.send_command("PING")
                pinged = True
                now = loop.time()
                silence = now + ping
                continue
            pinged = False
            if _is_kind(response, "message"):
                self._deliver_push(response[2], reader)
            now = loop.time()
            silence = now + ping

    def _deliver_push(self, payload: Any, reader: FrameReader) -> None:
        """Deliver one pushed record (`<stream id> <frame>`), unless already read."""
        if not isinstance(payload, bytes) or not payload:
            return  # not ours (a stray PUBLISH), or the permission check at a start
        entry_id, _, frame = payload.partition(b" ")
        try:
            position = _id_tuple(entry_id)
        except ValueError:
            position = None
        if position is None or not frame.startswith(MAGIC):
            # Someone else's PUBLISH on the channel: it must not move the position.
            self._garbage(len(payload), "a message on the channel that is not a record")
            return
        if self._replayed is not None:  # the first pushes may repeat the catch-up's end
            if position <= self._replayed:
                return
            self._replayed = None  # pushes come in stream order: the rest are new
        self._deliver([(entry_id, frame)], reader)

    async def _checked_read(self, reader: FrameReader) -> bool:
        """One catch-up read, checked: a `MULTI` of `XINFO STREAM` and `XREAD` that
        finds a restart, and entries gone before this reader read them (see
        `_check_gap`); then deliver. True when it came back full (read again)."""
        assert self._sink is not None
        pipe = self._client.pipeline(transaction=True)
        pipe.xinfo_stream(self.stream_key)
        pipe.xread({self.stream_key: self._last_id}, count=_READ_COUNT)
        pipe.xrange(self.stream_key, self._last_id, self._last_id)
        raw_info, response, at_position = await pipe.execute(raise_on_error=False)
        if isinstance(response, Exception):
            raise response
        if isinstance(raw_info, Exception) and not _is_no_such_key(raw_info):
            raise raw_info
        info = None if isinstance(raw_info, Exception) else _parse_info(raw_info)
        entries = _stream_entries(response)
        full = len(entries) == _READ_COUNT
        at_position = isinstance(at_position, list) and bool(at_position)  # (or an error)
        if self._check_gap(info, unread=None if full else len(entries), at_position=at_position):
            self._sink.mirror_ready(False)
            await self._load_state()
            self._sink.mirror_ready(True)
            return True  # read on from the new position
        self._deliver([(entry_id, _field(fields, "r")) for entry_id, fields in entries], reader)
        if full:
            return True
        if info is not None and info.last >= _id_tuple(self._last_id):
            # Read up to the end: everything up to last-generated-id is seen.
            self._last_id, self._added = info.last_raw, info.added
        return False

    def _deliver(self, entries: list[tuple[Any, bytes | None]], reader: FrameReader) -> None:
        """Hand the records of `entries` (`(stream id, frame)`, read on from the
        position) to the sink, and move the position, and the count of entries
        read, past them."""
        assert self._sink is not None
        if self._added is not None:
            self._added += len(entries)
        fresh: list[Record] = []
        seen = self._seen
        for entry_id, frame in entries:
            self._last_id = entry_id
            if not frame:
                continue
            if frame[NODE_OFFSET : NODE_OFFSET + 8] == self._node_bytes:
                # This process's own write (Redis pushes it here too): not parsed,
                # unless a write of unknown outcome may be in it (then applied).
                if self._own_until and not self._own_write(frame):
                    self._own_until = 0.0
                continue
            records = reader.feed(frame)
            self.counters["garbage_bytes"] += reader.discard_pending()
            for record in records:
                last = seen.get(record.node)
                if last is not None and record.seq <= last:
                    self.counters["duplicates_dropped"] += 1  # a retried write
                    continue
                seen[record.node] = record.seq
                seen.move_to_end(record.node)
                if len(seen) > _SEEN_PEERS:
                    seen.popitem(last=False)
                fresh.append(record)
        if fresh:
            self.counters["records_read"] += len(fresh)
            self._sink.deliver(fresh)

    def _own_write(self, frame: bytes) -> bool:
        """Apply the cache records of an own write pushed back by Redis, while a
        write of unknown outcome may be run late; False once that window is over."""
        if asyncio.get_running_loop().time() > self._own_until:
            return False
        state = FrameReader(self.max_record_size, self._garbage).feed(frame)
        state = [record for record in state if record.kind is not Kind.MESSAGE]
        if state and self._sink is not None:
            self._sink.written(state)
        return True

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
