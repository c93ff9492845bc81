"""Every figure of `AsyncIPC.stats()` and `health()`, named once for the metrics
exporters (`integrations.prometheus`, `integrations.otel`).

A `Figure` is one number with its kind (counter or gauge), unit, help text and
labels. The table `KNOWN` names the figures both backends have; any other number
in `stats()` (a counter added later) is exported too,
as a counter named after its key (a gauge added later needs a row here). Text
figures (`backend`, `watcher`) become labels of `info`; `peers` (a list) its
length; `records_lost_<cause>` the `cause` label of `records_lost`.

No third-party import here: the exporters import their client libraries.

Example:
    >>> import asyncio, tempfile
    >>> from ivip_ipc_async import AsyncIPC
    >>> async def main():
    ...     async with AsyncIPC(tempfile.mkdtemp(), namespace="shop") as ipc:
    ...         return {f.name: f.value for f in figures(ipc) if f.name in ("peers", "healthy")}
    >>> asyncio.run(main())
    {'peers': 0.0, 'healthy': 1.0}
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..ipc import AsyncIPC

__all__ = ["KNOWN", "Figure", "Spec", "figures", "instance_labels"]

Kind = Literal["counter", "gauge"]


@dataclass(frozen=True)
class Spec:
    """How one figure is exported: `name` (no prefix, no unit), `kind`, `unit`
    ("bytes", "seconds" or "" for a count), `help`, and extra label names."""

    name: str
    kind: Kind
    unit: str
    help: str
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Figure:
    """One exported number: its `Spec`, its value, and its label values
    (the instance's labels, then the spec's extra ones)."""

    spec: Spec
    value: float
    labels: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return self.spec.name


def _c(name: str, help: str, unit: str = "", labels: tuple[str, ...] = ()) -> Spec:
    return Spec(name, "counter", unit, help, labels)


def _g(name: str, help: str, unit: str = "", labels: tuple[str, ...] = ()) -> Spec:
    return Spec(name, "gauge", unit, help, labels)


INFO = _g(
    "info", "always 1; the labels say which backend and watcher run", "", ("backend", "watcher")
)
HEALTHY = _g("healthy", "1 while health() says healthy (what a readiness probe answers)")
PROBLEMS = _g("problems", "how many problems health() names now")
RECORDS_LOST = _c(
    "records_lost", "records lost to this process in gaps, by cause", labels=("cause",)
)

# stats() key -> how it is exported. Counters only grow while the instance lives
# (a restarted instance starts again from 0, which Prometheus reads as a reset).
KNOWN: dict[str, Spec] = {
    "started": _g("started", "1 while the instance is started in this process"),
    "listeners": _g("listeners", "handlers registered (on, once, subscribe, wait_for)"),
    "handler_errors": _c("handler_errors", "handlers that raised"),
    "slow_handlers": _c("slow_handlers", "dispatches (or timed calls) over slow_handler_threshold"),
    "dispatch_seconds": _c(
        "dispatch_time", "time dispatching received records held the event loop", "seconds"
    ),
    "cache_entries": _g("cache_entries", "entries in this process's cache mirror (all caches)"),
    "peers": _g("peers", "live peers this instance sees"),
    "writers": _g("writers", "segment writers this instance reads"),
    "segments": _g("segments", "segments in the shared directory"),
    "footprint_bytes": _g("footprint", "disk use of the namespace, all peers", "bytes"),
    "lag_bytes": _g("lag", "bytes written by peers and not read yet", "bytes"),
    "snapshot_holder": _g("snapshot_holder", "1 while this instance writes the snapshots"),
    "watcher_alive": _g("watcher_alive", "1 while the directory watcher runs"),
    "maintenance_alive": _g("maintenance_alive", "1 while the maintenance task runs"),
    "connected": _g("connected", "1 while connected to Redis"),
    "records_written": _c("records_written", "records written"),
    "batches_written": _c("batches_written", "batches (writes) of records"),
    "bytes_written": _c("written", "bytes written", "bytes"),
    "records_read": _c("records_read", "records read"),
    "bytes_read": _c("read", "bytes read", "bytes"),
    "doorbells_sent": _c("doorbells_sent", "doorbells rung"),
    "doorbells_received": _c("doorbells_received", "doorbells heard"),
    "watch_events": _c("watch_events", "directory watcher events"),
    "rescans": _c("rescans", "safety re-scans of the directory"),
    "gaps": _c("gaps", "gaps: records lost to this process (see records_lost)"),
    "garbage_bytes": _c("garbage", "unreadable bytes skipped", "bytes"),
    "torn_tails": _c("torn_tails", "torn tails of dead writers skipped"),
    "peers_collected": _c("peers_collected", "dead peers whose files were collected"),
    "segments_deleted": _c("segments_deleted", "segments deleted (retention, cap)"),
    "segments_capped": _c("segments_capped", "segments deleted early to keep under the cap"),
    "snapshots_written": _c("snapshots_written", "snapshots written"),
    "snapshots_damaged": _c("snapshots_damaged", "damaged snapshots found"),
    "write_errors": _c("write_errors", "failed writes"),
    "task_failures": _c("task_failures", "background tasks that died and were restarted"),
    "watcher_restarts": _c("watcher_restarts", "directory watcher restarts"),
    # the Redis backend's own
    "connection_errors": _c("connection_errors", "Redis connection errors"),
    "write_retries": _c("write_retries", "Redis writes retried"),
    "duplicates_dropped": _c("duplicates_dropped", "retried writes read twice and dropped"),
    "reconnects": _c("reconnects", "Redis listener reconnections"),
    "resyncs": _c("resyncs", "cache reloads from Redis"),
    "state_checks": _c("state_checks", "checks that Redis kept the namespace's state"),
    "state_losses": _c("state_losses", "times Redis had lost the namespace's state"),
    # the layers above the backend (Medium.tally): every AsyncCache of the
    # instance, and its locks and leaderships
    "cache_hits": _c("cache_hits", "cache reads that found a live entry"),
    "cache_misses": _c("cache_misses", "cache reads that found none"),
    "cache_expirations": _c("cache_expirations", "cache reads that found an expired entry"),
    "lock_waits": _c("lock_waits", "waits for a lock or leadership (won, timed out or cancelled)"),
    "lock_wait_seconds": _c("lock_wait_time", "time spent waiting for locks", "seconds"),
    "lock_holds": _c("lock_holds", "locks and leaderships taken"),
    "lock_hold_seconds": _c("lock_hold_time", "time locks were held, until let go", "seconds"),
}

# Not numbers: exported as labels (backend, watcher) or not at all.
_TEXT = {"backend", "watcher", "path", "url", "namespace", "peer", "last_id"}


def instance_labels(ipc: AsyncIPC, stats: dict[str, object] | None = None) -> dict[str, str]:
    """The labels that tell instances apart: `namespace` and `peer` ("" before start).

    Example:
        >>> from ivip_ipc_async import AsyncIPC
        >>> instance_labels(AsyncIPC("/tmp/unused", namespace="shop"))
        {'namespace': 'shop', 'peer': ''}
    """
    stats = ipc.stats() if stats is None else stats
    namespace = stats.get("namespace")
    if not isinstance(namespace, str):
        path = stats.get("path")
        namespace = os.path.basename(path) if isinstance(path, str) else ipc.namespace or ""
    peer = stats.get("peer")
    return {"namespace": namespace, "peer": peer if isinstance(peer, str) else ""}


def figures(ipc: AsyncIPC) -> list[Figure]:
    """Every figure of `ipc.stats()` and `ipc.health()`, read now (no I/O but a
    directory listing and an `fstat` per writer, as `stats()`)."""
    stats = ipc.stats()
    health = ipc.health()
    base = tuple(instance_labels(ipc, stats).items())
    out: list[Figure] = []
    lost_by_cause = 0.0
    for key, raw in stats.items():
        if key in _TEXT:
            continue
        if key == "peers" and isinstance(raw, list | tuple):
            out.append(Figure(KNOWN["peers"], float(len(raw)), base))
            continue
        if key.startswith("records_lost_") and isinstance(raw, int | float):
            cause = key.removeprefix("records_lost_")
            out.append(Figure(RECORDS_LOST, float(raw), (*base, ("cause", cause))))
            lost_by_cause += float(raw)
            continue
        if key == "records_lost" or not isinstance(raw, bool | int | float):
            continue
        spec = KNOWN.get(key)
        if spec is None:  # a number added later: a counter of that name
            spec = Spec(key, "gauge" if isinstance(raw, bool) else "counter", "", key)
        out.append(Figure(spec, float(raw), base))
    total = stats.get("records_lost", 0)
    if isinstance(total, int | float):
        # Redis says how many, not why: what no cause accounts for is "unknown".
        rest = max(0.0, float(total) - lost_by_cause)
        out.append(Figure(RECORDS_LOST, rest, (*base, ("cause", "unknown"))))
    backend = stats.get("backend")
    watcher = stats.get("watcher")
    out.append(
        Figure(
            INFO,
            1.0,
            (
                *base,
                ("backend", backend if isinstance(backend, str) else ""),
                ("watcher", watcher if isinstance(watcher, str) else ""),
            ),
        )
    )
    out.append(Figure(HEALTHY, float(bool(health["healthy"])), base))
    out.append(Figure(PROBLEMS, float(len(health["problems"])), base))
    return out
