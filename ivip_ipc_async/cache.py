"""`AsyncCache`: a cache shared by the processes of one `AsyncIPC`.

Writes (`set`, `delete`) are records on the IPC stream; reads are served from
the in-memory mirror that the stream keeps current in every process. TTLs are
wall-clock deadlines checked on read (no timer per key).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import inspect
import json
import time
from asyncio import get_running_loop as _running_loop  # (a coroutine always has one)
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, Final, Generic, ParamSpec, Protocol, TypeVar, overload

from . import defaults
from .conditions import MAX_COUNTER, Conditional, Mode, Outcome, is_live, version_of
from .forks import generation as _fork_generation
from .ipc import AsyncIPC
from .logs import logger
from .medium import EXPIRED, HITS, MISSES, check_record_size
from .mirror import SHARDS, data_of, until_of
from .records import HEADER_SIZE, CacheKey, Kind, Record, encode_key
from .waiting import CancelGuard

__all__ = ["AsyncCache", "MemoizeDecorator", "Memoized"]


P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
T = TypeVar("T")
V = TypeVar("V")

_IMMUTABLE: Final = frozenset({str, int, float, bool, type(None)})
_MISSING: Final[Any] = object()
_ANY_VERSION: Final[Any] = object()  # `set` without a condition
_COPY_BELOW: Final = 512  # encoded bytes; measured: tree copy 2x faster than json below
_MEMO_POLL: Final = 0.5  # seconds: the safety net while waiting for another process's result


def _copy_tree(value: Any) -> Any:
    """A deep copy of a tree of dicts, lists and immutable scalars."""
    kind = type(value)
    if kind is dict:
        return {k: v if type(v) in _IMMUTABLE else _copy_tree(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _IMMUTABLE else _copy_tree(v) for v in value]
    if kind is tuple:  # only from a custom codec; JSON has none
        return tuple(v if type(v) in _IMMUTABLE else _copy_tree(v) for v in value)
    return value if kind in _IMMUTABLE else copy.deepcopy(value)


class AsyncCache(Generic[V]):
    """A key-value cache kept in sync across processes.

    Generic in its value type for type checkers: `AsyncCache(ipc)` holds `Any`;
    annotate `users: AsyncCache[User] = AsyncCache(ipc, name="users")` to have
    `get` return `User | None` (or `User | T` with a default of type `T`).

    Args:
        ipc: The `AsyncIPC` to travel on (the default `IPC` when None).
        name: Caches with different names on one IPC never see each other's keys.
        default_ttl: Seconds a value lives when `set` is given no ttl; 0 or a
            negative number (or None) means no expiry.

    Keys are `str` or `int` and keep their type (`1` and `"1"` are two keys).
    Values are anything the codec accepts (JSON by default). Every read returns
    a fresh copy: mutating it changes nothing for anyone else.

    Example:
        >>> import asyncio, tempfile
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         cache = AsyncCache(ipc)
        ...         await cache.set("chave", "valor", 60)
        ...         return await cache.get("chave"), await cache.get("nope", "fallback")
        >>> asyncio.run(main())
        ('valor', 'fallback')
    """

    def __init__(
        self: AsyncCache[Any],
        ipc: AsyncIPC | None = None,
        *,
        name: str = "default",
        default_ttl: float | None = 60,
    ) -> None:
        if ipc is None:
            ipc = defaults.IPC
        if not isinstance(name, str) or not name:
            raise TypeError("cache name must be a non-empty str")
        if len(name.encode()) > 0xFFFF:
            raise ValueError("cache name too long")
        self.ipc = ipc
        self.name = name
        self.default_ttl = _check_ttl(default_ttl)
        self._inflight: dict[str, _Flight] = {}
        # Reads of this instance (see `stats`): found a value / found none, and
        # of those found none, how many found an expired entry; summed into
        # `ipc.stats()` (`cache_hits`, ...) with those of the ipc's other caches.
        self._reads = ipc.medium.tally.reads(self)
        self._medium = ipc.medium  # the ipc's for its life: one lookup less per get

    def __repr__(self) -> str:
        return f"<AsyncCache {self.name!r} default_ttl={self.default_ttl}>"

    # -- writes ---------------------------------------------------------------------

    @overload
    async def set(self, key: CacheKey, value: V, ttl: float | None = None) -> None: ...

    @overload
    async def set(
        self, key: CacheKey, value: V, ttl: float | None = None, *, if_version: str | None
    ) -> bool: ...

    async def set(
        self,
        key: CacheKey,
        value: V,
        ttl: float | None = None,
        *,
        if_version: str | None = _ANY_VERSION,
    ) -> bool | None:
        """Store `value` under `key` for `ttl` seconds, in every process.

        `ttl` None uses `default_ttl`; 0 or negative means no expiry. When this
        returns, the write is in the shared directory and visible here.

        With `if_version` (a version from `get_with_version`; None: the key was
        absent), the write applies only if the key is still at that version, in
        every process's view: a versioned write (compare-and-set), which returns
        whether it was stored (without `if_version`, `set` returns None). See
        `get_with_version` and docs/api.md for what that means across processes.

        Raises:
            TypeError: the key is not str/int, or the value cannot be encoded.
            ValueError: the record is over the IPC's `max_record_size`.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache = AsyncCache(ipc)
            ...         await cache.set(7, {"name": "Ana"}, 0)   # never expires
            ...         return await cache.get(7)
            >>> asyncio.run(main())
            {'name': 'Ana'}
        """
        raw_key = encode_key(key)
        seconds = self.default_ttl if ttl is None else _check_ttl(ttl)
        data = self.ipc.codec.dumps(value)
        check_record_size(
            self.ipc.max_record_size, len(self.name.encode()) + len(raw_key), len(data)
        )
        if if_version is _ANY_VERSION:
            await self._write(Kind.CACHE_SET, raw_key, data, seconds)
            return None
        if if_version is not None and not isinstance(if_version, str):
            raise TypeError(f"if_version must be a version str or None, not {if_version!r}")
        outcome = await self._write_if(Mode.IF_VERSION, raw_key, data, seconds, if_version)
        return outcome.applied

    async def delete(self, key: CacheKey) -> bool:
        """Remove `key` everywhere; returns whether it was present here.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache = AsyncCache(ipc)
            ...         await cache.set("k", 1)
            ...         return await cache.delete("k"), await cache.delete("k")
            >>> asyncio.run(main())
            (True, False)
        """
        raw_key = encode_key(key)
        existed = await self.has(key)
        await self._write(Kind.CACHE_DELETE, raw_key, b"", 0.0)
        return existed

    async def clear(self) -> int:
        """Delete every key of this cache everywhere; returns how many there were.

        Other caches (other names) keep their keys.

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache, other = AsyncCache(ipc), AsyncCache(ipc, name="other")
            ...         await cache.set("a", 1); await cache.set("b", 2); await other.set("a", 3)
            ...         return await cache.clear(), await cache.keys(), await other.keys()
            >>> asyncio.run(main())
            (2, [], ['a'])
        """
        keys = await self.keys()
        for key in keys:
            await self._write(Kind.CACHE_DELETE, encode_key(key), b"", 0.0)
        return len(keys)

    def _record(self, kind: Kind, raw_key: bytes, data: bytes, ttl: float, node: int) -> Record:
        """A cache record of this cache, stamped now by this instance's clock."""
        ipc = self.ipc
        expires = time.time() + ttl if ttl > 0 else 0.0
        return Record(
            kind, self.name, raw_key, data, ipc.clock.tick(), node, expires, 0, ipc.codec.id
        )

    async def _write(self, kind: Kind, raw_key: bytes, data: bytes, ttl: float) -> None:
        backend = await self.ipc.medium.started_backend()
        await backend.append((self._record(kind, raw_key, data, ttl, backend.node),))

    async def _write_if(
        self,
        mode: Mode,
        raw_key: bytes,
        data: bytes,
        ttl: float,
        expected: str | None = None,
        delta: int = 0,
    ) -> Outcome:
        """A conditional write through the backend (`Backend.write_if`)."""
        backend = await self.ipc.medium.started_backend()
        record = self._record(Kind.CACHE_SET, raw_key, data, ttl, backend.node)
        tick = self.ipc.clock.tick
        return await backend.write_if(Conditional(mode, record, tick, expected, delta))

    # -- atomic operations ---------------------------------------------------------------

    async def add(self, key: CacheKey, value: V, ttl: float | None = None) -> bool:
        """Store `value` only if `key` is absent (or deleted, or expired); returns
        whether this call stored it.

        Atomic across processes: of several calls racing on one key, in any
        processes, exactly one returns True, and when each returns, `get` in its
        process sees the winner's value (see docs/api.md: "Atomic operations").

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache = AsyncCache(ipc)
            ...         first = await cache.add("job:7", "worker-1")
            ...         second = await cache.add("job:7", "worker-2")
            ...         return first, second, await cache.get("job:7")
            >>> asyncio.run(main())
            (True, False, 'worker-1')
        """
        raw_key = encode_key(key)
        seconds = self.default_ttl if ttl is None else _check_ttl(ttl)
        data = self.ipc.codec.dumps(value)
        check_record_size(
            self.ipc.max_record_size, len(self.name.encode()) + len(raw_key), len(data)
        )
        outcome = await self._write_if(Mode.ADD, raw_key, data, seconds)
        return outcome.applied

    async def incr(self, key: CacheKey, delta: int = 1, ttl: float | None = None) -> int:
        """Add `delta` to the integer under `key` (0 when absent) and return the result.

        Atomic across processes: N processes making M increments each end at
        exactly N x M. A key it creates lives `ttl` seconds (`default_ttl` when
        None; 0: forever); an existing key keeps its expiry. Counters are exact
        within ±(2**53 - 1) on every backend.

        Raises:
            TypeError: `delta` is not an int, the key holds something else than
                an integer, or the cache's codec is not JSON-compatible.
            OverflowError: the result would be beyond ±(2**53 - 1) (nothing stored).

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache = AsyncCache(ipc)
            ...         await cache.incr("hits"); await cache.incr("hits", 10)
            ...         return await cache.decr("hits"), await cache.get("hits")
            >>> asyncio.run(main())
            (10, 10)
        """
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"incr: delta must be an int, not {type(delta).__name__}")
        if abs(delta) > MAX_COUNTER:
            raise OverflowError(f"incr: delta beyond ±{MAX_COUNTER}")
        if self.ipc.codec.id != 1:
            raise TypeError("incr needs a JSON-compatible codec (counters are JSON integers)")
        raw_key = encode_key(key)
        seconds = self.default_ttl if ttl is None else _check_ttl(ttl)
        outcome = await self._write_if(Mode.INCR, raw_key, b"", seconds, delta=delta)
        assert outcome.record is not None  # (an increment is never refused)
        return int(outcome.record.data)

    async def decr(self, key: CacheKey, delta: int = 1, ttl: float | None = None) -> int:
        """`incr(key, -delta, ttl)`.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         return await AsyncCache(ipc).decr("stock", 3)
            >>> asyncio.run(main())
            -3
        """
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"decr: delta must be an int, not {type(delta).__name__}")
        return await self.incr(key, -delta, ttl)

    @overload
    async def get_with_version(self, key: CacheKey) -> tuple[V | None, str | None]: ...

    @overload
    async def get_with_version(self, key: CacheKey, default: T) -> tuple[V | T, str | None]: ...

    async def get_with_version(self, key: CacheKey, default: Any = None) -> tuple[Any, str | None]:
        """The value of `key` (or `default`) and its version (None: absent), for a
        versioned write: `set(key, new, if_version=version)` applies only if
        nobody wrote the key since (compare-and-set).

        The version is an opaque string that changes with every write of the
        key and never comes back (its clock and writer).

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache = AsyncCache(ipc)
            ...         await cache.set("cart", ["apple"])
            ...         items, version = await cache.get_with_version("cart")
            ...         ok = await cache.set("cart", items + ["pear"], if_version=version)
            ...         stale = await cache.set("cart", [], if_version=version)
            ...         return ok, stale, await cache.get("cart")
            >>> asyncio.run(main())
            (True, False, ['apple', 'pear'])
        """
        ipc, medium = self.ipc, self.ipc.medium
        backend = await medium.started_backend()
        normal = _normal(key)
        record: Record | None
        if medium.mirror_current:
            entry = medium.mirror.lookup(self.name, normal)
            record = None if entry is None else entry.record
        else:
            record = await backend.fetch(self.name, encode_key(normal))
        if not is_live(record, time.time()):
            self._reads[MISSES] += 1
            if record is not None and record.kind is Kind.CACHE_SET:
                self._reads[EXPIRED] += 1
            return default, None
        assert record is not None
        try:
            value = ipc.codec.loads(record.data)
        except ValueError:
            logger.error("the value of key %r in cache %r cannot be decoded", key, self.name)
            self._reads[MISSES] += 1
            return default, None
        self._reads[HITS] += 1
        return value, version_of(record)

    # -- many keys at once --------------------------------------------------------------

    async def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, V]:
        """The present keys among `keys`, with their values (from this process's
        mirror: no round trip at all).

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache = AsyncCache(ipc)
            ...         await cache.set_many({"a": 1, "b": 2})
            ...         return await cache.get_many(["a", "b", "c"])
            >>> asyncio.run(main())
            {'a': 1, 'b': 2}
        """
        found: dict[CacheKey, V] = {}
        for key in keys:
            value = await self.get(key, _MISSING)
            if value is not _MISSING:
                found[_normal(key)] = value
        return found

    async def set_many(self, mapping: Mapping[CacheKey, V], ttl: float | None = None) -> None:
        """Store every item of `mapping` for `ttl` seconds, in one write.

        On the directory the items are one record batch: every process sees all
        of them or (the writer killed mid-write) none (past `max_record_size`
        in all, several such batches, in order). On Redis, one round trip (one
        pipeline): each key is stored on its own, last writer wins per key.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache = AsyncCache(ipc)
            ...         await cache.set_many({"a": 1, 2: "b"}, ttl=60)
            ...         return await cache.get("a"), await cache.get(2)
            >>> asyncio.run(main())
            (1, 'b')
        """
        seconds = self.default_ttl if ttl is None else _check_ttl(ttl)
        name_len = len(self.name.encode())
        items = []
        for key, value in mapping.items():
            raw_key = encode_key(key)
            data = self.ipc.codec.dumps(value)
            check_record_size(self.ipc.max_record_size, name_len + len(raw_key), len(data))
            items.append((raw_key, data))
        await self._write_many(Kind.CACHE_SET, items, seconds)

    async def delete_many(self, keys: Iterable[CacheKey]) -> int:
        """Remove `keys` everywhere, in one write; returns how many were present here.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache = AsyncCache(ipc)
            ...         await cache.set_many({"a": 1, "b": 2})
            ...         return await cache.delete_many(["a", "b", "c"]), await cache.keys()
            >>> asyncio.run(main())
            (2, [])
        """
        normal = [_normal(key) for key in keys]
        medium = self.ipc.medium
        await medium.started_backend()
        present = 0
        if normal:
            await medium.wait_mirror()
            now = time.time()
            for key in normal:
                entry = medium.mirror.lookup(self.name, key)
                present += entry is not None and entry.live(now)
        raw_keys = [encode_key(key) for key in normal]
        await self._write_many(Kind.CACHE_DELETE, [(raw, b"") for raw in raw_keys], 0.0)
        return present

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every `str` key that starts with `prefix` (as this process's
        mirror holds them), in one write; returns how many.

        A key another process sets while this runs, and that this process has
        not seen yet, is not removed (see docs/api.md).

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache = AsyncCache(ipc)
            ...         await cache.set_many({"user:1": 1, "user:2": 2, "order:1": 3})
            ...         return await cache.delete_prefix("user:"), await cache.keys()
            >>> asyncio.run(main())
            (2, ['order:1'])
        """
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        keys = [k for k in await self.keys() if type(k) is str and k.startswith(prefix)]
        await self._write_many(Kind.CACHE_DELETE, [(encode_key(k), b"") for k in keys], 0.0)
        return len(keys)

    async def _write_many(self, kind: Kind, items: list[tuple[bytes, bytes]], ttl: float) -> None:
        """Records of one kind for many keys, in one append (one write, one round
        trip); past `max_record_size` in all (a batch is one frame), in several
        such parts, in order, each all or none."""
        if not items:
            return
        ipc = self.ipc
        backend = await ipc.medium.started_backend()
        expires = time.time() + ttl if ttl > 0 else 0.0
        tick, node, codec = ipc.clock.tick, backend.node, ipc.codec.id
        name_len = len(self.name.encode())
        part: list[Record] = []
        room = ipc.max_record_size - HEADER_SIZE
        for raw_key, data in items:
            size = HEADER_SIZE + name_len + len(raw_key) + len(data)
            if part and size > room:
                await backend.append(part)
                part, room = [], ipc.max_record_size - HEADER_SIZE
            part.append(Record(kind, self.name, raw_key, data, tick(), node, expires, 0, codec))
            room -= size
        await backend.append(part)

    # -- counters ---------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Reads of this instance in this process: `hits` (a value found),
        `misses` (none found: absent, deleted or expired), and `expired` (of
        the misses, those that found an expired entry); `entries`: keys
        present here now.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache = AsyncCache(ipc)
            ...         await cache.set("k", 1)
            ...         await cache.get("k"); await cache.get("k"); await cache.get("nope")
            ...         return cache.stats()
            >>> asyncio.run(main())
            {'hits': 2, 'misses': 1, 'expired': 0, 'entries': 1}
        """
        medium = self.ipc.medium
        entries = len(medium.mirror.live_keys(self.name)) if medium.mirror_current else 0
        return {
            "hits": self._reads[HITS],
            "misses": self._reads[MISSES],
            "expired": self._reads[EXPIRED],
            "entries": entries,
        }

    # -- reads -------------------------------------------------------------------------

    @overload
    async def get(self, key: CacheKey) -> V | None: ...

    @overload
    async def get(self, key: CacheKey, default: T) -> V | T: ...

    async def get(self, key: CacheKey, default: Any = None) -> Any:
        """The value of `key`, or `default` when it is missing or expired.

        Served from this process's mirror: no disk, no other process.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache = AsyncCache(ipc)
            ...         return await cache.get("missing"), await cache.get("missing", 0)
            >>> asyncio.run(main())
            (None, 0)
        """
        medium = self._medium
        # `medium.ready()`, inlined: this is the hot path.
        if (
            medium.backend is None
            or medium.loop is not _running_loop()
            or medium.generation != _fork_generation[0]
        ):
            await medium.started_backend()
        kt = type(key)
        if kt is not str and kt is not int:
            encode_key(key)  # raises the TypeError, or normalises a subclass
            key = str(key) if isinstance(key, str) else int(key)
        if not medium.mirror_current:
            return await self._get_from_backend(key, default)
        mirror = medium.mirror
        shard = hash(key) % SHARDS
        decoded = mirror.decoded.get(self.name)
        if decoded is not None:
            # Kept current by the mirror (dropped when its key changes).
            memo = decoded[shard].get(key)
            if memo is not None:
                until, value, copier = memo
                if until and until <= time.time():
                    self._reads[MISSES] += 1
                    self._reads[EXPIRED] += 1
                    return default
                self._reads[HITS] += 1
                return value if copier is None else copier(value)
        shards = mirror.caches.get(self.name)
        if shards is None:
            self._reads[MISSES] += 1
            return default
        state = shards[shard].get(key)
        if state is None:
            self._reads[MISSES] += 1
            return default
        until = until_of(state)
        if until and (until < 0 or until <= time.time()):
            self._reads[MISSES] += 1
            if until > 0:
                self._reads[EXPIRED] += 1
            return default
        data = data_of(state)
        try:
            value = self.ipc.codec.loads(data)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            logger.error(
                "the value of key %r in cache %r cannot be decoded; treated as missing",
                key,
                self.name,
                exc_info=True,
            )
            self._reads[MISSES] += 1
            return default
        self._reads[HITS] += 1
        kind = type(value)
        if kind in _IMMUTABLE:
            copier = None  # safe to share: nobody can mutate it
        elif kind is dict and all(type(v) in _IMMUTABLE for v in value.values()):
            # A flat dict: a shallow copy is a full copy, and 10x cheaper than decoding.
            copier = dict.copy
        elif kind is list and all(type(v) in _IMMUTABLE for v in value):
            copier = list.copy
        elif len(data) <= _COPY_BELOW:
            # Small nested values: copying the tree in Python beats decoding again.
            copier = _copy_tree
        else:
            return value  # large: decoded afresh on every read (C speed)
        mirror.remember(self.name, key, (until, value, copier))
        return value if copier is None else copier(value)

    async def _get_from_backend(self, key: CacheKey, default: Any) -> Any:
        """Read one key from the shared medium while the mirror may be stale."""
        backend = await self.ipc.medium.started_backend()
        rec = await backend.fetch(self.name, encode_key(key))
        if rec is None or rec.kind is not Kind.CACHE_SET:
            self._reads[MISSES] += 1
            return default
        if rec.expires and rec.expires <= time.time():
            self._reads[MISSES] += 1
            self._reads[EXPIRED] += 1
            return default
        try:
            value = self.ipc.codec.loads(rec.data)
        except ValueError:
            logger.error("the value of key %r in cache %r cannot be decoded", key, self.name)
            self._reads[MISSES] += 1
            return default
        self._reads[HITS] += 1
        return value

    async def has(self, key: CacheKey) -> bool:
        """Whether `key` is present and not expired.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         return await AsyncCache(ipc).has("k")
            >>> asyncio.run(main())
            False
        """
        medium = self.ipc.medium
        await medium.started_backend()
        if not medium.mirror_current:
            return await self._get_from_backend(key, _MISSING) is not _MISSING
        entry = medium.mirror.lookup(self.name, _normal(key))
        return entry is not None and entry.live(time.time())

    async def keys(self) -> list[CacheKey]:
        """The keys present and not expired, in no particular order.

        While the mirror is being reloaded (Redis reconnecting), waits for it up
        to the backend's `read_timeout`, then raises `BackendUnavailableError`.

        Example:
            >>> import asyncio, tempfile
            >>> from ivip_ipc_async import AsyncIPC
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache = AsyncCache(ipc)
            ...         await cache.set("user", 1); await cache.set(7, 2)
            ...         await cache.set("gone", 3, 0.001)
            ...         await asyncio.sleep(0.01)  # "gone" expires
            ...         return sorted(await cache.keys(), key=str)
            >>> asyncio.run(main())
            [7, 'user']
        """
        medium = self.ipc.medium
        await medium.started_backend()
        await medium.wait_mirror()
        return medium.mirror.live_keys(self.name)

    async def clean_up(self) -> int:
        """Drop expired entries from this process's memory; returns how many.

        Expired entries are already invisible to reads; this frees their memory.
        Every process may do it on its own: expiry is a deadline all agree on.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         return await AsyncCache(ipc).clean_up()
            >>> asyncio.run(main())
            0
        """
        medium = self.ipc.medium
        await medium.started_backend()
        return medium.mirror.expire(self.name)

    def __len__(self) -> int:
        """Keys present and not expired in this process's mirror (0 before start).

        Raises `BackendUnavailableError` while the mirror is being reloaded
        (Redis reconnecting), where it would count nothing.
        """
        medium = self.ipc.medium
        if not medium.mirror_current:
            raise medium.mirror_unavailable()
        return len(medium.mirror.live_keys(self.name))

    # -- memoize -----------------------------------------------------------------------

    @overload
    def memoize(
        self,
        name: str,
        fn: Callable[P, Awaitable[R]],
        ttl: float | None = ...,
        *,
        across_processes: bool = ...,
        lease: float = ...,
    ) -> Memoized[P, R]: ...

    @overload
    def memoize(
        self,
        name: str,
        fn: Callable[P, R],
        ttl: float | None = ...,
        *,
        across_processes: bool = ...,
        lease: float = ...,
    ) -> Memoized[P, R]: ...

    @overload
    def memoize(self, name: Callable[P, Awaitable[R]], /) -> Memoized[P, R]: ...

    @overload
    def memoize(self, name: Callable[P, R], /) -> Memoized[P, R]: ...

    @overload
    def memoize(
        self,
        name: str | None = ...,
        *,
        ttl: float | None = ...,
        across_processes: bool = ...,
        lease: float = ...,
    ) -> MemoizeDecorator: ...

    def memoize(
        self,
        name: str | Callable[..., Any] | None = None,
        fn: Callable[..., Any] | None = None,
        ttl: float | None = None,
        *,
        across_processes: bool = True,
        lease: float = 30.0,
    ) -> Any:
        """Cache the results of `fn` in this cache, shared by every process.

        Two forms, as in the Node original and as a decorator::

            fetch = cache.memoize("user", fetch_user, 30)

            @cache.memoize(ttl=30)
            async def fetch_user(uid): ...

        `fn` may be sync or async; the memoized function is always async. The
        arguments (JSON-encoded) make the key. Each caller gets its own copy of
        the result, as decoded from the cache (so a tuple comes back as a list
        with the JSON codec).

        Single flight: a missing key is computed once across every process
        sharing the cache. Concurrent callers in one process share one call;
        one process computes, under a lock of the key (see `AsyncIPC.lock`),
        while the others wait for the result to arrive through the cache.
        Exceptions are not cached: a failure releases the waiters, and one of
        them computes in turn. A holder killed mid-computation blocks the
        others no longer than its lock: at once on the directory, after at
        most `lease` seconds on Redis (the lease is renewed while it computes).

        Args:
            name: The key prefix (the function's qualified name when omitted).
            fn: The function (the decorator form leaves it out).
            ttl: Seconds a result lives (`default_ttl` when None; 0: forever).
            across_processes: False: single flight within each process only
                (no lock; processes may compute the same key at once), for
                cheap functions where a lock round trip is not worth it.
            lease: Redis only: seconds a killed or paused computing process
                keeps the others waiting.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         cache = AsyncCache(ipc)
            ...         calls = []
            ...         @cache.memoize(ttl=30)
            ...         async def square(x):
            ...             calls.append(x)
            ...             return x * x
            ...         results = await asyncio.gather(square(3), square(3), square(3))
            ...         return results, calls
            >>> asyncio.run(main())
            ([9, 9, 9], [3])
        """
        if isinstance(lease, bool) or not isinstance(lease, int | float) or not lease > 0:
            raise ValueError(f"lease must be a positive number of seconds, not {lease!r}")
        options = (bool(across_processes), float(lease))
        if fn is not None:
            if not isinstance(name, str):
                raise TypeError("memoize(name, fn, ttl): name must be a str")
            return self._memoized(name, fn, ttl, *options)
        if callable(name):  # bare @cache.memoize
            target = name
            return self._memoized(_qualname(target), target, ttl, *options)

        label = name

        def decorate(func: Callable[..., Any]) -> Any:
            return self._memoized(label or _qualname(func), func, ttl, *options)

        return decorate

    def _memoized(
        self,
        name: str,
        fn: Callable[..., Any],
        ttl: float | None,
        across_processes: bool = True,
        lease: float = 30.0,
    ) -> Callable[..., Coroutine[Any, Any, Any]]:
        if not callable(fn):
            raise TypeError(f"memoize needs a callable, not {type(fn).__name__}")
        seconds = self.default_ttl if ttl is None else _check_ttl(ttl)
        codec = self.ipc.codec

        @functools.wraps(fn)
        async def memoized(*args: Any, **kwargs: Any) -> Any:
            key = _memo_key(name, args, kwargs)
            hit = await self.get(key, _MISSING)
            if hit is not _MISSING:
                return hit
            loop = asyncio.get_running_loop()
            flight = self._inflight.get(key)
            if flight is None or not flight.joinable(loop):

                async def compute() -> bytes:
                    result = fn(*args, **kwargs)
                    if inspect.isawaitable(result):
                        result = await result
                    data = codec.dumps(result)
                    raw_key = encode_key(key)
                    check_record_size(
                        self.ipc.max_record_size, len(self.name.encode()) + len(raw_key), len(data)
                    )
                    await self._write(Kind.CACHE_SET, raw_key, data, seconds)
                    return data

                work = self._single_flight(key, compute, lease) if across_processes else compute()
                flight = self._inflight[key] = _Flight(
                    loop.create_task(work, name=f"ivip-memoize:{name}")
                )
                flight.task.add_done_callback(functools.partial(self._landed, key, flight))
            return codec.loads(await flight.join())

        memoized.cache_name = name  # type: ignore[attr-defined]

        def key(*args: Any, **kwargs: Any) -> str:
            return _memo_key(name, args, kwargs)

        async def invalidate(*args: Any, **kwargs: Any) -> bool:
            return await self.delete(_memo_key(name, args, kwargs))

        memoized.key = key  # type: ignore[attr-defined]
        memoized.invalidate = invalidate  # type: ignore[attr-defined]
        return memoized

    def _landed(self, key: str, flight: _Flight, _: object) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]

    def _stored(self, key: str) -> bytes | None:
        """The encoded value of `key` in this process's mirror, if live."""
        medium = self.ipc.medium
        if not medium.mirror_current:
            return None
        entry = medium.mirror.lookup(self.name, key)
        if entry is None or not entry.live(time.time()):
            return None
        return entry.data

    async def _settled(self, key: str) -> bytes | None:
        """The encoded value of `key` as the shared medium has it now: with every
        write acknowledged before this call (on Redis read from Redis, whose
        mirror may lag; on the directory, the log read up to now first)."""
        backend = await self.ipc.medium.started_backend()
        if backend.locks().leased:
            rec = await backend.fetch(self.name, encode_key(key))
            if rec is None or rec.kind is not Kind.CACHE_SET:
                return None
            return rec.data if not rec.expires or rec.expires > time.time() else None
        await backend.catch_up()
        return self._stored(key)

    async def _single_flight(
        self, key: str, compute: Callable[[], Awaitable[bytes]], lease: float
    ) -> bytes:
        """Compute `key` under its lock, or wait for the holder's result in the cache."""
        backend = await self.ipc.medium.started_backend()
        digest = hashlib.sha256(f"{self.name}\0{key}".encode()).hexdigest()[:40]
        contender = backend.locks().contender(f"m.{digest}", lease=lease)
        guard = CancelGuard()  # every caller gone: a wait must not swallow that
        try:
            while True:
                if await contender.try_acquire():
                    # A holder before us may have finished just now: its write was
                    # stored before its release, whether or not we have read it yet.
                    data = await self._settled(key)
                    return data if data is not None else await compute()
                await contender.wait(_MEMO_POLL)
                guard.check()
                data = self._stored(key)
                if data is not None:
                    return data
        finally:
            release = asyncio.ensure_future(contender.release(discard=True))
            try:
                await asyncio.shield(release)
            except asyncio.CancelledError:
                await release
                raise


