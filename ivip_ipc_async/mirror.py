"""The in-memory state of every cache: last-writer-wins over cache records.

Every process keeps one `Mirror` per `AsyncIPC`, fed by the same dispatch that
feeds event handlers. A cache record wins when its `(hlc, node)` is greater than
the one held for its key, so applying records in any order, or twice, gives the
same state (invariant 3). Deletes are kept as tombstones until they are older
than `tombstone_ttl`, by which time no older record can still arrive.

A key's state is one `bytes` object (`State`): its clock, expiry and codec
packed in 41 bytes, then its encoded value. Not a tuple, nor an object per
field: a shard dict holding only strings, numbers and bytes is never tracked by
the cyclic garbage collector, so the full collections that happen while a
joiner loads a million keys never walk them (a tracked dict of a million
untracked tuples took one 88 ms), and a key costs one object besides its name
(about 230 bytes in all for a small value, against about 450 as a tuple of
eight). Decoded values, which can be containers, are kept apart in `decoded`,
for the keys that are read.

A cache's keys are spread over `SHARDS` dicts by their hash: a dict that grows
past a power of two copies itself whole, in one step (about 10 ms at 350,000
keys, 27 ms at 700,000), and a shard is a sixty-first of the cache. The number
is prime, so keys that share their low bits (ids that are multiples of 1,024,
say) still spread; a shard's dict is made when its first key comes.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from types import MappingProxyType
from typing import Any, Final, cast

from .logs import rate_limited
from .records import HEADER_SIZE, CacheKey, Kind, Record, _new_record, encode_key

__all__ = [
    "NO_ENTRIES",
    "SHARDS",
    "Entry",
    "Mirror",
    "Shards",
    "State",
    "data_of",
    "new_shards",
    "pack_state",
    "until_of",
]

State = bytes
"""One key's winning record, packed: `until`, `hlc`, `node`, `expires`, `seq` and
`codec` (`_HEAD`, 41 bytes), then the encoded value. See `until_of` and `data_of`.

