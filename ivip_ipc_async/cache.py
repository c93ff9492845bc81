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
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Generic, ParamSpec, TypeVar, overload

from .ipc import AsyncIPC, _fork_generation
from .logs import logger
from .mirror import NO_ENTRIES, SHARDS, new_shards
from .records import CacheKey, Kind, Record, encode_key
from .waiting import CancelGuard

__all__ = ["AsyncCache"]


P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
V = TypeVar("V")

_IMMUTABLE: Final = frozenset({str, int, float, bool, type(None)})
_MISSING: Final[Any] = object()
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
            from . import IPC

            ipc = IPC
        if not isinstance(name, str) or not name:
            raise TypeError("cache name must be a non-empty str")
        if len(name.encode()) > 0xFFFF:
            raise ValueError("cache name too long")
        self.ipc = ipc
        self.name = name
        self.default_ttl = _check_ttl(default_ttl)
        self._inflight: dict[str, _Flight] = {}

    def __repr__(self) -> str:
        return f"<AsyncCache {self.name!r} default_ttl={self.default_ttl}>"

    # -- writes ---------------------------------------------------------------------

    async def set(self, key: CacheKey, value: V, ttl: float | None = None) -> None:
        """Store `value` under `key` for `ttl` seconds, in every process.

        `ttl` None uses `default_ttl`; 0 or negative means no expiry. When this
        returns, the write is in the shared directory and visible here.

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
        self.ipc._check_size(len(self.name.encode()) + len(raw_key), len(data))
        await self._write(Kind.CACHE_SET, raw_key, data, seconds)

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

    async def _write(self, kind: Kind, raw_key: bytes, data: bytes, ttl: float) -> None:
        ipc = self.ipc
        backend = await ipc._ensure()
        expires = time.time() + ttl if ttl > 0 else 0.0
        record = Record(
            kind,
            self.name,
            raw_key,
            data,
            ipc.clock.tick(),
            backend.node,
            expires,
            0,
            ipc.codec.id,
        )
        await ipc._write_cache(record)

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
        ipc = self.ipc
        # AsyncIPC._ready(), inlined: this is the hot path.
        if (
            ipc._backend is None
            or ipc._loop is not _running_loop()
            or ipc._pid != _fork_generation[0]
        ):
            await ipc._ensure()
        kt = type(key)
        if kt is not str and kt is not int:
            encode_key(key)  # raises the TypeError, or normalises a subclass
            key = str(key) if isinstance(key, str) else int(key)
        if not ipc._mirror_ready:
            return await self._get_from_backend(key, default)
        mirror = ipc.mirror
        shard = hash(key) % SHARDS
        decoded = mirror.decoded.get(self.name)
        if decoded is not None:
            # Kept current by the mirror (dropped when its key changes).
            memo = decoded[shard].get(key)
            if memo is not None:
                until, value, copier = memo
                if until and until <= time.time():
                    return default
                return value if copier is None else copier(value)
        shards = mirror.caches.get(self.name)
        if shards is None:
            return default
        state = shards[shard].get(key)
        if state is None:
            return default
        until = state[0]  # mirror.UNTIL
        if until and (until < 0 or until <= time.time()):
            return default
        data = state[1]  # mirror.DATA
        try:
            value = ipc.codec.loads(data)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            logger.error(
                "the value of key %r in cache %r cannot be decoded; treated as missing",
                key,
                self.name,
                exc_info=True,
            )
            return default
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
        if decoded is None:
            decoded = mirror.decoded[self.name] = new_shards()
        memos = decoded[shard]
        if memos is NO_ENTRIES:
            memos = decoded[shard] = {}
        memos[key] = (until, value, copier)
        return value if copier is None else copier(value)

    async def _get_from_backend(self, key: CacheKey, default: Any) -> Any:
        """Read one key from the shared medium while the mirror may be stale."""
        backend = await self.ipc._ensure()
        rec = await backend.fetch(self.name, encode_key(key))
        if rec is None or rec.kind is not Kind.CACHE_SET:
            return default
        if rec.expires and rec.expires <= time.time():
            return default
        try:
            return self.ipc.codec.loads(rec.data)
        except ValueError:
            logger.error("the value of key %r in cache %r cannot be decoded", key, self.name)
            return default

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
        await self.ipc._ensure()
        if not self.ipc._mirror_ready:
            return await self._get_from_backend(key, _MISSING) is not _MISSING
        entry = self.ipc.mirror.lookup(self.name, _normal(key))
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
        await self.ipc._ensure()
        if not self.ipc._mirror_ready:
            await self.ipc._wait_mirror()
        return self.ipc.mirror.live_keys(self.name)

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
        await self.ipc._ensure()
        return self.ipc.mirror.expire(self.name)

    def __len__(self) -> int:
        """Keys present and not expired in this process's mirror (0 before start).

        Raises `BackendUnavailableError` while the mirror is being reloaded
        (Redis reconnecting), where it would count nothing.
        """
        if not self.ipc._mirror_ready:
            raise self.ipc._mirror_unavailable()
        return len(self.ipc.mirror.live_keys(self.name))

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
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def memoize(
        self,
        name: str,
        fn: Callable[P, R],
        ttl: float | None = ...,
        *,
        across_processes: bool = ...,
        lease: float = ...,
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def memoize(
        self,
        name: str | None = ...,
        *,
        ttl: float | None = ...,
        across_processes: bool = ...,
        lease: float = ...,
    ) -> Callable[[Callable[P, Any]], Callable[P, Coroutine[Any, Any, Any]]]: ...

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

        def decorate(func: Callable[P, Any]) -> Callable[P, Coroutine[Any, Any, Any]]:
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
            try:
                key = f"{name}:" + json.dumps(
                    [args, kwargs], sort_keys=True, separators=(",", ":"), ensure_ascii=False
                )
            except (TypeError, ValueError) as exc:
                raise TypeError(f"memoized arguments must be JSON-encodable: {exc}") from exc
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
                    self.ipc._check_size(len(self.name.encode()) + len(raw_key), len(data))
                    await self._write(Kind.CACHE_SET, raw_key, data, seconds)
                    return data

                work = self._single_flight(key, compute, lease) if across_processes else compute()
                flight = self._inflight[key] = _Flight(
                    loop.create_task(work, name=f"ivip-memoize:{name}")
                )
                flight.task.add_done_callback(functools.partial(self._landed, key, flight))
            return codec.loads(await flight.join())

        memoized.cache_name = name  # type: ignore[attr-defined]
        return memoized

    def _landed(self, key: str, flight: _Flight, _: object) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]

    def _stored(self, key: str) -> bytes | None:
        """The encoded value of `key` in this process's mirror, if live."""
        if not self.ipc._mirror_ready:
            return None
        entry = self.ipc.mirror.lookup(self.name, key)
        if entry is None or not entry.live(time.time()):
            return None
        return entry.data

    async def _settled(self, key: str) -> bytes | None:
        """The encoded value of `key` as the shared medium has it now: with every
        write acknowledged before this call (on Redis read from Redis, whose
        mirror may lag; on the directory, the log read up to now first)."""
        backend = await self.ipc._ensure()
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
        backend = await self.ipc._ensure()
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