class _Flight:
    """One computation of a memoized key in this process, in a task of its own,
    shared by every concurrent caller: a caller that is cancelled (its client went
    away) takes only itself away; the computation is cancelled when its last
    caller has gone."""

    __slots__ = ("callers", "task")

    def __init__(self, task: asyncio.Task[bytes]) -> None:
        self.task = task
        self.callers = 0

    def joinable(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Still running for callers of `loop` (not being cancelled)."""
        return self.task.get_loop() is loop and not self.task.done() and self.callers > 0

    async def join(self) -> bytes:
        self.callers += 1
        try:
            return await asyncio.shield(self.task)
        finally:
            self.callers -= 1
            if not self.callers and not self.task.done():
                self.task.cancel()  # nobody waits for it any more


def _memo_key(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The cache key of a memoized call (as `memoized` makes it)."""
    try:
        return f"{name}:" + json.dumps(
            [args, kwargs], sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
    except (TypeError, ValueError) as exc:
        raise TypeError(f"memoized arguments must be JSON-encodable: {exc}") from exc


class Memoized(Protocol[P, R_co]):
    """What `AsyncCache.memoize` returns: the function, async, with its signature
    and result type kept for type checkers, and two helpers.

    `key(*args, **kwargs)` is the cache key of a call; `await
    invalidate(*args, **kwargs)` deletes its cached result everywhere (returns
    whether it was present here). A computation of those arguments under way
    meanwhile still stores its result when it ends.

    Example:
        >>> import asyncio, tempfile
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         cache = AsyncCache(ipc)
        ...         @cache.memoize("price", ttl=60)
        ...         async def price(item: str, *, currency: str = "EUR") -> float:
        ...             return 9.5
        ...         await price("pear")
        ...         key = price.key("pear")
        ...         return key, await cache.has(key), await price.invalidate("pear")
        >>> asyncio.run(main())
        ('price:[["pear"],{}]', True, True)
    """

    cache_name: str

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R_co]: ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The cache key of the call with these arguments.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         square = AsyncCache(ipc).memoize("square", lambda x: x * x, 60)
            ...         return square.key(3)
            >>> asyncio.run(main())
            'square:[[3],{}]'
        """
        ...

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the cached result of the call with these arguments, everywhere.

        Example:
            >>> import asyncio, tempfile
            >>> async def main():
            ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
            ...         square = AsyncCache(ipc).memoize("square", lambda x: x * x, 60)
            ...         await square(3)
            ...         return await square.invalidate(3), await square.invalidate(3)
            >>> asyncio.run(main())
            (True, False)
        """
        ...


class MemoizeDecorator(Protocol):
    """What `memoize(name=..., ttl=...)` returns: a decorator keeping the types.

    Example:
        >>> import asyncio, tempfile
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         decorate = AsyncCache(ipc).memoize(ttl=60)  # a MemoizeDecorator
        ...         @decorate
        ...         async def double(x: int) -> int:
        ...             return 2 * x
        ...         return await double(21)
        >>> asyncio.run(main())
        42
    """

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]], /) -> Memoized[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Memoized[P, R]: ...


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _normal(key: CacheKey) -> CacheKey:
    encode_key(key)  # type check
    if type(key) is str or type(key) is int:
        return key
    return str(key) if isinstance(key, str) else int(key)


def _check_ttl(ttl: float | None) -> float:
    if ttl is None:
        return 0.0
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"ttl must be a number of seconds, not {type(ttl).__name__}")
    return float(ttl) if ttl > 0 else 0.0
