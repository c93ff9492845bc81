"""The in-memory state of every cache: last-writer-wins over cache records.

Every process keeps one `Mirror` per `AsyncIPC`, fed by the same dispatch that
feeds event handlers. A cache record wins when its `(hlc, node)` is greater than
the one held for its key, so applying records in any order, or twice, gives the
same state (invariant 3). Deletes are kept as tombstones until they are older
than `tombstone_ttl`, by which time no older record can still arrive.

A key's state is a plain tuple of numbers and bytes (`State`), not an object:
the cyclic garbage collector stops tracking such a tuple the first time it
sees it, so a mirror of a million keys adds nothing to the full collections
that would otherwise walk it, tens of milliseconds at a time, while a joiner
loads it. Decoded values, which can be containers, are kept apart in
`decoded`, for the keys that are read.

A cache's keys are spread over `SHARDS` dicts by their hash: a dict that grows
past a power of two copies itself whole, in one step (about 10 ms at 350,000
keys, 27 ms at 700,000), and a shard is a sixty-first of the cache. The number
is prime, so keys that share their low bits (ids that are multiples of 1,024,
say) still spread; a shard's dict is made when its first key comes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any, Final, cast

from .logs import rate_limited
from .records import HEADER_SIZE, CacheKey, Kind, Record, _new_record, decode_key

__all__ = ["NO_ENTRIES", "SHARDS", "Entry", "Mirror", "Shards", "State", "new_shards"]

State = tuple[float, bytes, int, int, float, int, int, bytes]
"""One key's winning record: `(until, data, hlc, node, expires, seq, codec, raw_key)`.

