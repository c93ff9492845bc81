"""Test-only fault injection: slow down chosen phases of the backends.

Off in production. When `$IVIP_IPC_FAULT_DELAYS` is unset (or empty) at
import, `ACTIVE` is False and each fault point costs one global bool check at
its call site::

    if fault_points.ACTIVE:
        await fault_points.pause("restore_slice")

With it set, e.g. `IVIP_IPC_FAULT_DELAYS="restore_slice=0.05,snapshot_write=0.3"`,
each named point waits that many seconds every time it is passed. The points:

* `restore_slice`: the directory reader's restore of the retained log at
  start, after each slice (`asyncio.sleep`: the loop runs on);
* `snapshot_write`: a directory snapshot, before it replaces `snapshot.bin`
  (`asyncio.sleep`);
* `doorbell`: the directory backend's doorbell handler, per wake-up
  (`time.sleep`: the whole process is busy);
* `lease_renew`: a Redis lease, before each renewal (`asyncio.sleep`).

The guarantee checker (`tests/guarantees`) sets it per process to explore
schedules where one phase is slow. Malformed entries are ignored with a warning.

Example:
    >>> parse("restore_slice=0.05, doorbell=0.01,bad,x=-1")
    {'restore_slice': 0.05, 'doorbell': 0.01}
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Final

from .logs import logger

__all__ = ["ACTIVE", "ENV", "POINTS", "delay", "parse", "pause", "stall"]

ENV: Final = "IVIP_IPC_FAULT_DELAYS"
POINTS: Final = frozenset({"restore_slice", "snapshot_write", "doorbell", "lease_renew"})


def parse(text: str) -> dict[str, float]:
    """`name=seconds` pairs separated by commas; unknown or bad entries are dropped."""
    delays: dict[str, float] = {}
    for item in text.split(","):
        name, _, value = item.strip().partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if name in POINTS and 0 < seconds < 3600:
            delays[name] = seconds
        elif item.strip():
            logger.warning("%s: ignoring %r", ENV, item.strip())
    return delays


_DELAYS: Final = parse(os.environ.get(ENV, ""))
ACTIVE: Final = bool(_DELAYS)


def delay(point: str) -> float:
    """Seconds `point` waits (0.0 when not slowed)."""
    return _DELAYS.get(point, 0.0)


async def pause(point: str) -> None:
    """Wait at an async fault point, letting the event loop run meanwhile."""
    seconds = _DELAYS.get(point)
    if seconds:
        await asyncio.sleep(seconds)


def stall(point: str) -> None:
    """Wait at a synchronous fault point: the whole process is busy meanwhile."""
    seconds = _DELAYS.get(point)
    if seconds:
        time.sleep(seconds)
