"""Backends: where records go and come from. Chosen by `AsyncIPC` from the path or URL."""

from __future__ import annotations

from typing import Final

__all__ = ["REDIS_SCHEMES"]

REDIS_SCHEMES: Final = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
"""The URL schemes of the Redis backend (a Cluster is reached through any node's
`redis://` or `rediss://` URL). Anything else with `://` but `file://` is refused."""
