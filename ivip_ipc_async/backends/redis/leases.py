"""Locks of the Redis backend: leases, renewed while held, with fencing tokens.

Keys of a lock `<name>` in namespace `ns` (the `{ns}` hash tag keeps them in
one cluster slot):

    ivip:{ns}:lk:<name>      the lease: a random token, `SET NX PX <lease>`
    ivip:{ns}:lk:<name>:n    the holder's note, with the same expiry
    ivip:{ns}:lk-fence       the namespace's fencing counter (`INCR`, raised to
                             the server's clock in microseconds; expires
                             `state_ttl` after the last holding)
    ivip:{ns}:lk:<name>      also the channel a release is published on

Taking the lock is one script: `SET NX PX`, then `INCR` of the counter for the
fencing token, raised to the server's `TIME` in microseconds when that is
larger (so every later holding of any lock of the namespace has a larger one,
even after the counter expired or was lost). While held, a task renews the
lease every third of its length with a compare-and-`PEXPIRE` script;
releasing is a compare-and-delete script that publishes on the lock's
channel, so waiters try again at once. A holder
that is killed, paused (`SIGSTOP`, a long GC, a VM migration) or cut off
stops renewing, and its lease expires after at most `lease` seconds: then
another process takes the lock. The paused holder, resumed, reads
`held == False` at once (its local deadline, renewal time + lease, has
passed), and a store it writes to can refuse its now smaller fencing token.

Waiters subscribe to the lock's channel on one pub/sub connection per
provider, and sleep no longer than the lease's remaining time (what `PTTL`
said at their last try), so a lease that expires wakes them too.

Connections, bounded by design: the commands go over `COMMAND_CONNECTIONS`
(2) connections of their own (role `l` in `CLIENT LIST`), each lent to one
command at a time (renewals and releases first: they keep a lease, or free
it for the others); the notices over one more (role `n`), opened by the
first waiter and replaced, never added to, when it is lost. However many
tasks use locks at once, an instance holds at most these 3 for its locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import secrets
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

from ... import fault_points, forks
from ...errors import BackendUnavailableError, IPCClosedError, IPCError
from ...logs import logger, rate_limited
from ...waiting import cancel_and_wait, wait_event
from ..base import check_lock_name, check_lock_note

__all__ = ["COMMAND_CONNECTIONS", "RedisLeases"]

_T = TypeVar("_T")
_KEEP_SUBSCRIBED: Final = 256  # lock channels kept subscribed with nobody waiting
COMMAND_CONNECTIONS: Final = 2  # the lock commands' connections per instance (role `l`)

# KEYS: lease, note, fence counter. ARGV: token, lease ms, note, counter ttl ms.
# Returns {fence, 0} when taken, {0, pttl} when held by another.
# The fence is the counter + 1, raised to the server's clock in microseconds
# (TIME) when that is larger: so the counter may expire (`state_ttl` after the
# last holding) or be lost (FLUSHALL, a failover to a replica that lagged) and
# the next token is still larger than every earlier one, as long as the
# server's clock did not go back by more than the time since. A user not
# allowed TIME gets the plain counter, kept without expiry (PERSIST).
_ACQUIRE: Final = """
-- Redis 3.2-6 may replicate scripts verbatim, and then refuse writes after TIME.
if redis.replicate_commands then redis.replicate_commands() end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fence = redis.call('INCR', KEYS[3])
  local now = redis.pcall('TIME')
  if type(now) == 'table' and now[1] then
    local us = tonumber(now[1]) * 1000000 + tonumber(now[2])
    if fence < us then
      redis.call('SET', KEYS[3], string.format('%.0f', us))
      fence = us
    end
    redis.call('PEXPIRE', KEYS[3], ARGV[4])
  else
    redis.call('PERSIST', KEYS[3])
  end
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
  return {fence, 0}
end
return {0, redis.call('PTTL', KEYS[1])}
"""

# KEYS: lease, note. ARGV: token, lease ms. 1: renewed; 0: not ours any more.
_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease, note. ARGV: token, note. 1: set (and published); 0: not ours.
_NOTE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
    redis.call('PUBLISH', KEYS[1], 'note')
    return 1
  end
end
return 0
"""

# KEYS: lease, note. ARGV: token. 1: released (and published); 0: not ours.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('PUBLISH', KEYS[1], 'free')
  return 1
