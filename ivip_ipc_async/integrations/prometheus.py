"""Prometheus metrics: every figure of `stats()` and `health()` (the `prometheus` extra).

Two ways, by how the app runs:

* **One process per scrape target** (a single worker, or each worker exposing
  its own port): `IPCCollector(ipc)` reads `stats()` and `health()` at scrape
  time. Register it once: `REGISTRY.register(IPCCollector(ipc))`.
* **Several workers behind one port** (`uvicorn --workers N`, gunicorn) with
  `PROMETHEUS_MULTIPROC_DIR` set: a custom collector only reports the worker
  that answers the scrape, so `multiprocess_exporter(ipc)` copies the figures
  into prometheus_client's multiprocess files instead, every `interval`
  seconds, from each worker. The scrape, through `MultiProcessCollector`, then
  shows every live worker's gauges (labelled `pid`) and the counters summed over
  all workers. See docs/metrics.md.

Names follow Prometheus conventions: prefix `ivip_ipc_`, the unit in the name,
`_total` on counters: `ivip_ipc_peers`, `ivip_ipc_lag_bytes`,
`ivip_ipc_records_lost_total{cause="retention"}`,
`ivip_ipc_dispatch_time_seconds_total`. prometheus_client is imported when a
collector or an exporter is made, not with this module.

Example:
    >>> import asyncio, tempfile
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> from ivip_ipc_async import AsyncIPC
    >>> async def main():
    ...     async with AsyncIPC(tempfile.mkdtemp(), namespace="shop") as ipc:
    ...         registry = CollectorRegistry()
    ...         registry.register(IPCCollector(ipc))
    ...         return generate_latest(registry).decode()
    >>> text = asyncio.run(main())
    >>> 'ivip_ipc_healthy{namespace="shop",' in text, "ivip_ipc_records_read_total{" in text
    (True, True)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from ..logs import logger
from ..waiting import cancel_and_wait
from .figures import Figure, Spec, figures

if TYPE_CHECKING:
    from ..ipc import AsyncIPC

__all__ = ["IPCCollector", "metric_name", "multiprocess_exporter"]

PREFIX = "ivip_ipc_"


def metric_name(spec: Spec) -> str:
    """The Prometheus name of a figure, without the `_total` a counter's samples get.

    Example:
        >>> from ivip_ipc_async.integrations.figures import KNOWN
        >>> metric_name(KNOWN["lag_bytes"]), metric_name(KNOWN["dispatch_seconds"])
        ('ivip_ipc_lag_bytes', 'ivip_ipc_dispatch_time_seconds')
    """
    return PREFIX + spec.name + (f"_{spec.unit}" if spec.unit else "")


class IPCCollector:
    """A prometheus_client collector of `AsyncIPC` instances, read at scrape time.

    Each instance's figures carry the labels `namespace` and `peer`. Nothing is
    cached: a scrape costs one `stats()` and one `health()` per instance.

    Example:
        >>> from prometheus_client import CollectorRegistry, generate_latest
        >>> from ivip_ipc_async import AsyncIPC
        >>> registry = CollectorRegistry()
        >>> registry.register(IPCCollector(AsyncIPC("/tmp/unused", namespace="shop")))
        >>> print(generate_latest(registry).decode().splitlines()[2])
        ivip_ipc_started{namespace="shop",peer=""} 0.0
    """

    def __init__(self, *ipcs: AsyncIPC) -> None:
        self._ipcs = ipcs

    def describe(self) -> list[Any]:
        """Nothing: the names depend on the backend, so prometheus_client does not
        check them for duplicates up front (it would call `collect` otherwise).

        Example:
            >>> from ivip_ipc_async import AsyncIPC
            >>> IPCCollector(AsyncIPC("/tmp/unused")).describe()
            []
        """
        return []

    def collect(self) -> Iterator[Any]:
        """The metric families, read from `stats()` and `health()` now.

        Example:
            >>> from ivip_ipc_async import AsyncIPC
            >>> [family.name for family in IPCCollector(AsyncIPC("/tmp/unused")).collect()][:3]
            ['ivip_ipc_started', 'ivip_ipc_listeners', 'ivip_ipc_handler_errors']
        """
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[str, Any] = {}
        for ipc in self._ipcs:
            for figure in figures(ipc):
                name = metric_name(figure.spec)
                family = families.get(name)
                if family is None:
                    kind = (
                        CounterMetricFamily if figure.spec.kind == "counter" else GaugeMetricFamily
                    )
                    labels = [label for label, _ in figure.labels]
                    family = families[name] = kind(name, figure.spec.help, labels=labels)
                family.add_metric([value for _, value in figure.labels], figure.value)
        yield from families.values()


# -- multiprocess mode --------------------------------------------------------------------------

# Metric objects of this process, by name: prometheus_client keeps one file entry
# per (name, labels) per process, so each name is made once.
_metrics: dict[str, Any] = {}


def _metric(figure: Figure) -> Any:
    from prometheus_client import Counter, Gauge

    name = metric_name(figure.spec)
    metric = _metrics.get(name)
    if metric is None:
        labels = [label for label, _ in figure.labels if label != "peer"]
        if figure.spec.kind == "counter":
            metric = Counter(name, figure.spec.help, labels, registry=None)
        else:
            # One value per live worker, labelled pid (the multiprocess collector adds it).
            metric = Gauge(
                name, figure.spec.help, labels, registry=None, multiprocess_mode="liveall"
            )
        _metrics[name] = metric
    return metric


class _Copier:
    """Copies figures into multiprocess metrics: gauges set, counters increased by
    what they grew since the last copy (a restarted instance's reset counts anew)."""

    def __init__(self, ipc: AsyncIPC) -> None:
        self._ipc = ipc
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def copy(self) -> None:
        for figure in figures(self._ipc):
            labels = tuple((k, v) for k, v in figure.labels if k != "peer")
            child = _metric(figure).labels(*[v for _, v in labels])
            if figure.spec.kind == "gauge":
                child.set(figure.value)
                continue
            key = (metric_name(figure.spec), labels)
            last = self._last.get(key, 0.0)
            grown = figure.value - last if figure.value >= last else figure.value
            self._last[key] = figure.value
            if grown > 0:
                child.inc(grown)


@contextlib.asynccontextmanager
async def multiprocess_exporter(ipc: AsyncIPC, *, interval: float = 5.0) -> AsyncIterator[None]:
    """Copy `ipc`'s figures into prometheus_client's multiprocess files while inside.

    For several workers behind one port: run it in each worker (in the app's
    lifespan, once the IPC is started), with `PROMETHEUS_MULTIPROC_DIR` set
    before prometheus_client is first imported, and serve the metrics with a
    `MultiProcessCollector`. Every `interval` seconds (and once on entry and on
    exit) the gauges are set (one per live worker, labelled `pid`) and the
    counters increased (summed over every worker, gone ones included). On exit
    this worker's gauges are removed (`mark_process_dead`), as gunicorn's
    `child_exit` hook does for workers that die.

    Example:
        >>> import asyncio, os, tempfile
        >>> os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None  # here: refused
        True
        >>> from ivip_ipc_async import AsyncIPC
        >>> async def main():
        ...     async with AsyncIPC(tempfile.mkdtemp()) as ipc:
        ...         async with multiprocess_exporter(ipc):
        ...             pass
        >>> asyncio.run(main())
        Traceback (most recent call last):
        ...
        RuntimeError: multiprocess_exporter needs PROMETHEUS_MULTIPROC_DIR ...
    """
    from prometheus_client import multiprocess, values

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR") or values.ValueClass is values.MutexValue:
        raise RuntimeError(
            "multiprocess_exporter needs PROMETHEUS_MULTIPROC_DIR set (to an empty "
            "directory) before prometheus_client is imported; with one process per "
            "scrape target, register IPCCollector(ipc) instead"
        )
    copier = _Copier(ipc)

    async def every() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                copier.copy()
            except Exception:  # logged, and the next round tries again
                logger.exception("could not copy the figures for prometheus_client")

    copier.copy()
    task = asyncio.create_task(every(), name="ivip-ipc_prometheus")
    try:
        yield
    finally:
        # Not `suppress(CancelledError)`: the caller's own cancellation (a lifespan
        # shut down while leaving this block) must go on.
        await cancel_and_wait(task)
        copier.copy()  # the counters' last growth stays in the sums
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
