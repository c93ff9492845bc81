"""What Redis answers, read defensively: stream ids, `XINFO STREAM`, `XREAD`
replies and pushes, in RESP2 or RESP3 shape, with keys decoded or not.

Everything Redis answers is untrusted input: these helpers normalise it, and
return None (or an empty list) for what is not there.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = [
    "StreamId",
    "StreamInfo",
    "field",
    "id_before",
    "id_tuple",
    "is_kind",
    "is_no_such_key",
    "parse_info",
    "stream_entries",
    "text",
]

StreamId = tuple[int, int]


class StreamInfo(NamedTuple):
    """What `XINFO STREAM` says, normalised (Redis 6 lacks `deleted` and `added`)."""

    last: StreamId  # last-generated-id
    last_raw: bytes | str
    length: int
    first: StreamId | None  # the oldest entry still there
    deleted: StreamId | None  # max-deleted-entry-id (Redis 7+)
    added: int | None  # entries-added (Redis 7+)


def id_tuple(stream_id: bytes | str) -> StreamId:
    """A stream id as `(ms, seq)`, which compares as Redis orders ids.

    Example:
        >>> id_tuple(b"1700000000000-3")
        (1700000000000, 3)
    """
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def field(mapping: Any, name: str) -> Any:
    """`mapping[name]` whether redis-py decoded the keys (str) or not (bytes).

    Example:
        >>> field({b"length": 3}, "length")
        3
    """
    if isinstance(mapping, (list, tuple)):  # a flat [k, v, k, v] reply
        mapping = dict(zip(mapping[::2], mapping[1::2], strict=False))
    if not isinstance(mapping, dict):
        return None
    value = mapping.get(name)
    return mapping.get(name.encode()) if value is None else value


def parse_info(raw: Any) -> StreamInfo:
    """An `XINFO STREAM` reply as a `StreamInfo`."""
    last_raw = field(raw, "last-generated-id") or b"0-0"
    first_entry = field(raw, "first-entry")
    deleted = field(raw, "max-deleted-entry-id")
    added = field(raw, "entries-added")
    return StreamInfo(
        last=id_tuple(last_raw),
        last_raw=last_raw,
        length=int(field(raw, "length") or 0),
        first=id_tuple(first_entry[0]) if first_entry else None,
        deleted=id_tuple(deleted) if deleted is not None else None,
        added=int(added) if added is not None else None,
    )


def stream_entries(response: Any) -> list[tuple[Any, Any]]:
    """The `(id, fields)` pairs of an XREAD reply on one stream, RESP2 or RESP3."""
    if not response:
        return []
    streams = response.values() if isinstance(response, dict) else [s[1] for s in response]
    out: list[tuple[Any, Any]] = []
    for entries in streams:
        if (
            entries
            and isinstance(entries[0], list)
            and not (entries[0] and isinstance(entries[0][0], bytes | str))
        ):
            entries = entries[0]  # RESP3 nests the entries one level deeper
        out += [(entry[0], entry[1]) for entry in entries]
    return out


def is_kind(response: Any, kind: str) -> bool:
    """Whether a reply on the subscribed connection is a `kind` push (RESP2 or 3)."""
    return (
        isinstance(response, list) and len(response) >= 3 and response[0] in (kind, kind.encode())
    )


def id_before(stream_id: StreamId) -> bytes:
    """The greatest stream id below `stream_id` (an XREAD position just before it).

    Example:
        >>> id_before((5, 0))
        b'4-18446744073709551615'
    """
    ms, seq = stream_id
    if seq:
        return f"{ms}-{seq - 1}".encode()
    return f"{ms - 1}-{(1 << 64) - 1}".encode() if ms else b"0-0"


def text(value: Any) -> str | None:
    """A reply as text (None stays None)."""
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)


def is_no_such_key(exc: BaseException) -> bool:
    """Whether Redis refused a command because the key does not exist."""
    return "no such key" in str(exc).lower()
