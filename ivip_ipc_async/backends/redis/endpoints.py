"""Where the Redis server is: a URL made into redis-py clients.

- `redis://`, `rediss://`, `unix://`: that server (as `Redis.from_url`).
- `redis+sentinel://[[user]:password@]host:port[,host:port…]/service[/db]`:
  the master of `service`, as the Sentinels at those addresses name it (port
  26379 by default). The user and password are the master's (as in
  `redis://`); `?sentinel_username=` and `?sentinel_password=` give the
  Sentinels' own when they differ; other query options are as for `redis://`.
  `rediss+sentinel://` speaks TLS to the Sentinels and to the master, both
  verified with the same `ssl_*` options (`?ssl_ca_certs=/path/ca.pem`).
  Every connection asks the Sentinels where the master is when it (re)connects,
  and one that finds itself on a demoted master (`READONLY`) reconnects: a
  failover is a lost connection like any other, retried by the callers.
- A Redis Cluster, reached through any node's `redis://` or `rediss://` URL:
  every key of a namespace has its `{ns}` hash tag, so they all live in one
  slot, and every connection goes to the master that owns it (found with
  `CLUSTER SLOTS` at start). A `MOVED` reply (a resharding, a failover) points
  the namespace's connections at the new owner; `ASK`, `TRYAGAIN` and
  `CLUSTERDOWN` (a migration or a failover under way) are lost connections,
  retried by the callers; a refused connection asks the other nodes who owns
  the slot now. Pub/sub is cluster-wide, so the subscription may stay anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

__all__ = ["SENTINEL_SCHEMES", "Endpoint", "SentinelTarget", "SlotRoute", "failover_pause"]

SENTINEL_SCHEMES: Final = ("redis+sentinel", "rediss+sentinel")
_SENTINEL_PORT: Final = 26379
# The Sentinels are asked where the master is: an unanswered one is skipped.
_SENTINEL_TIMEOUT: Final = 2.0


@dataclass(frozen=True)
class SentinelTarget:
    """A `redis+sentinel://` or `rediss+sentinel://` (TLS) URL, parsed.

    Example:
        >>> t = SentinelTarget.parse("redis+sentinel://:pw@s1:26380,s2/orders/2")
        >>> t.sentinels, t.service, t.options["db"], t.options["password"], t.tls
        ((('s1', 26380), ('s2', 26379)), 'orders', 2, 'pw', False)
        >>> SentinelTarget.parse("rediss+sentinel://s1/orders?ssl_ca_certs=/ca.pem").tls
        True
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    options: dict[str, Any] = field(default_factory=dict)
    """The master's connection options (credentials, db, query options)."""
    sentinel_options: dict[str, Any] = field(default_factory=dict)
    """The Sentinels' own credentials, when given."""
    tls: bool = False
    """TLS to the Sentinels and to the master (`rediss+sentinel://`)."""

    @classmethod
    def parse(cls, url: str) -> SentinelTarget:
        """Parse `url`; `ValueError` naming what is wrong."""
        from redis.asyncio.connection import parse_url

        parts = urlsplit(url)
        userinfo, at, hosts = parts.netloc.rpartition("@")
        sentinels = []
        for item in hosts.split(","):
            host, port = _host_port(item.strip())
            sentinels.append((host, port))
        path = [unquote(p) for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("no service name (redis+sentinel://host:26379/service)")
        if len(path) > 2:
            raise ValueError(f"too many path parts in {parts.path!r} (/service[/db])")
        if len(path) == 2 and not (path[1].isascii() and path[1].isdigit()):
            raise ValueError(f"the database must be a number, not {path[1]!r}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        sentinel_options = {
            name.removeprefix("sentinel_"): unquote(value)
            for name, value in query
            if name in ("sentinel_username", "sentinel_password")
        }
        rest = urlencode([(n, v) for n, v in query if not n.startswith("sentinel_")])
        db = path[1] if len(path) == 2 else ""
        tls = parts.scheme.lower() == "rediss+sentinel"
        scheme = "rediss" if tls else "redis"
        options: dict[str, Any] = dict(parse_url(f"{scheme}://{userinfo}{at}localhost/{db}?{rest}"))
        for name in ("host", "port", "connection_class"):
            options.pop(name, None)
        return cls(tuple(sentinels), path[0], options, sentinel_options, tls)


_FAILOVER_PAUSE: Final = 0.2


def failover_pause(delay: float, error: BaseException) -> float:
    """The pause before trying again after `error`: `delay` (the caller's
    backoff), but no more than 0.2 s while the Sentinels know no master (a
    failover under way): asking them again costs the master nothing, and the
    new master is then used within 0.2 s of its promotion.

    Example:
        >>> failover_pause(0.8, ConnectionError("refused"))
        0.8
        >>> from redis.asyncio.sentinel import MasterNotFoundError
        >>> failover_pause(0.8, MasterNotFoundError("No master found for 'svc'"))
        0.2
    """
    from redis.asyncio.sentinel import MasterNotFoundError
    from redis.sentinel import MasterNotFoundError as SyncMasterNotFoundError

    seen: BaseException | None = error
    for _ in range(5):  # (redis-py raises it from its own ConnectionError on send)
        if seen is None:
            break
        if isinstance(seen, MasterNotFoundError | SyncMasterNotFoundError):
            return min(delay, _FAILOVER_PAUSE)
        seen = seen.__cause__ or seen.__context__
    return delay


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"no host in {text!r} (host:port)")
    if not port_text:
        return host, _SENTINEL_PORT
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"the port must be a number from 1 to 65535, not {port_text!r}")
    return host, int(port_text)