`until` is for the read path: -1 deleted, 0 never expires, else the wall-clock
deadline. Every item is atomic, so the tuple is not tracked by the cyclic GC.
"""
UNTIL: Final = 0
DATA: Final = 1
HLC: Final = 2
NODE: Final = 3
EXPIRES: Final = 4
RAW_KEY: Final = 7
_PASSED: Final = 5e-324  # an `until` that has passed, whatever the clock says

Decoded = tuple[float, Any, "Callable[[Any], Any] | None"]
"""A live key's `until`, its decoded value, and how to copy that for a caller
(None: immutable, shared)."""

SHARDS: Final = 61
"""Dicts per cache; key `k` lives in `shards[hash(k) % SHARDS]`."""
NO_ENTRIES: Final = cast("dict[Any, Any]", MappingProxyType({}))
"""A shard with no dict yet (read-only: writing into it raises)."""
Shards = list[dict[CacheKey, State]]


def new_shards() -> list[dict[Any, Any]]:
    """The shards of a new cache (or of its decoded values): none made yet."""
    return [NO_ENTRIES] * SHARDS


def _state(record: Record) -> State:
    expires = record.expires
    if record.kind is not Kind.CACHE_SET:
        until = -1.0
    elif expires > 0:
        until = expires
    else:  # 0 never expires; a negative or NaN deadline has passed
        until = 0.0 if expires == 0 else _PASSED
    return (
        until,
        record.data,
        record.hlc,
        record.node,
        record.expires,
        record.seq,
        record.codec,
        record.key,
    )


class Entry:
    """One key's state as a record, for callers off the hot path.

    Example:
        >>> from ivip_ipc_async.records import encode_key
        >>> m = Mirror()
        >>> _ = m.apply(Record(Kind.CACHE_SET, "c", encode_key("k"), b"1", hlc=1))
        >>> entry = m.lookup("c", "k")
        >>> entry.live(time.time()), entry.deleted, entry.record.data
        (True, False, b'1')
    """

    __slots__ = ("name", "state")

    def __init__(self, name: str, state: State) -> None:
        self.name = name
        self.state = state

    @property
    def record(self) -> Record:
        """The winning record (a delete for a tombstone)."""
        return _record(self.name, self.state)

    @property
    def data(self) -> bytes:
        """The encoded value (empty for a tombstone)."""
        return self.state[DATA]

    @property
    def deleted(self) -> bool:
        """A tombstone: the key was deleted (or expired)."""
        return self.state[UNTIL] < 0

    def live(self, now: float) -> bool:
        """Present and not expired at wall-clock time `now`."""
        until = self.state[UNTIL]
        return until == 0 or until > now


class Mirror:
    """All caches of one `AsyncIPC`, keyed by cache name, then by key.

    Example:
        >>> from ivip_ipc_async.records import encode_key
        >>> m = Mirror()
        >>> new = Record(Kind.CACHE_SET, "default", encode_key("k"), b'"new"', hlc=2, node=1)
        >>> old = Record(Kind.CACHE_SET, "default", encode_key("k"), b'"old"', hlc=1, node=9)
        >>> m.apply(new), m.apply(old)
        (True, False)
        >>> m.lookup("default", "k").record.data
        b'"new"'
    """

    def __init__(self, tombstone_ttl: float = 120.0) -> None:
        self.caches: dict[str, Shards] = {}
        # Decoded values of keys that were read, dropped when their key changes
        # (sharded the same way).
        self.decoded: dict[str, list[dict[CacheKey, Decoded]]] = {}
        self.tombstone_ttl = tombstone_ttl
        self.version = 0  # bumped on every change, so a snapshot knows it is stale
        self.nbytes = 0  # about what a snapshot of the state takes (the size cap reserves it)
        self.rejected = 0  # cache records ignored: their key was not a cache key

    def apply(self, record: Record) -> bool:
        """Apply a cache record; True when it won (changed the state)."""
        try:
            key = decode_key(record.key)
        except ValueError:  # forged or corrupted with a valid checksum: not a key
            self.rejected += 1
            rate_limited(
                logging.WARNING,
                ("bad-cache-key", record.topic),
                "ignored a cache record whose key %r is not a cache key (cache %r)",
                record.key[:40],
                record.topic,
            )
            return False
        name = record.topic
        shards = self.caches.get(name)
        if shards is None:
            shards = self.caches[name] = new_shards()
        shard = hash(key) % SHARDS
        entries = shards[shard]
        if entries is NO_ENTRIES:
            entries = shards[shard] = {}
        held = entries.get(key)
        if held is not None:
            mine, theirs = (held[HLC], held[NODE]), (record.hlc, record.node)
            if mine > theirs:
                return False
            # (hlc, node) is unique per write; should two records still share it,
            # the content decides, so every process picks the same one.
            if mine == theirs and (_kind(held), held[DATA], held[EXPIRES]) >= (
                record.kind,
                record.data,
                record.expires,
            ):
                return False
            self.nbytes -= _size(name, held)
            self._forget_decoded(name, key)
        state = entries[key] = _state(record)
        self.nbytes += _size(name, state)
        self.version += 1
        return True

    def lookup(self, name: str, key: CacheKey) -> Entry | None:
        """The entry for `key` in cache `name`, tombstone or expired included."""
        shards = self.caches.get(name)
        state = None if shards is None else shards[hash(key) % SHARDS].get(key)
        return None if state is None else Entry(name, state)

    def count(self) -> int:
        """Entries of every cache, tombstones included."""
        return sum(len(entries) for shards in self.caches.values() for entries in shards)

    def live_keys(self, name: str, now: float | None = None) -> list[CacheKey]:
        """Keys of cache `name` that are present and not expired."""
        now = time.time() if now is None else now
        return [
            k
            for entries in self.caches.get(name, ())
            for k, s in entries.items()
            if s[UNTIL] == 0 or s[UNTIL] > now
        ]

    def expire(self, name: str, now: float | None = None) -> int:
        """Drop the expired entries of cache `name`; returns how many.

        An expired entry becomes a tombstone with the same clock, so a late copy
        of the same write cannot bring it back.
        """
        now = time.time() if now is None else now
        removed = 0
        for entries in self.caches.get(name, ()):
            for key, state in list(entries.items()):
                if 0 < state[UNTIL] <= now:
                    entries[key] = _tombstone(state)
                    self.nbytes -= len(state[DATA])
                    self._forget_decoded(name, key)
                    removed += 1
        if removed:
            self.version += 1
        return removed

    def compact(self, now: float | None = None) -> int:
        """Expire every cache and forget tombstones older than `tombstone_ttl`."""
        now = time.time() if now is None else now
        for name in list(self.caches):
            self.expire(name, now)
        horizon_ms = int((now - self.tombstone_ttl) * 1000)
        forgotten = 0
        for name, shards in list(self.caches.items()):
            for entries in shards:
                for key, state in list(entries.items()):
                    if state[UNTIL] < 0 and (state[HLC] >> 16) < horizon_ms:
                        del entries[key]
                        self.nbytes -= _size(name, state)
                        forgotten += 1
            if not any(shards):
                del self.caches[name]
                self.decoded.pop(name, None)
        return forgotten

    def records(self, now: float | None = None) -> Iterator[Record]:
        """Every entry as a record, for a snapshot: expired entries as tombstones,
        tombstones older than `tombstone_ttl` left out (and forgotten).

        It walks copies, so the caches may change while it is consumed a slice
        at a time: a change it misses is in the log after the snapshot's
        positions, and last-writer-wins makes one it sees harmless.
        """
        now = time.time() if now is None else now
        horizon_ms = int((now - self.tombstone_ttl) * 1000)
        for name, shards in list(self.caches.items()):
            for entries in shards:
                # A dict copy is one C call and one object: no tuples for the
                # cyclic GC to chase while the loop waits.
                for key, state in entries.copy().items():
                    until = state[UNTIL]
                    if until < 0:
                        if (state[HLC] >> 16) < horizon_ms:
                            if entries.get(key) is state:
                                del entries[key]
                                self.nbytes -= _size(name, state)
                            continue
                    elif 0 < until <= now:
                        state = _tombstone(state)
                    yield _record(name, state)

    def remember(self, name: str, key: CacheKey, decoded: Decoded) -> None:
        """Keep the decoded value of a live key of cache `name` that was just
        read, for the next reads (`decoded`; dropped when the key changes).

        Example:
            >>> m = Mirror()
            >>> m.remember("default", "k", (0.0, {"a": 1}, dict.copy))
            >>> m.decoded["default"][hash("k") % SHARDS]["k"][1]
            {'a': 1}
        """
        shards = self.decoded.get(name)
        if shards is None:
            shards = self.decoded[name] = new_shards()
        shard = hash(key) % SHARDS
        memos = shards[shard]
        if memos is NO_ENTRIES:
            memos = shards[shard] = {}
        memos[key] = decoded

    def _forget_decoded(self, name: str, key: CacheKey) -> None:
        decoded = self.decoded.get(name)
        if decoded is not None:
            memos = decoded[hash(key) % SHARDS]
            if key in memos:
                del memos[key]


def _size(name: str, state: State) -> int:
    """About the bytes a key's record takes in a snapshot (a character of the name as a byte)."""
    return HEADER_SIZE + len(name) + len(state[RAW_KEY]) + len(state[DATA])


def _kind(state: State) -> Kind:
    return Kind.CACHE_DELETE if state[UNTIL] < 0 else Kind.CACHE_SET


def _record(name: str, state: State) -> Record:
    _, data, hlc, node, expires, seq, codec, raw_key = state
    fields = (_kind(state), name, raw_key, data, hlc, node, expires, seq, codec)
    return _new_record(Record, fields)


def _tombstone(state: State) -> State:
    """The delete that an expired entry becomes (same clock, no value)."""
    _, _, hlc, node, _, seq, codec, raw_key = state
    return (-1.0, b"", hlc, node, 0.0, seq, codec, raw_key)
