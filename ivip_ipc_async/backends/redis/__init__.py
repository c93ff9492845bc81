"""The Redis backend: the same records, stored in a Redis stream and pushed by
pub/sub, for processes on several hosts.

Selected by `AsyncIPC("redis://host:6379/0", namespace=...)` (also `rediss://`,
`unix://`, `redis+sentinel://`, `rediss+sentinel://`, and any node of a Redis Cluster: see
endpoints.py); redis-py is imported only then (`pip install ivip-ipc-async[redis]`).
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
  backoff (0.1 s to 1 s, at most 0.2 s while the Sentinels know no master;
  counted in `reconnects` / `connection_errors`,
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

The package's modules, one per concern (the map, with the data flow, is in
docs/design.md, "The Redis backend's files"):

    backend.py      RedisBackend: the parts composed; start, close, fetch, stats
    settings.py     the settings and key names, counters and sink the parts share
    endpoints.py    where the server is: plain, Sentinel, or a cluster's slot owner
    connections.py  URL checks, connections by role, the listener connection's
                    guards, retries, redis-py's errors as the library's
    scripts.py      the Lua scripts, loading them, naming a refused command
    writer.py       writes: framing, group commit, outcomes, the own-write window
    listener.py     subscribe, catch up, pushes, PING, reconnect and resync
    delivery.py     each sender's records once and in order; own writes
    position.py     the reader's position in the stream, and gap accounting
    state.py        loading the cache entries, the namespace's marker, evictions
    replies.py      what Redis answers, normalised (RESP2 and RESP3)
    leases.py       the lock capability: leases with fencing tokens
"""

from __future__ import annotations

from .backend import RedisBackend
from .connections import check_redis_url
from .leases import RedisLeases

__all__ = ["RedisBackend", "RedisLeases", "check_redis_url"]
