"""Conditional cache writes: what `add`, `incr` and a versioned `set` ask of a backend.

A `Conditional` is a cache write that applies only if the key's current state
allows it; `decide` is the rule, the same on every backend (the directory
backend runs it under a lock, after reading every writer to its end; the Redis
backend runs the same rule in a Lua script, `backends/redis/conditional.py`).

A key's *version* is its winning record's `(hlc, node)`, written as 40 decimal
digits (`version_of`): it changes with every write of the key, and never comes
back. An absent, deleted or expired key has no version (None).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, NamedTuple

from .records import Kind, Record

__all__ = [
    "MAX_COUNTER",
    "Conditional",
    "Mode",
    "Outcome",
    "counter_value",
    "decide",
    "is_live",
    "version_of",
]

MAX_COUNTER: Final = 2**53 - 1
"""The largest counter magnitude `incr` keeps exact on every backend (Redis's Lua
numbers are doubles; the same bound as JavaScript's safe integers)."""

_INTEGER: Final = re.compile(rb"-?[0-9]+")
JSON_CODEC: Final = 1  # counters are JSON integers (ASCII decimal digits)


class Mode(Enum):
    """The condition of a `Conditional`."""

    ADD = "a"  # only if the key is absent, deleted or expired
    IF_VERSION = "v"  # only if the key's version is `expected` (None: absent)
    INCR = "i"  # the key's integer (0 when absent) plus `delta`


@dataclass(frozen=True, slots=True)
class Conditional:
    """A cache write that applies only if the key's current state allows it.

    `record` is the write (a `CACHE_SET`: topic, key, data, expiry, codec and
    node; for `INCR` its data is ignored and its expiry applies only to a key it
    creates). `stamp` gives a clock reading taken once the decision is made (the
    directory backend calls it after it has read everything before it); the
    backend makes sure the written record's clock is above the current one's.
    """

    mode: Mode
    record: Record
    stamp: Callable[[], int]
    expected: str | None = None
    delta: int = 0


class Outcome(NamedTuple):
    """What a conditional write did.

    `applied`: whether the write was stored. `record`: the record stored, when
    applied; else the key's current live record (None: absent), which the
    caller's mirror has been given too.
    """

    applied: bool
    record: Record | None


def version_of(record: Record | None) -> str | None:
    """The version of a key whose winning record is `record` (None: no version).

    Example:
        >>> version_of(Record(Kind.CACHE_SET, "c", b"sk", b"1", hlc=5, node=7))
        '0000000000000000000500000000000000000007'
    """
    if record is None or record.kind is not Kind.CACHE_SET:
        return None
    return f"{record.hlc:020d}{record.node:020d}"


def is_live(record: Record | None, now: float) -> bool:
    """Present and not expired at wall-clock time `now`."""
    if record is None or record.kind is not Kind.CACHE_SET:
        return False
    expires = record.expires
    return expires == 0 or expires > now


def counter_value(record: Record) -> int:
    """The integer a live record holds, for `incr`.

    Raises:
        TypeError: the value is not a JSON integer within `MAX_COUNTER`.

    Example:
        >>> counter_value(Record(Kind.CACHE_SET, "c", b"sk", b"-42"))
        -42
    """
    if record.codec != JSON_CODEC or _INTEGER.fullmatch(record.data) is None:
        raise TypeError("incr: the key holds a value that is not an integer")
    value = int(record.data)
    if abs(value) > MAX_COUNTER:
        raise TypeError(f"incr: the key holds an integer beyond ±{MAX_COUNTER}")
    return value


def decide(op: Conditional, current: Record | None, now: float) -> Outcome:
    """Apply the rule of `op` to the key's current record.

    Returns the record to store (`applied` True; its clock from `op.stamp`, and
    above the current record's), or the current live record (`applied` False).

    Raises:
        TypeError: `incr` of a value that is not an integer.
        OverflowError: `incr` past `MAX_COUNTER`.

    Example:
        >>> from ivip_ipc_async.records import encode_key
        >>> new = Record(Kind.CACHE_SET, "c", encode_key("k"), b"1", node=2)
        >>> held = Record(Kind.CACHE_SET, "c", encode_key("k"), b"9", hlc=5, node=1)
        >>> decide(Conditional(Mode.ADD, new, lambda: 7), held, 0.0).applied
        False
        >>> decide(Conditional(Mode.INCR, new, lambda: 7, delta=3), held, 0.0).record.data
        b'12'
    """
    live = is_live(current, now)
    record = op.record
    if op.mode is Mode.ADD:
        if live:
            return Outcome(False, current)
    elif op.mode is Mode.IF_VERSION:
        if version_of(current if live else None) != op.expected:
            return Outcome(False, current if live else None)
    else:
        base = 0
        if live:
            assert current is not None
            base = counter_value(current)
        value = base + op.delta
        if abs(value) > MAX_COUNTER:
            raise OverflowError(f"incr: {base} + {op.delta} is beyond ±{MAX_COUNTER}")
        expires = current.expires if live and current is not None else record.expires
        record = record._replace(data=b"%d" % value, expires=expires, codec=JSON_CODEC)
    hlc = op.stamp()
    if current is not None and hlc <= current.hlc:
        hlc = current.hlc + 1  # (never, after a barrier: the clock saw it)
    return Outcome(True, record._replace(hlc=hlc))
