"""OpenTelemetry metrics: every figure of `stats()` and `health()` (the `otel` extra).

`instrument(ipc)` creates observable instruments on a meter of the
OpenTelemetry *API* (`opentelemetry-api`); the application chooses the SDK,
the reader and the exporter (OTLP, Prometheus, console...). Each collection
reads `stats()` and `health()` in the instruments' callbacks: nothing runs
between collections.

Names follow OpenTelemetry conventions: dotted, prefix `ivip_ipc.`, the unit as
a UCUM unit string rather than in the name: `ivip_ipc.peers` (`{peer}`),
`ivip_ipc.lag` (`By`), `ivip_ipc.dispatch_time` (`s`), `ivip_ipc.records_lost`
with the attribute `cause`. Counters are observable counters (cumulative),
the rest observable gauges. Every observation has the attributes
`ivip_ipc.namespace` and `ivip_ipc.peer`.

Example:
    >>> import asyncio, tempfile
    >>> from opentelemetry.sdk.metrics import MeterProvider
    >>> from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    >>> from ivip_ipc_async import AsyncIPC
    >>> reader = InMemoryMetricReader()
    >>> meter = MeterProvider(metric_readers=[reader]).get_meter("app")
    >>> async def main():
    ...     async with AsyncIPC(tempfile.mkdtemp(), namespace="shop") as ipc:
    ...         instrument(ipc, meter=meter)
    ...         data = reader.get_metrics_data()
    ...     (scope,) = data.resource_metrics[0].scope_metrics
    ...     return {m.name: m.data.data_points[0].value for m in scope.metrics
    ...             if m.name in ("ivip_ipc.healthy", "ivip_ipc.peers")}
    >>> asyncio.run(main())
    {'ivip_ipc.peers': 0, 'ivip_ipc.healthy': 1}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .figures import HEALTHY, INFO, KNOWN, PROBLEMS, RECORDS_LOST, Spec, figures

if TYPE_CHECKING:
    from ..ipc import AsyncIPC

__all__ = ["instrument", "instrument_name", "unit_of"]

PREFIX = "ivip_ipc."

# UCUM units (OpenTelemetry's convention), and annotations for counts.
_UNITS = {"bytes": "By", "seconds": "s"}
_COUNTS = {
    "peers": "{peer}",
    "writers": "{writer}",
    "segments": "{segment}",
    "listeners": "{listener}",
    "cache_entries": "{entry}",
    "problems": "{problem}",
    "lock_waits": "{wait}",
    "lock_holds": "{holding}",
}


def instrument_name(spec: Spec) -> str:
    """The OpenTelemetry name of a figure.

    Example:
        >>> from ivip_ipc_async.integrations.figures import KNOWN
        >>> instrument_name(KNOWN["lag_bytes"]), unit_of(KNOWN["lag_bytes"])
        ('ivip_ipc.lag', 'By')
    """
    return PREFIX + spec.name


def unit_of(spec: Spec) -> str:
    """The UCUM unit string of a figure ("1" for a plain count or a 0/1 state).

    Example:
        >>> from ivip_ipc_async.integrations.figures import KNOWN
        >>> unit_of(KNOWN["peers"]), unit_of(KNOWN["dispatch_seconds"]), unit_of(KNOWN["gaps"])
        ('{peer}', 's', '1')
    """
    if spec.unit:
        return _UNITS.get(spec.unit, spec.unit)
    return _COUNTS.get(spec.name, "1")


def instrument(*ipcs: AsyncIPC, meter: Any = None) -> list[Any]:
    """Create observable instruments for every figure of `ipcs`; returns them.

    Call it once per set of instances (instruments cannot be removed; an
    instance destroyed later reports `started` 0 and its last counters).
    Instruments are made for every figure both backends know (and those that
    issue #24's cache counters add), plus any other number in `stats()` now.

    Args:
        ipcs: The instances to observe.
        meter: An OpenTelemetry `Meter`. None: `metrics.get_meter("ivip_ipc_async")`
            of the global meter provider that the application's SDK set.

    Example:
        >>> from opentelemetry.sdk.metrics import MeterProvider
        >>> from ivip_ipc_async import AsyncIPC
        >>> made = instrument(AsyncIPC("/tmp/unused"), meter=MeterProvider().get_meter("app"))
        >>> len(made) > 40
        True
    """
    if meter is None:
        from opentelemetry import metrics

        meter = metrics.get_meter("ivip_ipc_async")
    specs: dict[str, Spec] = {spec.name: spec for spec in KNOWN.values()}
    for spec in (RECORDS_LOST, INFO, HEALTHY, PROBLEMS):
        specs[spec.name] = spec
    for ipc in ipcs:
        for figure in figures(ipc):
            specs.setdefault(figure.name, figure.spec)
    made = []
    for spec in specs.values():
        create = (
            meter.create_observable_counter
            if spec.kind == "counter"
            else meter.create_observable_gauge
        )
        made.append(
            create(
                instrument_name(spec),
                callbacks=[_observe(ipcs, spec.name)],
                unit=unit_of(spec),
                description=spec.help,
            )
        )
    return made


def _observe(ipcs: tuple[AsyncIPC, ...], name: str) -> Callable[[Any], Iterable[Any]]:
    def callback(options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        out = []
        for ipc in ipcs:
            for figure in figures(ipc):
                if figure.name == name:
                    attributes = {f"{PREFIX}{key}": value for key, value in figure.labels}
                    value = figure.value
                    out.append(Observation(int(value) if value.is_integer() else value, attributes))
        return out

    return callback