end
return 0
"""

_SHA: Final = {
    name: hashlib.sha1(script.encode()).hexdigest()
    for name, script in (
        ("acquire", _ACQUIRE),
        ("renew", _RENEW),
        ("note", _NOTE),
        ("release", _RELEASE),
    )
}
_SCRIPT: Final = {"acquire": _ACQUIRE, "renew": _RENEW, "note": _NOTE, "release": _RELEASE}


class _Lender:
    """A fixed number of single-connection clients, each lent to one command at a
    time: the lock commands never hold more connections than that, however many
    run at once (the others wait their turn, urgent ones first)."""

    def __init__(self, make: Callable[[], Any], size: int) -> None:
        self._make = make
        self._size = size
        self.clients: list[Any] = []  # every client made (at most `size`)
        self._free: list[Any] = []
        self._urgent: deque[asyncio.Future[Any]] = deque()
        self._normal: deque[asyncio.Future[Any]] = deque()

    def borrow_now(self) -> Any:
        """A client at once if one is free (or may still be made), else None."""
        if self._free:
            return self._free.pop()
        if len(self.clients) < self._size:
            client = self._make()
            self.clients.append(client)
            return client
        return None

    async def borrow(self, *, urgent: bool) -> Any:
        """A client for one command, waiting for one if need be; give it back
        with `give_back`."""
        client = self.borrow_now()
        if client is not None:
            return client
        turn: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        queue = self._urgent if urgent else self._normal
        queue.append(turn)
        try:
            return await turn
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.give_back(turn.result())  # handed over as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    queue.remove(turn)
            raise

    def give_back(self, client: Any) -> None:
        """The command is over: the next one waiting gets `client`."""
        for queue in (self._urgent, self._normal):
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    turn.set_result(client)
                    return
        self._free.append(client)

    def drop(self, *, wake: bool = True) -> list[Any]:
        """Forget every client (to be closed by the caller), and wake the waiters
        (they find the provider closed) unless their loop is gone (`wake` False)."""
        clients, self.clients, self._free = self.clients, [], []
        for queue in (self._urgent, self._normal):
            while queue:
                turn = queue.popleft()
                if wake and not turn.done():
                    turn.set_exception(IPCClosedError("the backend of these locks is closed"))
        return clients


class RedisLeases:
    """The `LockProvider` of a Redis namespace: leases with fencing tokens.

    Args:
        make_client: Makes a redis-py asyncio client for a role (`decode_responses`
            off): `"l"` one for the lock commands (a single connection, see
            `COMMAND_CONNECTIONS`), `"n"` the one subscribed to release notices.
        namespace: The namespace's name, as in its other keys.
        command_timeout: Seconds one attempt of a lock command may take.
        retry_timeout: Seconds a lock command keeps retrying a lost connection
            (a restart, a failover) before it raises `BackendUnavailableError`.
        url: The server's URL, for error messages (its password is not shown).
        state_ttl: Seconds the fencing counter lives after the last holding.
    """

    leased = True

    def __init__(
        self,
        make_client: Callable[[str], Any],
        namespace: str,
        *,
        command_timeout: float = 5.0,
        retry_timeout: float = 10.0,
        url: str = "redis://",
        state_ttl: float = 3600.0,
    ) -> None:
        self._make_client = make_client
        self.retry_timeout = retry_timeout
        self.url = url
        self.prefix = f"ivip:{{{namespace}}}:lk:"
        self.fence_key = f"ivip:{{{namespace}}}:lk-fence"
        self.command_timeout = command_timeout
        self.state_ttl = state_ttl
        self._lender = _Lender(lambda: make_client("l"), COMMAND_CONNECTIONS)
        self._notices_client: Any = None  # role `n`: its pool serves the one pub/sub
        self._pubsub: Any = None
        # One (un)subscription at a time: redis-py's PubSub takes a connection on
        # its first command, and two at once took two (a second `n`, leaked).
        self._subscribing = asyncio.Lock()
        self._down = False  # the notices' connection was lost, not yet back
        self._subscribe_error: BaseException | None = None  # the last subscription's
        self._listener: asyncio.Task[None] | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._subscribed: set[str] = set()
        self.notices: dict[str, int] = {}  # release notices received, per subscribed key
        self._contenders: weakref.WeakSet[_LeaseContender] = weakref.WeakSet()
        self._closed = False
        self._background: set[asyncio.Task[None]] = set()

    def contender(self, name: str, *, lease: float) -> _LeaseContender:
        """One attempt at lock `name`, with a lease of `lease` seconds."""
        if not lease > 0:
            raise ValueError("lease must be above 0 seconds")
        contender = _LeaseContender(self, check_lock_name(name), lease)
        self._contenders.add(contender)
        return contender

    # -- commands ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise IPCClosedError("the backend of these locks is closed")

    def _notices(self) -> Any:
        """The client whose one connection carries the notices' subscription."""
        self._check_open()
        if self._notices_client is None:
            self._notices_client = self._make_client("n")
        return self._notices_client

    @property
    def notices_connected(self) -> bool:
        """False while release notices are down for a waiter: its channel not
        subscribed, or the connection lost, until subscribed again (meanwhile
        waiters wake by their timers only). True when nobody waits."""
        if not self._waiters:
            return True
        return not self._down and self._waiters.keys() <= self._subscribed

    async def run(
        self,
        script: str,
        keys: list[str],
        args: list[Any],
        *,
        retry: bool = True,
        urgent: bool = False,
    ) -> Any:
        """Run one of the scripts (EVALSHA, loading it on NOSCRIPT), each attempt
        with a deadline; retried through lost connections for `retry_timeout`
        seconds (once only when not `retry`). `urgent` (renewals, releases): ahead
        of the other commands waiting for a connection."""

        async def once(client: Any) -> Any:
            return await self._script(client, script, keys, args)

        return await self._retrying(f"lock command ({script})", once, retry=retry, urgent=urgent)

    async def _script(self, client: Any, script: str, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import NoScriptError

        try:
            return await client.evalsha(_SHA[script], len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(_SCRIPT[script], len(keys), *keys, *args)

    async def acquire(
        self, key: str, note_key: str, ms: int, note: str
    ) -> tuple[bytes, int, int, float]:
        """Try to take lease `key` for `ms` milliseconds: (token, fence, pttl, loop
        time sent). Fence 0: another holds it, for `pttl` ms more. Retried like
        `run`, each attempt with a new token: an attempt whose answer was lost may
        have taken the lease, so it is released in the background."""
        loop = asyncio.get_running_loop()
        token, sent = b"", 0.0

        async def once(client: Any) -> Any:
            nonlocal token, sent
            if token:
                self.release_later(key, note_key, token)
            token, sent = secrets.token_hex(16).encode(), loop.time()
            keys = [key, note_key, self.fence_key]
            ttl = max(1, int(self.state_ttl * 1000))
            return await self._script(client, "acquire", keys, [token, ms, note, ttl])

        try:
            fence, pttl = await self._retrying("lock command (acquire)", once)
        except BaseException:
            # Cancelled or cut off after sending: the lease may be ours, unknown to us.
            if token:
                self.release_later(key, note_key, token)
            raise
        return token, int(fence), int(pttl), sent

    async def get(self, key: str) -> bytes | None:
        async def once(client: Any) -> bytes | None:
            value: bytes | None = await client.get(key)
            return value

        return await self._retrying("lock read", once)

    async def _retrying(
        self,
        what: str,
        attempt: Callable[[Any], Awaitable[_T]],
        *,
        retry: bool = True,
        urgent: bool = False,
    ) -> _T:
        """`attempt(client)` on a client lent for it, within `command_timeout`
        seconds (the wait for a client not counted), again after a lost
        connection or no answer (Redis restarting, a failover) for up to
        `retry_timeout` seconds; redis-py's errors raised as the library's."""
        from .connections import redacted, retryable, wrap
        from .endpoints import failover_pause

        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.retry_timeout if retry else 0.0)
        delay = 0.05
        while True:
            self._check_open()
            # The wait for a connection counts in the deadline (plus one attempt's
            # time: that of the command before it): a server that answers nothing
            # fails every command in time, however many wait their turn.
            wait = max(deadline - loop.time(), 0.0) + self.command_timeout
            try:
                client = self._lender.borrow_now()
                if client is None:
                    async with asyncio.timeout(wait):
                        client = await self._lender.borrow(urgent=urgent)
            except TimeoutError:
                raise BackendUnavailableError(
                    f"Redis at {redacted(self.url)} did not answer the lock commands "
                    f"before this {what} for {wait:g} s (nothing sent)"
                ) from None
            try:
                async with asyncio.timeout(self.command_timeout):
                    return await attempt(client)
            except TimeoutError as exc:  # (asyncio's: not the caller's own timeout)
                error: Exception = exc
                error.args = error.args or (f"no answer in {self.command_timeout:g} s",)
            except IPCError:
                raise
            except Exception as exc:
                if not retryable(exc):
                    raise wrap(exc, f"a {what}", self.url) from exc
                error = exc
            finally:
                self._lender.give_back(client)
            if loop.time() + delay > deadline:
                raise BackendUnavailableError(
                    f"Redis at {redacted(self.url)} did not answer for "
                    f"{self.retry_timeout if retry else self.command_timeout:g} s "
                    f"({what}): {error}"
                ) from error
            rate_limited(
                logging.WARNING,
                ("redis-lock-retry", self.prefix),
                "Redis %s failed (%s); retrying for up to %gs",
                what,
                error,
                self.retry_timeout,
                interval=5.0,
            )
            await asyncio.sleep(failover_pause(delay, error) * (1 + random.random() / 2))
            delay = min(delay * 2, 1.0)

    def release_later(self, key: str, note_key: str, token: bytes) -> None:
        """Compare-and-delete in the background (a try whose answer was not read)."""
        self.background(self.run("release", [key, note_key], [token], urgent=True))

    def background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` in a task of its own, errors ignored; `close` waits for it."""

        async def quietly() -> None:
            with contextlib.suppress(Exception):
                await work

        try:
            task = asyncio.get_running_loop().create_task(quietly())
        except RuntimeError:
            work.close()
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- wake-ups ----------------------------------------------------------------------

    async def watch(self, key: str, wake: asyncio.Event) -> bool:
        """Set `wake` whenever `key` is released (published on its channel).

        True when the channel was subscribed just now (a release before that
        was not seen: the caller tries again at once). A subscription that fails
        raises, and the notices' task subscribes again later.
        """
        self._waiters.setdefault(key, set()).add(wake)
        if key in self._subscribed:
            return False
        self._subscribed.add(key)
        try:
            async with asyncio.timeout(self.command_timeout), self._subscribing:
                if self._pubsub is None:
                    self._pubsub = self._notices().pubsub(ignore_subscribe_messages=True)
                await self._pubsub.subscribe(key)
        except BaseException:
            self._subscribed.discard(key)  # (the notices' task sees it missing)
            raise
        finally:
            if not self._closed and (self._listener is None or self._listener.done()):
                self._listener = asyncio.get_running_loop().create_task(
                    self._listen(), name="ivip-ipc-lock-listener"
                )
        return True

    def unwatch(self, key: str, wake: asyncio.Event) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.discard(wake)
            if not waiters:
                del self._waiters[key]
        # Channels stay subscribed while few (subscribing again for every wait
        # would cost a round trip); past _KEEP_SUBSCRIBED (say, memoize over many
        # keys), those nobody waits on are dropped.
        if key not in self._waiters and len(self._subscribed) > _KEEP_SUBSCRIBED:
            self._subscribed.discard(key)
            self.notices.pop(key, None)
            if self._pubsub is not None and not self._closed:
                self.background(self._unsubscribe(self._pubsub, key))

    async def _unsubscribe(self, pubsub: Any, key: str) -> None:
        async with self._subscribing:
            await pubsub.unsubscribe(key)

    async def _listen(self) -> None:
        failures = 0  # in a row: the pause before subscribing again grows
        while not self._closed:
            pubsub = self._pubsub  # (a new one after each lost connection)
            if pubsub is None and not self._waiters:
                return
            if pubsub is None or not self._waiters.keys() <= self._subscribed:
                # A subscription that failed (refused, or its connection lost
                # while subscribing): waiters without notices.
                self._down = True
                failures += 1
                if not await self._resubscribe(failures, self._subscribe_error):
                    return
                continue
            try:
                message = await pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A lost subscription: the waiters' timers still wake them.
                self._down = True
                rate_limited(logging.WARNING, "lock-listener", "lock notices interrupted: %s", exc)
                failures += 1
                if not await self._resubscribe(failures, exc):
                    return  # nobody waits: the next `watch` subscribes anew
                continue
            # Read from a subscribed connection (a message, a subscription's
            # confirmation, or a second of silence): the notices work.
            failures, self._down = 0, False
            if message is None or message.get("type") != "message":
                continue
            channel = message.get("channel")
            key = str(channel.decode(errors="replace") if isinstance(channel, bytes) else channel)
            if key in self._subscribed:
                # Counted even with nobody waiting: a contender whose try crossed
                # this notice on the wire sees the count move, and tries again.
                self.notices[key] = self.notices.get(key, 0) + 1
            for wake in list(self._waiters.get(key, ())):
                wake.set()

    async def _resubscribe(self, failures: int, error: BaseException | None) -> bool:
        """A new pub/sub connection in place of the old one, subscribed to the
        channels waited on (after a pause growing from 0.1 s to 5 s with failures
        in a row; at most 0.2 s while `error` says the Sentinels know no master).
        False when nobody waits (then no connection is made)."""
        from .endpoints import failover_pause

        pause = min(0.1 * 2 ** min(failures - 1, 6), 5.0)
        await asyncio.sleep(pause if error is None else failover_pause(pause, error))
        self._subscribe_error = None
        async with self._subscribing:  # (no `watch` makes a second one meanwhile)
            old, self._pubsub = self._pubsub, None
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.aclose()
            keys = set(self._waiters)
            self._subscribed = set(keys)
            if self._closed or not keys:
                self._subscribed = set()
                self._down = False
                return False
            try:
                self._pubsub = self._notices().pubsub(ignore_subscribe_messages=True)
                async with asyncio.timeout(self.command_timeout):
                    await self._pubsub.subscribe(*keys)
            except Exception as exc:
                self._subscribed = set()  # (tried again after the next pause)
                self._subscribe_error = exc
                logger.debug("could not subscribe to lock releases again: %s", exc)
        for waiters in self._waiters.values():
            for wake in waiters:
                wake.set()  # something may have been released meanwhile
        return True

    # -- life ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Release every lease held here, then close the connections."""
        # Bounded: with Redis gone, the leases expire by themselves anyway.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.command_timeout):
                for contender in list(self._contenders):
                    with contextlib.suppress(Exception):
                        await contender.release()
                if self._background:
                    await asyncio.gather(*self._background, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        self._shut()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        pubsub, self._pubsub = self._pubsub, None
        clients = self._lender.drop()
        notices, self._notices_client = self._notices_client, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        for client in [*clients, notices]:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    def abandon(self) -> None:
        """The loop is gone: stop renewing; the leases expire by themselves."""
        self._shut()
        for contender in list(self._contenders):
            contender._forget()
        if self._listener is not None and not self._listener.get_loop().is_closed():
            self._listener.cancel()
        self._lender.drop(wake=False)
        self._listener = self._pubsub = self._notices_client = None

    def _shut(self) -> None:
        self._closed = True
        for waiters in self._waiters.values():
            for wake in waiters:
                wake.set()


class _LeaseContender:
    """One attempt at one lease (see `Contender` in backends/base.py)."""

    def __init__(self, provider: RedisLeases, name: str, lease: float) -> None:
        self._provider = provider
        self.name = name
        self.lease = lease
        self.key = provider.prefix + name
        self.note_key = self.key + ":n"
        self.fence = 0
        self._token = b""
        self._deadline = 0.0  # loop time the lease ends at, unless renewed
        self._lost = True
        self._renewer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry_in = lease  # the lease's remaining time at the last failed try
        self._wake: asyncio.Event | None = None
        self._notices = 0  # the provider's count of release notices at the last try

    def __repr__(self) -> str:
        return f"<lease {self.name!r} {'held' if self.held else 'free'} fence={self.fence}>"

    @property
    def held(self) -> bool:
        loop = self._loop
        return not self._lost and loop is not None and loop.time() < self._deadline

    async def try_acquire(self, note: str = "") -> bool:
        if self.held:
            return True
        check_lock_note(note)
        await self._stop_renewing()
        loop = asyncio.get_running_loop()
        self._notices = self._provider.notices.get(self.key, 0)
        ms = max(1, int(self.lease * 1000))
        token, fence, pttl, sent = await self._provider.acquire(self.key, self.note_key, ms, note)
        if not fence:
            self._retry_in = pttl / 1000 if pttl > 0 else 0.01
            return False
        if loop.time() - sent > self.lease / 3:
            # A late answer (a frozen server resuming): Redis started the lease when
            # it ran the script, anywhere since `sent`. Renew it now from a known
            # time, or let go: a lock returned is held.
            sent = loop.time()
            try:
                renewed = await self._provider.run(
                    "renew", [self.key, self.note_key], [token, ms], retry=False, urgent=True
                )
            except Exception:
                renewed = False
            except BaseException:
                self._provider.release_later(self.key, self.note_key, token)
                raise
            if not renewed:
                self._provider.release_later(self.key, self.note_key, token)
                self._retry_in = 0.01
                return False
        self._token, self.fence = token, int(fence)
        self._loop, self._deadline, self._lost = loop, sent + self.lease, False
        forks.forget_in_child(self, _LeaseContender._forget)  # a forked child holds none
        self._renewer = loop.create_task(self._renew(), name=f"ivip-ipc-lease:{self.name}")
        return True

    async def _renew(self) -> None:
        loop = asyncio.get_running_loop()
        ms = max(1, int(self.lease * 1000))
        try:
            while not self._lost:
                await asyncio.sleep(self.lease / 3)
                if fault_points.ACTIVE:
                    await fault_points.pause("lease_renew")
                sent = loop.time()
                try:
                    renewed = await self._provider.run(
                        "renew",
                        [self.key, self.note_key],
                        [self._token, ms],
                        retry=False,
                        urgent=True,
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # retried until the deadline passes
                    logger.warning("could not renew the lease of lock %r: %s", self.name, exc)
                    if loop.time() >= self._deadline:
                        self._lost = True
                    continue
                if renewed:
                    self._deadline = sent + self.lease
                else:
                    self._lost = True
                    logger.warning(
                        "the lease of lock %r expired before it was renewed: lost", self.name
                    )
        except asyncio.CancelledError:
            # The loop is shutting down (asyncio.run) while the lock is held: let go.
            if not self._lost and self._token:
                self._lost = True
                with contextlib.suppress(Exception):
                    await self._provider.run(
                        "release",
                        [self.key, self.note_key],
                        [self._token],
                        retry=False,
                        urgent=True,
                    )
            raise

    async def _stop_renewing(self) -> None:
        task, self._renewer = self._renewer, None
        if task is not None and not task.done() and task is not asyncio.current_task():
            await cancel_and_wait(task)  # the caller's own cancellation still propagates

    async def wait(self, timeout: float) -> None:
        wake = self._wake
        if wake is None:
            wake = self._wake = asyncio.Event()
            try:
                if await self._provider.watch(self.key, wake):
                    return  # subscribed just now: a release before it went unseen
            except Exception as exc:  # no notices: the timer still wakes us
                logger.debug("cannot watch lock %r: %s", self.name, exc)
        if self._provider.notices.get(self.key, 0) != self._notices:
            return  # released while our last try was on the wire
        delay = min(timeout, self._retry_in + 0.001)
        await wait_event(wake, delay)  # never swallows the caller's cancellation
        wake.clear()

    async def holder_note(self) -> str | None:
        raw = await self._provider.get(self.note_key)
        return None if raw is None else raw.decode(errors="replace")

    async def set_note(self, note: str) -> None:
        check_lock_note(note)
        if self.held:
            await self._provider.run("note", [self.key, self.note_key], [self._token, note])

    async def verify(self) -> bool:
        if not self._token or self._lost:
            return False
        ours = await self._provider.get(self.key) == self._token
        if not ours:
            self._lost = True
        return ours

    async def release(self, *, discard: bool = False) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            self._provider.unwatch(self.key, wake)
        was_ours = not self._lost and bool(self._token)
        self._lost = True
        forks.discard(self)
        await self._stop_renewing()
        if was_ours:
            # Compare-and-delete: a lease that expired and was taken meanwhile is left alone.
            await self._provider.run(
                "release", [self.key, self.note_key], [self._token], urgent=True
            )

    def _forget(self) -> None:
        """In a forked child, or with the loop gone: hold nothing, renew nothing."""
        self._lost = True  # a renewal task still scheduled stops at its next turn
        self._renewer = self._wake = None
