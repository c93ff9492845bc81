"""Where the Redis server is: a URL made into redis-py clients.

- `redis://`, `rediss://`, `unix://`: that server (as `Redis.from_url`).
- `redis+sentinel://[[user]:password@]host:port[,host:port…]/service[/db]`:
  the master of `service`, as the Sentinels at those addresses name it (port
  26379 by default). The user and password are the master's (as in
  `redis://`); `?sentinel_username=` and `?sentinel_password=` give the
  Sentinels' own when they differ; other query options are as for `redis://`.
  Every connection asks the Sentinels where the master is when it (re)connects,
  and one that finds itself on a demoted master (`READONLY`) reconnects: a
  failover is a lost connection like any other, retried by the callers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

__all__ = ["SENTINEL_SCHEMES", "Endpoint", "SentinelTarget"]

SENTINEL_SCHEMES: Final = ("redis+sentinel",)
_SENTINEL_PORT: Final = 26379
# The Sentinels are asked where the master is: an unanswered one is skipped.
_SENTINEL_TIMEOUT: Final = 2.0


@dataclass(frozen=True)
class SentinelTarget:
    """A `redis+sentinel://` URL, parsed.

    Example:
        >>> t = SentinelTarget.parse("redis+sentinel://:pw@s1:26380,s2/orders/2")
        >>> t.sentinels, t.service, t.options["db"], t.options["password"]
        ((('s1', 26380), ('s2', 26379)), 'orders', 2, 'pw')
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    options: dict[str, Any] = field(default_factory=dict)
    """The master's connection options (credentials, db, query options)."""
    sentinel_options: dict[str, Any] = field(default_factory=dict)
    """The Sentinels' own credentials, when given."""

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
        options: dict[str, Any] = dict(parse_url(f"redis://{userinfo}{at}localhost/{db}?{rest}"))
        options.pop("host", None)
        options.pop("port", None)
        return cls(tuple(sentinels), path[0], options, sentinel_options)


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


_SENTINEL_CONNECTION: list[type] = []


def _sentinel_connection_class() -> type:
    """redis-py's `SentinelManagedConnection`, asking where the master is on every
    socket it opens: redis-py 8 reconnects a dropped connection when sending, by a
    path that skips the Sentinel lookup (it went on dialling the dead master)."""
    if not _SENTINEL_CONNECTION:
        from redis.asyncio.sentinel import SentinelManagedConnection

        class MasterConnection(SentinelManagedConnection):
            async def _connect(self) -> None:
                pool = self.connection_pool
                if pool.is_master:
                    self.host, self.port = await pool.get_master_address()
                await super()._connect()  # type: ignore[no-untyped-call]

        _SENTINEL_CONNECTION.append(MasterConnection)
    return _SENTINEL_CONNECTION[0]


class Endpoint:
    """Makes the clients of one backend for its URL (one `Sentinel` shared by them).

    Example:
        >>> Endpoint("redis://127.0.0.1:6379/0").sentinel is None
        True
    """

    def __init__(self, url: str) -> None:
        self.url = url
        scheme = url.partition("://")[0].lower()
        self.target = SentinelTarget.parse(url) if scheme in SENTINEL_SCHEMES else None
        self.sentinel: Any = None

    def client(self, options: dict[str, Any]) -> Any:
        """A redis-py asyncio client with `options` (as `Redis.from_url` takes)."""
        import redis.asyncio as aioredis

        target = self.target
        if target is None:
            return aioredis.Redis.from_url(self.url, **options)
        from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

        if self.sentinel is None:
            timeouts = {
                "socket_timeout": _SENTINEL_TIMEOUT,
                "socket_connect_timeout": _SENTINEL_TIMEOUT,
            }
            self.sentinel = Sentinel(
                target.sentinels, sentinel_kwargs={**timeouts, **target.sentinel_options}
            )
        options = dict(options)
        single = bool(options.pop("single_connection_client", False))
        # The URL's options win, as with `Redis.from_url`.
        pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
            target.service,
            self.sentinel,
            is_master=True,
            connection_class=_sentinel_connection_class(),
            **{**options, **target.options},
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
