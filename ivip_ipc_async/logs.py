"""The package logger, with rate limiting for messages that can repeat fast.

Everything logs to `logging.getLogger("ivip_ipc_async")`. A warning that may
fire for every record (a handler that raises on each message, garbage in a
segment) is logged the first time, then at most once per `interval` seconds per
key, saying how many were suppressed meanwhile.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["logger", "rate_limited"]

logger = logging.getLogger("ivip_ipc_async")

_last: dict[object, list[float | int]] = {}  # key -> [last time, suppressed count]


def rate_limited(
    level: int, key: object, message: str, *args: Any, interval: float = 10.0, **kwargs: Any
) -> None:
    """Log `message` unless one with the same `key` was logged in the last `interval` s.

    Example:
        >>> rate_limited(logging.WARNING, "doc", "disk %s", "full")  # logged
        >>> rate_limited(logging.WARNING, "doc", "disk %s", "full")  # suppressed
        >>> _last["doc"][1]
        1
    """
    now = time.monotonic()
    seen = _last.get(key)
    if seen is not None and now - seen[0] < interval:
        seen[1] += 1
        return
    suppressed = int(seen[1]) if seen is not None else 0
    if len(_last) > 10_000:  # keys are bounded in practice; never let them grow unbounded
        _last.clear()
    _last[key] = [now, 0]
    if suppressed:
        message += f" ({suppressed} similar messages suppressed in the last {interval:g}s)"
    logger.log(level, message, *args, **kwargs)