`until` is for the read path: -1 deleted, 0 never expires, else the wall-clock
deadline. The cache key is the dict's key, and the cache name its dict's: a
record's key bytes are made again (`encode_key`) when a record is.
"""
_HEAD: Final = struct.Struct("<dQQdQB")  # until, hlc, node, expires, seq, codec
DATA: Final = _HEAD.size  # where the encoded value starts in a `State`
_unpack_head = _HEAD.unpack_from
_pack_head = _HEAD.pack
_unpack_until = struct.Struct("<d").unpack_from
_unpack_clock = struct.Struct("<QQ").unpack_from  # (hlc, node), at offset 8
_PASSED: Final = 5e-324  # an `until` that has passed, whatever the clock says


def until_of(state: State) -> float:
    """A state's `until`: -1 deleted, 0 never expires, else its wall-clock deadline.

    Example:
        >>> until_of(pack_state(Record(Kind.CACHE_SET, "c", b"sk", b"1", expires=9.5)))
        9.5
    """
    return _unpack_until(state)[0]  # type: ignore[no-any-return]


def data_of(state: State) -> bytes:
    """A state's encoded value (empty for a tombstone).

    Example:
        >>> data_of(pack_state(Record(Kind.CACHE_SET, "c", b"sk", b'"v"')))
        b'"v"'
    """
    return state[DATA:]


def pack_state(record: Record) -> State:
    """A cache record as the state a mirror keeps for its key (`ValueError` for
    numbers no frame could carry).

    Example:
        >>> state = pack_state(Record(Kind.CACHE_DELETE, "c", b"sk", b"", hlc=7))
        >>> len(state), until_of(state)
        (41, -1.0)
    """
    kind, _, _, data, hlc, node, expires, seq, codec = record
    if kind is not _SET:
        until = -1.0
    elif expires > 0:
        until = expires
    else:  # 0 never expires; a negative or NaN deadline has passed
        until = 0.0 if expires == 0 else _PASSED
    try:
        return _pack_head(until, hlc, node, expires, seq, codec) + data
    except struct.error as exc:
        raise ValueError(f"not a record a frame could carry: {exc}") from exc


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

    __slots__ = ("key", "name", "state")

    def __init__(self, name: str, key: CacheKey, state: State) -> None:
        self.name = name
        self.key = key
        self.state = state

    @property
    def record(self) -> Record:
        """The winning record (a delete for a tombstone)."""
        return _record(self.name, self.key, self.state)

    @property
    def data(self) -> bytes:
        """The encoded value (empty for a tombstone)."""
        return self.state[DATA:]

    @property
    def deleted(self) -> bool:
        """A tombstone: the key was deleted (or expired)."""
        return until_of(self.state) < 0

    def live(self, now: float) -> bool:
        """Present and not expired at wall-clock time `now`."""
        until = until_of(self.state)
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
        # Every cache record read goes through here (a joiner: a million in a
        # row), so `decode_key` and `pack_state` are inlined.
        kind, name, raw, data, hlc, node, expires, seq, codec = record
        tag = raw[:1]
        try:
            if tag == b"s":
                key: CacheKey = raw[1:].decode()
            elif tag == b"i":
                key = int(raw[1:])
            else:
                raise ValueError("not an encoded cache key")
            if kind is not _SET:
                until = -1.0
            elif expires > 0:
                until = expires
            else:  # 0 never expires; a negative or NaN deadline has passed
                until = 0.0 if expires == 0 else _PASSED
            state = _pack_head(until, hlc, node, expires, seq, codec) + data
        except (ValueError, struct.error):  # forged or corrupted with a valid checksum
            self._reject(record)
            return False
        shards = self.caches.get(name)
        if shards is None:
            shards = self.caches[name] = new_shards()
        shard = hash(key) % SHARDS
        entries = shards[shard]
        if entries is NO_ENTRIES:
            entries = shards[shard] = {}
        held = entries.get(key)
        if held is not None:
            mine = _unpack_clock(held, _CLOCK_AT)
            if mine > (hlc, node):
                return False
            # (hlc, node) is unique per write; should two records still share it,
            # the content decides, so every process picks the same one.
            if mine == (hlc, node) and (_kind(held), held[DATA:], _expires(held)) >= (
                kind,
                data,
                expires,
            ):
                return False
            self.nbytes -= _size(name, key, held)
            self._forget_decoded(name, key)
        entries[key] = state
        self.nbytes += _FIXED + len(name) + len(str(key)) + len(state)  # `_size`, inlined
        self.version += 1
        return True

    def restore(self, records: Iterable[Record], codec_id: int) -> int:
        """Apply the cache records among `records` that codec `codec_id` wrote (the
        others are left out); returns the greatest clock among them (0: none).

        What a joiner's start does with a million records in a row: one call per
        slice, and a key this mirror does not hold yet (nearly all of them)
        inserted without a call per record; anything else goes through `apply`.

        Example:
            >>> from ivip_ipc_async.records import encode_key
            >>> m = Mirror()
            >>> m.restore([Record(Kind.CACHE_SET, "c", encode_key(1), b"1", hlc=5)], codec_id=1)
            5
            >>> m.lookup("c", 1).data
            b'1'
        """
        top = 0
        caches = self.caches
        pack = _pack_head
        last_name = None
        shards: Shards = []
        added = 0
        nbytes = 0
        for record in records:
            kind, name, raw, data, hlc, node, expires, seq, codec = record
            if codec != codec_id or (kind is not _SET and kind is not _DELETE):
                continue
            if hlc > top:
                top = hlc
            tag = raw[:1]
            if kind is not _SET or expires != 0 or (tag != b"s" and tag != b"i"):
                self.apply(record)
                continue
            try:
                key: CacheKey = raw[1:].decode() if tag == b"s" else int(raw[1:])
                state = pack(0.0, hlc, node, expires, seq, codec) + data
            except (ValueError, struct.error):
                self._reject(record)
                continue
            if name != last_name:
                found = caches.get(name)
                shards = caches[name] = new_shards() if found is None else found
                last_name = name
            shard = hash(key) % SHARDS
            entries = shards[shard]
            if entries is NO_ENTRIES:
                entries = shards[shard] = {}
            if key in entries:
                self.apply(record)
                continue
            entries[key] = state
            nbytes += _FIXED + len(name) + len(str(key)) + len(state)
            added += 1
        if added:
            self.nbytes += nbytes
            self.version += 1
        return top

    def _reject(self, record: Record) -> None:
        self.rejected += 1
        rate_limited(
            logging.WARNING,
            ("bad-cache-key", record.topic),
            "ignored a cache record whose key %r is not a cache key (cache %r)",
            record.key[:40],
            record.topic,
        )

    def lookup(self, name: str, key: CacheKey) -> Entry | None:
        """The entry for `key` in cache `name`, tombstone or expired included."""
        shards = self.caches.get(name)
        state = None if shards is None else shards[hash(key) % SHARDS].get(key)
        return None if state is None else Entry(name, key, state)

    def count(self) -> int:
        """Entries of every cache, tombstones included."""
        return sum(len(entries) for shards in self.caches.values() for entries in shards)

    def live_keys(self, name: str, now: float | None = None) -> list[CacheKey]:
        """Keys of cache `name` that are present and not expired."""
        now = time.time() if now is None else now
        unpack = _unpack_until
        keys: list[CacheKey] = []
        for entries in self.caches.get(name, ()):
            for k, s in entries.items():
                until = unpack(s)[0]
                if until == 0 or until > now:
                    keys.append(k)
        return keys

    def expire(self, name: str, now: float | None = None) -> int:
        """Drop the expired entries of cache `name`; returns how many.

        An expired entry becomes a tombstone with the same clock, so a late copy
        of the same write cannot bring it back.
        """
        now = time.time() if now is None else now
        removed = 0
        unpack = _unpack_until
        for entries in self.caches.get(name, ()):
            for key, state in list(entries.items()):
                if 0 < unpack(state)[0] <= now:
                    entries[key] = _tombstone(state)
                    self.nbytes -= len(state) - DATA
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
                    if _stale_tombstone(state, horizon_ms):
                        del entries[key]
                        self.nbytes -= _size(name, key, state)
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
        unpack = _unpack_until
        for name, shards in list(self.caches.items()):
            for entries in shards:
                # A dict copy is one C call and one object, untracked by the GC
                # as its states are not containers.
                for key, state in entries.copy().items():
                    until = unpack(state)[0]
                    if until < 0:
                        if _stale_tombstone(state, horizon_ms):
                            if entries.get(key) is state:
                                del entries[key]
                                self.nbytes -= _size(name, key, state)
                            continue
                    elif 0 < until <= now:
                        state = _tombstone(state)
                    yield _record(name, key, state)

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


_SET: Final = Kind.CACHE_SET
_DELETE: Final = Kind.CACHE_DELETE
_CLOCK_AT: Final = 8  # (hlc, node) in a `State`
_EXPIRES_AT: Final = 24
_unpack_double = struct.Struct("<d").unpack_from
_unpack_hlc = struct.Struct("<Q").unpack_from


_FIXED: Final = HEADER_SIZE + 1 - DATA  # a frame's header and key tag, less a state's head


def _size(name: str, key: CacheKey, state: State) -> int:
    """About the bytes a key's record takes in a snapshot (a character of the
    name or key as a byte)."""
    return _FIXED + len(name) + len(str(key)) + len(state)


def _kind(state: State) -> Kind:
    return _DELETE if _unpack_until(state)[0] < 0 else _SET


def _expires(state: State) -> float:
    return _unpack_double(state, _EXPIRES_AT)[0]  # type: ignore[no-any-return]


def _stale_tombstone(state: State, horizon_ms: int) -> bool:
    """A tombstone whose write is older than `horizon_ms` (wall clock, ms)."""
    hlc: int = _unpack_hlc(state, _CLOCK_AT)[0]
    return until_of(state) < 0 and (hlc >> 16) < horizon_ms


def _record(name: str, key: CacheKey, state: State) -> Record:
    until, hlc, node, expires, seq, codec = _unpack_head(state)
    kind = _DELETE if until < 0 else _SET
    fields = (kind, name, encode_key(key), state[DATA:], hlc, node, expires, seq, codec)
    return _new_record(Record, fields)


def _tombstone(state: State) -> State:
    """The delete that an expired entry becomes (same clock, no value)."""
    _, hlc, node, _, seq, codec = _unpack_head(state)
    return _pack_head(-1.0, hlc, node, 0.0, seq, codec)
