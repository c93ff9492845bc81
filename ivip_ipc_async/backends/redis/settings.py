"""What the parts of one Redis backend share: its settings (the options, this
process's node id, the namespace's key names), its counters, and the sink."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Final

from ...logs import rate_limited
from ..base import RecordSink

__all__ = ["COUNTERS", "Settings", "Shared"]

COUNTERS: Final = (
    "records_written",
    "records_read",
    "reconnects",
    "connection_errors",
    "write_retries",
    "duplicates_dropped",
    "gaps",
    "records_lost",
    "resyncs",
    "garbage_bytes",
    "task_failures",
    "state_checks",
    "state_losses",
)


@dataclass(frozen=True)
class Settings:
    """What every part of one Redis backend needs to know: its options (checked
    by `RedisBackend`), this process's node id, and the namespace's key names.

    Example:
        >>> Settings("redis://127.0.0.1:6379/0", "docs", node=1).stream_key
        'ivip:{docs}:log'
    """

    url: str
    namespace: str
    node: int
    max_record_size: int = 16 << 20
    stream_maxlen: int = 100_000
    tombstone_ttl: float = 120.0
    ping_interval: float = 10.0
    retry_timeout: float = 10.0
    read_timeout: float = 5.0
    stream_max_bytes: int = 64 << 20
    state_ttl: float = 3600.0
    state_check_interval: float = 2.0
    redis_options: dict[str, Any] = field(default_factory=dict)

    stream_key: str = field(init=False)
    """The stream: one entry per write."""
    channel: str = field(init=False)
    """The channel every write is published on: `<stream id> <frame>`."""
    entry_prefix: bytes = field(init=False)
    """The prefix of the cache entries' hashes."""
    index_key: str = field(init=False)
    """The index: a set of the cache entries' keys without `entry_prefix` (and
    the empty member once a load built it from every entry: see
    `NamespaceState.load`)."""
    marker_key: str = field(init=False)
    """The namespace's marker (a token: see `NamespaceState.keep`)."""
    probe_key: str = field(init=False)
    """The scratch key of the permission check at start (gone when it ends)."""
    lock_prefix: str = field(init=False)
    """The prefix of the locks' keys and channels (backends/redis/leases.py)."""

    def __post_init__(self) -> None:
        tag = f"ivip:{{{self.namespace}}}"
        for name, value in (
            ("stream_key", f"{tag}:log"),
            ("channel", f"{tag}:live"),
            ("entry_prefix", f"{tag}:c:".encode()),
            ("index_key", f"{tag}:ix"),
            ("marker_key", f"{tag}:id"),
            ("probe_key", f"{tag}:probe:{self.node:016x}"),
            ("lock_prefix", f"{tag}:lk:"),
        ):
            object.__setattr__(self, name, value)

    def entry_key(self, topic: str, key: bytes) -> bytes:
        """The hash holding the cache entry `key` of cache `topic`."""
        return self.entry_prefix + topic.encode() + b"\x00" + key


@dataclass(eq=False)
class Shared:
    """The settings, counters and sink every part of one backend reads (the sink
    is set by `RedisBackend.start`).

    Example:
        >>> shared = Shared(Settings("redis://127.0.0.1:6379/0", "docs", node=1))
        >>> shared.counters["gaps"], shared.sink
        (0, None)
    """

    settings: Settings
    sink: RecordSink | None = None
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def garbage(self, size: int, why: str) -> None:
        """Count, and warn (rate limited) of, `size` bytes skipped because of `why`."""
        self.counters["garbage_bytes"] += size
        rate_limited(
            logging.WARNING,
            ("redis-garbage", self.settings.stream_key),
            "skipped %d bytes in Redis (%s)",
            size,
            why,
        )
