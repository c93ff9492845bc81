"""The in-memory state of every cache: last-writer-wins over cache records.

Every process keeps one `Mirror` per `AsyncIPC`, fed by the same dispatch that
feeds event handlers. A cache record wins when its `(hlc, node)` is greater than
the one held for its key, so applying records in any order, or twice, gives the
same state (invariant 3). Deletes are kept as tombstones until they are older
than `tombstone_ttl`, by which time no older record can still arrive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from .records import HEADER_SIZE, CacheKey, Kind, Record, decode_key

__all__ = ["UNSET", "Entry", "Mirror"]

UNSET: Final[Any] = object()


class Entry:
    """The winning record for one key, plus its decoded value when immutable."""

    __slots__ = ("copier", "record", "until", "value")

    def __init__(self, record: Record) -> None:
        self.record = record
        # For the read path: -1 deleted, 0 never expires, else the wall-clock deadline.
        self.until = (record.expires or 0.0) if record.kind is Kind.CACHE_SET else -1.0
        self.value: Any = UNSET  # a decoded template, never handed out when mutable
        self.copier: Callable[[Any], Any] | None = None  # makes a caller's copy of it

    @property
    def deleted(self) -> bool:
        return self.record.kind is Kind.CACHE_DELETE

    def live(self, now: float) -> bool:
        """Present and not expired at wall-clock time `now`."""
        rec = self.record
        return rec.kind is Kind.CACHE_SET and (rec.expires == 0.0 or rec.expires > now)


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
        self.caches: dict[str, dict[CacheKey, Entry]] = {}
        self.tombstone_ttl = tombstone_ttl
        self.version = 0  # bumped on every change, so a snapshot knows it is stale
        self.nbytes = 0  # about what a snapshot of the state takes (the size cap reserves it)

    def apply(self, record: Record) -> bool:
        """Apply a cache record; True when it won (changed the state)."""
        key = decode_key(record.key)
        entries = self.caches.get(record.topic)
        if entries is None:
            entries = self.caches[record.topic] = {}
        held = entries.get(key)
        if held is not None:
            h = held.record
            mine, theirs = (h.hlc, h.node), (record.hlc, record.node)
            if mine > theirs:
                return False
            # (hlc, node) is unique per write; should two records still share it,
            # the content decides, so every process picks the same one.
            if mine == theirs and (h.kind, h.data, h.expires) >= (
                record.kind,
                record.data,
                record.expires,
            ):
                return False
        entries[key] = Entry(record)
        self.nbytes += _size(record) - (_size(held.record) if held is not None else 0)
        self.version += 1
        return True

    def lookup(self, name: str, key: CacheKey) -> Entry | None:
        """The entry for `key` in cache `name`, tombstone or expired included."""
        entries = self.caches.get(name)
        return None if entries is None else entries.get(key)

    def live_keys(self, name: str, now: float | None = None) -> list[CacheKey]:
        """Keys of cache `name` that are present and not expired."""
        now = time.time() if now is None else now
        entries = self.caches.get(name, {})
        return [k for k, e in entries.items() if e.live(now)]

    def expire(self, name: str, now: float | None = None) -> int:
        """Drop the expired entries of cache `name`; returns how many.

        An expired entry becomes a tombstone with the same clock, so a late copy
        of the same write cannot bring it back.
        """
        now = time.time() if now is None else now
        entries = self.caches.get(name, {})
        removed = 0
        for key, entry in list(entries.items()):
            rec = entry.record
            if rec.kind is Kind.CACHE_SET and rec.expires != 0.0 and rec.expires <= now:
                entries[key] = Entry(_as_tombstone(rec))
                self.nbytes -= len(rec.data)
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
        for name, entries in list(self.caches.items()):
            for key, entry in list(entries.items()):
                if entry.deleted and (entry.record.hlc >> 16) < horizon_ms:
                    del entries[key]
                    self.nbytes -= _size(entry.record)
                    forgotten += 1
            if not entries:
                del self.caches[name]
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
        for entries in list(self.caches.values()):
            # A dict copy is one C call and one object: no 100,000 tuples for
            # the cyclic GC to chase while the loop waits.
            for key, entry in entries.copy().items():
                rec = entry.record
                if rec.kind is Kind.CACHE_DELETE:
                    if (rec.hlc >> 16) < horizon_ms:
                        if entries.get(key) is entry:
                            del entries[key]
                            self.nbytes -= _size(rec)
                        continue
                elif rec.expires != 0.0 and rec.expires <= now:
                    rec = _as_tombstone(rec)
                yield rec


def _size(rec: Record) -> int:
    """About the bytes `rec` takes in a snapshot (a character of the name as a byte)."""
    return HEADER_SIZE + len(rec.topic) + len(rec.key) + len(rec.data)


def _as_tombstone(rec: Record) -> Record:
    return Record(
        Kind.CACHE_DELETE, rec.topic, rec.key, b"", rec.hlc, rec.node, 0.0, rec.seq, rec.codec
    )
