"""Hybrid logical clock: the order of cache writes across processes.

A timestamp is one integer: wall-clock milliseconds shifted left by 16 bits,
plus a logical counter in the low 16 bits. It never goes backwards in one
process, it moves past every timestamp the process has seen from a peer, and
it stays close to real time, so "last writer wins" means what a user expects
even when two processes' clocks disagree by a little.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["HybridLogicalClock"]

_LOGICAL_BITS = 16


class HybridLogicalClock:
    """A hybrid logical clock.

    Example:
        >>> clock = HybridLogicalClock(now_ms=lambda: 1000)
        >>> a = clock.tick(); b = clock.tick()
        >>> b > a, a >> 16
        (True, 1000)
        >>> clock.observe((5000 << 16) + 3)
        >>> clock.tick() >> 16
        5000
    """

    __slots__ = ("_last", "_now_ms")

    def __init__(self, now_ms: Callable[[], int] | None = None) -> None:
        self._now_ms = now_ms or (lambda: time.time_ns() // 1_000_000)
        self._last = 0

    def tick(self) -> int:
        """A new timestamp, greater than any this clock has issued or observed."""
        physical = self._now_ms() << _LOGICAL_BITS
        last = self._last + 1
        self._last = physical if physical > last else last
        return self._last

    def observe(self, remote: int) -> None:
        """Move past a timestamp received from a peer."""
        if remote > self._last:
            self._last = remote
