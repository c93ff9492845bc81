"""Pacing: how long a slice of work may hold the event loop, and how it yields.

Reading a segment, restoring a log and loading or writing a snapshot are done a
slice at a time (`SLICE` seconds, `STEP` records between looks at the clock),
so a ticker on the loop never waits for a long read.

Depends on: `records` (FrameReader). No part of the backend.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

from ...records import FrameReader, Record

__all__ = ["SLICE", "STEP", "after_timers_due", "breathe", "sliced"]

# A ticker on the loop sees up to two slices between its wake-ups (one ends its
# iteration, the next starts it), so a slice stays well under half of 10 ms.
SLICE: Final = 0.002  # seconds of reading and dispatch per loop callback, then yield
STEP: Final = 64  # records parsed and dispatched between two looks at the clock
_NEXT_TO_NO_DELAY: Final = 1e-9  # asyncio.sleep(0) is a plain yield, without a timer


async def sliced(reader: FrameReader, data: bytes) -> AsyncIterator[list[Record]]:
    """The records `data` completes, `STEP` at a time, yielding to the event loop
    whenever a `SLICE` has passed (a restore or a snapshot load of 100,000 keys
    never holds the loop in one go).

    Example:
        >>> from ivip_ipc_async.records import Kind, encode_frame
        >>> frames = b"".join(encode_frame(Record(Kind.MESSAGE, "e", b"", b"1"), n) for n in (1, 2))
        >>> async def main():
        ...     return [len(rs) async for rs in sliced(FrameReader(1 << 20), frames)]
        >>> asyncio.run(main())
        [2]
    """
    deadline = time.perf_counter() + SLICE
    records = reader.feed(data, STEP)
    while True:
        yield records
        if not reader.backlog:
            return
        if time.perf_counter() > deadline:
            await breathe()
            deadline = time.perf_counter() + SLICE
        records = reader.feed(limit=STEP)


async def breathe() -> None:
    """Yield to the event loop between two slices of work, behind the timers due.

    `asyncio.sleep(0)` queues the caller ahead of the timers that fall due while
    it runs, so a task sleeping 1 ms would wait for two slices; a timer of (next
    to) no delay is queued behind them, so it waits for one.
    """
    await asyncio.sleep(_NEXT_TO_NO_DELAY)


def after_timers_due(callback: Callable[[], object]) -> None:
    """Call `callback` (a slice of work) once the timers due now have run, and
    the tasks they wake: a timer only wakes a task, which runs one loop turn
    later, so `callback` is queued one turn later too (see `breathe`)."""
    loop = asyncio.get_running_loop()
    loop.call_later(0, loop.call_soon, callback)
