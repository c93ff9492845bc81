"""Ending a test's child processes without leaving a transport behind."""

from __future__ import annotations

import asyncio
import contextlib


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Kill `proc` if it still runs, wait for it, and close its transport.

    asyncio closes a subprocess transport by itself only once every pipe has
    closed: a stdin never closed, or a stdout a grandchild still holds, keeps it
    open after the process died, and the garbage collector then finalizes it in
    whatever test runs next (an unclosed-transport ResourceWarning, an error
    under `filterwarnings = error`). Closing it here is deterministic.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()
    proc._transport.close()  # type: ignore[attr-defined]  # (no public way in 3.11-3.13)
    for _ in range(2):  # the pipes' connection_lost callbacks
        await asyncio.sleep(0)
