"""Shrinking a failing schedule: delta debugging on its events, then its processes.

Real processes are not deterministic: a schedule "still fails" when one of
`tries` runs of it shows a violation of the same kind as the original. Each
candidate is a full run (seconds each), so the search is bounded by `budget`
runs; the shortest schedule found is returned with the number of runs spent.
"""

from __future__ import annotations

from collections.abc import Callable

from .driver import Outcome, run
from .schedule import Event, Schedule

__all__ = ["shrink"]


def _fails(schedule: Schedule, kinds: set[str], tries: int) -> Outcome | None:
    for _ in range(tries):
        outcome = run(schedule)
        if {v.kind for v in outcome.violations} & kinds:
            return outcome
    return None


def shrink(
    schedule: Schedule,
    kinds: set[str],
    *,
    tries: int = 2,
    budget: int = 30,
    say: Callable[[str], None] = print,
) -> tuple[Schedule, int]:
    """The smallest schedule found that still shows a violation of `kinds`."""
    spent = 0

    def still_fails(candidate: Schedule) -> bool:
        nonlocal spent
        if spent >= budget:
            return False
        spent += 1
        failed = _fails(candidate, kinds, tries) is not None
        say(
            f"  shrink run {spent}/{budget}: {len(candidate.agents)} processes, "
            f"{len(candidate.events)} events: {'fails' if failed else 'passes'}"
        )
        return failed

    # ddmin over the events.
    events: list[Event] = list(schedule.events)
    n = 2
    while len(events) >= 1 and spent < budget:
        chunk = max(1, len(events) // n)
        subsets = [events[i : i + chunk] for i in range(0, len(events), chunk)]
        reduced = False
        for subset in subsets:
            complement = [e for e in events if e not in subset]
            if still_fails(schedule.with_events(complement)):
                events, n, reduced = complement, max(n - 1, 2), True
                break
        if not reduced:
            if chunk == 1:
                break
            n = min(len(events), n * 2)
    best = schedule.with_events(events)
    # Then whole processes (never below two), then the background operations.
    for agent in list(best.agents):
        if len(best.agents) <= 2 or spent >= budget:
            break
        candidate = best.without_agent(agent.name)
        if still_fails(candidate):
            best = candidate
    for keep in (["notify"], ["notify", "set"]):
        if spent >= budget:
            break
        candidate = Schedule.from_json(best.to_json())
        for agent in candidate.agents:
            agent.ops = list(keep)
        if still_fails(candidate):
            best = candidate
            break
    return best, spent