_SENTINEL_CONNECTION: dict[bool, type] = {}


def _sentinel_connection_class(tls: bool = False) -> type:
    """redis-py's `SentinelManagedConnection` (its TLS one with `tls`), asking where
    the master is on every socket it opens: redis-py 8 reconnects a dropped
    connection when sending, by a path that skips the Sentinel lookup (it went on
    dialling the dead master)."""
    if tls not in _SENTINEL_CONNECTION:
        from redis.asyncio.sentinel import (
            SentinelManagedConnection,
            SentinelManagedSSLConnection,
        )

        base = SentinelManagedSSLConnection if tls else SentinelManagedConnection

        class MasterConnection(base):  # type: ignore[misc,valid-type]
            async def _connect(self) -> None:
                pool = self.connection_pool
                if pool.is_master:
                    self.host, self.port = await pool.get_master_address()
                await super()._connect()

        _SENTINEL_CONNECTION[tls] = MasterConnection
    return _SENTINEL_CONNECTION[tls]


class SlotRoute:
    """Where the namespace's slot is served: the node to connect to, and the
    cluster's other nodes (to ask when that one is gone).

    Example:
        >>> route = SlotRoute(("10.0.0.1", 6379), "orders")
        >>> route.address, route.cluster, 0 <= route.slot < 16384
        (('10.0.0.1', 6379), False, True)
    """

    def __init__(self, address: tuple[str, int], namespace: str) -> None:
        from redis.crc import key_slot

        self.address = address
        self.slot: int = key_slot(f"ivip:{{{namespace}}}:log".encode())  # every key's slot
        self.cluster = False  # known to be a cluster (CLUSTER SLOTS answered)
        self.nodes: list[tuple[str, int]] = [address]
        self.options: dict[str, Any] = {}  # to connect to another node (credentials, TLS)

    def learn(self, slots: Any) -> None:
        """Take `CLUSTER SLOTS`'s answer: the slot's master, and every node."""
        nodes: list[tuple[str, int]] = []
        for start, end, *servers in slots:
            for server in servers:
                node = (_text(server[0]) or self.address[0], int(server[1]))
                if node not in nodes:
                    nodes.append(node)
            if int(start) <= self.slot <= int(end) and servers:
                self.address = (_text(servers[0][0]) or self.address[0], int(servers[0][1]))
        self.cluster = True
        self.nodes = nodes or self.nodes

    async def find_owner(self) -> None:
        """Ask the nodes, one after another, who owns the slot now (a failover)."""
        import redis.asyncio as aioredis

        for host, port in [n for n in self.nodes if n != self.address] + [self.address]:
            options = {**self.options, "socket_timeout": 2.0, "socket_connect_timeout": 2.0}
            client = aioredis.Redis(host=host, port=port, **options)
            try:
                self.learn(await client.execute_command("CLUSTER", "SLOTS"))  # type: ignore[no-untyped-call]
                return
            except Exception:  # that node is down too: ask the next
                continue
            finally:
                await client.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _routed_connection_class(base: type, route: SlotRoute) -> type:
    """`base` (redis-py's `Connection` or `SSLConnection`) connecting where `route`
    says, and following the cluster's redirections (see the module's docstring)."""
    from redis.exceptions import (
        AskError,
        ClusterDownError,
        MovedError,
        TryAgainError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError

    class RoutedConnection(base):  # type: ignore[misc]
        async def _connect(self) -> None:
            self.host, self.port = route.address
            try:
                await super()._connect()
            except OSError:
                if not route.cluster:
                    raise
                await route.find_owner()  # a failover: the slot's master is gone
                self.host, self.port = route.address
                await super()._connect()

        async def read_response(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return await super().read_response(*args, **kwargs)
            except MovedError as exc:
                if int(exc.slot_id) == route.slot:
                    route.address = (str(exc.host), int(exc.port))
                await self.disconnect()
                raise RedisConnectionError(f"the slot moved: {exc}") from exc
            except (AskError, TryAgainError, ClusterDownError) as exc:
                raise RedisConnectionError(f"the cluster is moving the slot: {exc}") from exc

    return RoutedConnection


class Endpoint:
    """Makes the clients of one backend for its URL (one `Sentinel` shared by them).

    Example:
        >>> Endpoint("redis://127.0.0.1:6379/0").sentinel is None
        True
    """

    def __init__(self, url: str, namespace: str = "default") -> None:
        self.url = url
        scheme = url.partition("://")[0].lower()
        self.target = SentinelTarget.parse(url) if scheme in SENTINEL_SCHEMES else None
        self.sentinel: Any = None
        self.route: SlotRoute | None = None
        self._routed: type | None = None
        if scheme in ("redis", "rediss"):
            parts = urlsplit(url)
            self.route = SlotRoute((parts.hostname or "localhost", parts.port or 6379), namespace)

    async def discover(self, client: Any) -> None:
        """Ask the server `client` reaches whether it is a cluster node; if so, point
        the namespace's connections at the master of its slot (`client`'s own too).
        A server that is no cluster, or refuses `CLUSTER SLOTS`, is used as it is."""
        from redis.exceptions import ResponseError

        route = self.route
        if route is None:
            return
        try:
            slots = await client.execute_command("CLUSTER", "SLOTS")
        except ResponseError:  # cluster support disabled, or NOPERM: not followed
            return
        before = route.address
        route.learn(slots)
        if route.address != before:
            await client.connection_pool.disconnect()

    def client(self, options: dict[str, Any]) -> Any:
        """A redis-py asyncio client with `options` (as `Redis.from_url` takes)."""
        import redis.asyncio as aioredis

        target = self.target
        route = self.route
        if route is not None:
            from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection

            if self._routed is None:
                ssl = self.url.lower().startswith("rediss:")
                self._routed = _routed_connection_class(SSLConnection if ssl else Connection, route)
            options = dict(options)
            single = bool(options.pop("single_connection_client", False))
            pool = ConnectionPool.from_url(self.url, connection_class=self._routed, **options)
            # Other nodes are reached with the same credentials and TLS options.
            route.options = {
                k: v
                for k, v in pool.connection_kwargs.items()
                if k in ("username", "password", "credential_provider", "protocol")
                or k.startswith("ssl_")
            }
            if self.url.lower().startswith("rediss:"):
                route.options["ssl"] = True
            client = aioredis.Redis(connection_pool=pool, single_connection_client=single)
            client.auto_close_connection_pool = True
            return client
        if target is None:
            return aioredis.Redis.from_url(self.url, **options)
        from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

        # The URL's options win, as with `Redis.from_url`.
        merged = {**options, **target.options}
        if self.sentinel is None:
            sentinel_options: dict[str, Any] = {
                "socket_timeout": _SENTINEL_TIMEOUT,
                "socket_connect_timeout": _SENTINEL_TIMEOUT,
            }
            if target.tls:  # the Sentinels verified as the master is
                sentinel_options["ssl"] = True
                sentinel_options.update({k: v for k, v in merged.items() if k.startswith("ssl_")})
            self.sentinel = Sentinel(
                target.sentinels, sentinel_kwargs={**sentinel_options, **target.sentinel_options}
            )
        single = bool(merged.pop("single_connection_client", False))
        merged.pop("ssl", None)  # (the connection class says it)
        pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
            target.service,
            self.sentinel,
            is_master=True,
            connection_class=_sentinel_connection_class(target.tls),
            **merged,
        )
        client = aioredis.Redis(connection_pool=pool, single_connection_client=single)
        client.auto_close_connection_pool = True  # closed with the client
        return client

    async def close(self) -> None:
        """Close the Sentinels' connections (the clients are closed by their owners)."""
        sentinel, self.sentinel = self.sentinel, None
        if sentinel is not None:
            for client in sentinel.sentinels:
                try:
                    await client.aclose()
                except Exception:
                    continue
