"""Fixtures of the Redis tests: namespaces (their keys deleted afterwards), a
private server, and a relay to the shared server that a test can cut."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from ..redis_server import REDIS_SERVER, Relay, Server
from ..test_backends import REDIS_URL


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    """A fresh namespace, its keys on the shared test server deleted afterwards."""
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    keys = await client.keys(f"ivip:{{{ns}}}:*")
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def shared_namespace() -> AsyncIterator[str]:
    """A namespace on the shared test server, its keys deleted afterwards."""
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    keys = await client.keys(f"ivip:{{{ns}}}:*")
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """A private server; parametrized indirectly with extra redis-server options."""
    if REDIS_SERVER is None:
        pytest.skip("no redis-server binary to start a private server")
    instance = Server(*getattr(request, "param", ()))
    instance.start()
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture
async def relay() -> AsyncIterator[tuple[Relay, str]]:
    """A relay to the test server, and the Redis URL that goes through it."""
    parts = urlsplit(REDIS_URL)
    if parts.scheme != "redis" or parts.hostname is None:
        pytest.skip(f"the relay needs a redis://host:port URL, not {REDIS_URL}")
    relay = Relay(parts.hostname, parts.port or 6379)
    port = await relay.start()
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    yield relay, urlunsplit(parts._replace(netloc=netloc))
    await relay.close()
