"""What the suite runs: the measuring modules, in the page's order, and their scenarios.

The cache scale (`benchmarks.scale`), the crowd of joiners (`benchmarks.crowd`) and
the directory's faults (`benchmarks.faults`) run alone: they take long or measure
one situation each.
"""

from __future__ import annotations

from types import ModuleType

from . import budget, cache, coordination, idle, latency, redis_backend, stalls, startup, throughput
from .harness import Scenario

MODULES: tuple[ModuleType, ...] = (
    latency,
    throughput,
    cache,
    idle,
    startup,
    redis_backend,
    stalls,
    budget,
    coordination,
)
SCENARIOS: dict[str, Scenario] = {
    name: scenario for module in MODULES for name, scenario in module.SCENARIOS.items()
}
