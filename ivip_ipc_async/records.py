"""The record type, its framing on disk, and the codecs for payloads.

A record is what travels between processes: a message (`notify`), a cache write
(`set`) or a cache delete. On disk every record is one *frame*::

    header (52 bytes, little endian)
      magic        2s   b"\\xa9\\x1c"
      kind         B    1 message, 2 cache set, 3 cache delete, 4 snapshot meta,
                        5 batch (the data is whole frames, written in one go)
      codec        B    id of the codec that encoded `data`
      body_len     I    len(topic) + len(key) + len(data)
      seq          Q    per-writer sequence number, 1, 2, 3 ... across segments
      hlc          Q    hybrid logical clock of the write
      node         Q    the writer's node id (tie-break for last-writer-wins)
      expires      d    wall-clock expiry (time.time()), 0.0 = never
      topic_len    H    bytes of topic (event name or cache name), UTF-8
      key_len      H    bytes of key (cache key, see `encode_key`)
      body_crc     I    CRC-32 of the body
      header_crc   I    CRC-32 of the 48 header bytes before it
    body: topic, key, data

The header has its own checksum so a corrupted length is caught before the
reader waits for a body that will never come.
"""

from __future__ import annotations

import json
import json.encoder
import struct
import zlib
from collections.abc import Callable
from enum import IntEnum
from typing import Any, Final, NamedTuple, Protocol

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "NODE_OFFSET",
    "Codec",
    "FrameReader",
    "JsonCodec",
    "Kind",
    "OrjsonCodec",
    "Record",
    "codec_named",
    "decode_key",
    "encode_frame",
    "encode_key",
]

MAGIC: Final = b"\xa9\x1c"
_HEADER = struct.Struct("<2sBBIQQQdHHII")
HEADER_SIZE: Final = _HEADER.size
NODE_OFFSET: Final = struct.calcsize("<2sBBIQQ")  # the sender's node id in a header (8 bytes)
_CHECKED = HEADER_SIZE - 4  # bytes covered by header_crc
MAX_NAME_BYTES: Final = 0xFFFF


class Kind(IntEnum):
    """What a record means."""

    MESSAGE = 1
    CACHE_SET = 2
    CACHE_DELETE = 3
    SNAPSHOT_META = 4
    BATCH = 5  # `data` holds whole frames written together: all or none are read


class Record(NamedTuple):
    """One decoded record. `data` is still encoded by the codec named in `codec`.

    A named tuple: records are created for every message sent and received, and
    a tuple is the cheapest immutable object Python builds.
    """

    kind: Kind
    topic: str
    key: bytes
    data: bytes
    hlc: int = 0
    node: int = 0
    expires: float = 0.0
    seq: int = 0
    codec: int = 1

    @property
    def size(self) -> int:
        """Bytes this record takes in a frame."""
        return HEADER_SIZE + len(self.topic.encode()) + len(self.key) + len(self.data)


def encode_frame(record: Record, seq: int) -> bytes:
    """Frame `record` with sequence number `seq`.

    Example:
        >>> frame = encode_frame(Record(Kind.MESSAGE, "ping", b"", b"1"), seq=1)
        >>> len(frame)
        57
    """
    topic = record.topic.encode()
    body = topic + record.key + record.data
    head = _HEADER.pack(
        MAGIC,
        record.kind,
        record.codec,
        len(body),
        seq,
        record.hlc,
        record.node,
        record.expires,
        len(topic),
        len(record.key),
        zlib.crc32(body),
        0,
    )[:_CHECKED]
    return head + zlib.crc32(head).to_bytes(4, "little") + body


class FrameReader:
    """Incremental frame parser for one byte stream (one segment).

    Feed it bytes as they arrive; it returns the complete, valid records and keeps
    a partial tail for the next feed. Garbage is skipped up to the next header
    that checks out, and counted in `skipped_bytes`.

    Example:
        >>> reader = FrameReader(max_body=1024)
        >>> frame = encode_frame(Record(Kind.MESSAGE, "ping", b"", b"1"), seq=1)
        >>> [r.topic for r in reader.feed(b"junk" + frame[:-1])], reader.skipped_bytes
        ([], 4)
        >>> [r.topic for r in reader.feed(frame[-1:])]
        ['ping']
    """

    __slots__ = ("_buffer", "max_body", "on_garbage", "skipped_bytes")

    def __init__(self, max_body: int, on_garbage: Callable[[int, str], None] | None = None) -> None:
        self._buffer = b""
        self.max_body = max_body
        self.skipped_bytes = 0
        self.on_garbage = on_garbage

    @property
    def pending(self) -> int:
        """Bytes held back as an incomplete frame."""
        return len(self._buffer)

    def discard_pending(self) -> int:
        """Drop the incomplete tail (a dead writer's torn record); returns its size."""
        dropped = len(self._buffer)
        self._buffer = b""
        return dropped

    def feed(self, data: bytes) -> list[Record]:
        """Add `data` and return every record now complete."""
        buf = self._buffer + data if self._buffer else data
        out: list[Record] = []
        pos = 0
        end = len(buf)
        unpack = _HEADER.unpack_from
        crc32 = zlib.crc32
        while end - pos >= HEADER_SIZE:
            if buf[pos : pos + 2] != MAGIC:
                pos = self._resync(buf, pos + 1, "bad magic")
                continue
            (
                _m,
                kind,
                codec,
                body_len,
                seq,
                hlc,
                node,
                expires,
                topic_len,
                key_len,
                body_crc,
                header_crc,
            ) = unpack(buf, pos)
            if (
                crc32(buf[pos : pos + _CHECKED]) != header_crc
                or body_len > self.max_body
                or topic_len + key_len > body_len
                or kind not in _KINDS
            ):
                pos = self._resync(buf, pos + 1, "bad header")
                continue
            start = pos + HEADER_SIZE
            stop = start + body_len
            if stop > end:
                break  # the rest of this frame has not arrived yet
            body = buf[start:stop]
            if crc32(body) != body_crc:
                pos = self._resync(buf, pos + 1, "bad body checksum")
                continue
            try:
                topic = body[:topic_len].decode()
            except UnicodeDecodeError:
                pos = self._resync(buf, pos + 1, "bad topic")
                continue
            if kind == 5:  # Kind.BATCH: its frames are complete by construction
                out.extend(
                    FrameReader(self.max_body, self.on_garbage).feed(body[topic_len + key_len :])
                )
                pos = stop
                continue
            out.append(
                Record(
                    _KINDS[kind],
                    topic,
                    body[topic_len : topic_len + key_len],
                    body[topic_len + key_len :],
                    hlc,
                    node,
                    expires,
                    seq,
                    codec,
                )
            )
            pos = stop
        self._buffer = buf[pos:]
        return out

    def _resync(self, buf: bytes, start: int, why: str) -> int:
        found = buf.find(MAGIC, start)
        nxt = found if found >= 0 else max(start, len(buf) - 1)
        skipped = nxt - (start - 1)
        self.skipped_bytes += skipped
        if self.on_garbage is not None:
            self.on_garbage(skipped, why)
        return nxt


_KINDS: Final = {int(k): k for k in Kind}


# -- cache keys ---------------------------------------------------------------

CacheKey = str | int


def encode_key(key: CacheKey) -> bytes:
    """Encode a cache key so that `1` and `"1"` stay distinct.

    Example:
        >>> encode_key(1), encode_key("1")
        (b'i1', b's1')
    """
    if type(key) is str:
        out = b"s" + key.encode()
    elif type(key) is int:
        out = b"i%d" % key
    elif isinstance(key, str | int) and not isinstance(key, bool):
        return encode_key(str(key) if isinstance(key, str) else int(key))
    else:
        raise TypeError(f"cache keys must be str or int, not {type(key).__name__}")
    if len(out) > MAX_NAME_BYTES:
        raise ValueError(f"cache key too long: {len(out)} bytes, the limit is {MAX_NAME_BYTES}")
    return out


def decode_key(raw: bytes) -> CacheKey:
    """Inverse of `encode_key`."""
    if raw[:1] == b"i":
        return int(raw[1:])
    return raw[1:].decode()


# -- codecs ---------------------------------------------------------------------


class Codec(Protocol):
    """Turns messages and cache values into bytes and back.

    `id` is written in every record so that a peer using another codec is
    detected instead of misread. `dumps` must raise `TypeError` for values it
    cannot encode. Every process of a namespace must use codecs of one id.

    Example:
        A codec for values that JSON cannot carry as they are (here, sets):

        >>> import json
        >>> class SetCodec:
        ...     id = 42  # any number but 1 (JSON); the same in every process
        ...     def dumps(self, value):
        ...         if isinstance(value, set):
        ...             value = {"set": sorted(value)}
        ...         return json.dumps(value).encode()  # raises TypeError when it cannot
        ...     def loads(self, data):
        ...         value = json.loads(data)
        ...         is_set = isinstance(value, dict) and "set" in value
        ...         return set(value["set"]) if is_set else value
        >>> codec: Codec = SetCodec()
        >>> codec.loads(codec.dumps({3, 1}))
        {1, 3}
        >>> from ivip_ipc_async import AsyncIPC
        >>> AsyncIPC("/tmp/unused", codec=SetCodec()).codec.id
        42
    """

    id: int

    def dumps(self, value: Any) -> bytes:
        """Encode `value`; raise `TypeError` when it cannot be encoded.

        Example:
            >>> JsonCodec().dumps([1, "a"])
            b'[1,"a"]'
        """
        ...

    def loads(self, data: bytes) -> Any:
        """Decode what `dumps` wrote, in any process; never executes anything.

        Example:
            >>> JsonCodec().loads(b'{"a":1}')
            {'a': 1}
        """
        ...


_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_encode_str = json.encoder.encode_basestring


class JsonCodec:
    """The default codec: strict JSON, so nothing from the directory is ever executed.

    NaN and infinities are refused (they are not JSON), which keeps the bytes
    readable by any JSON parser, `OrjsonCodec` included.

    Example:
        >>> JsonCodec().loads(JsonCodec().dumps({"id": 7}))
        {'id': 7}
    """

    id = 1

    def __init__(self) -> None:
        encoder = json.JSONEncoder(
            ensure_ascii=False, separators=(",", ":"), check_circular=True, allow_nan=False
        )
        self._encode = encoder.encode
        self._default = encoder.default
        self._decode = json.JSONDecoder().decode

    def dumps(self, value: Any) -> bytes:
        """Compact UTF-8 JSON; `TypeError` for what JSON cannot encode (NaN included).

        Example:
            >>> JsonCodec().dumps({"name": "Ana", "ids": [1, 2]})
            b'{"name":"Ana","ids":[1,2]}'
            >>> JsonCodec().dumps(float("nan"))
            Traceback (most recent call last):
            ...
            TypeError: value cannot be encoded as JSON: Out of range float values ...
        """
        try:
            if _c_make_encoder is None:
                return self._encode(value).encode()
            # What `JSONEncoder.encode` does, minus its Python layers (a third of
            # the cost of a small message); a fresh `markers` dict each call, as
            # it has, since the C encoder leaves entries behind when it fails.
            make = _c_make_encoder(
                {}, self._default, _encode_str, None, ":", ",", False, False, False
            )
            return "".join(make(value, 0)).encode()
        except ValueError as exc:  # circular references, NaN
            raise TypeError(f"value cannot be encoded as JSON: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        """Decode JSON bytes.

        Example:
            >>> JsonCodec().loads(b'{"name":"Ana"}')
            {'name': 'Ana'}
        """
        return self._decode(data.decode())


class OrjsonCodec:
    """JSON through orjson: the same bytes on the wire, about 10x faster to encode.

    Interoperates with `JsonCodec` (same id: processes may mix them). It also
    encodes what orjson supports natively (datetime, UUID, dataclasses, enums),
    which decode as plain JSON values. Install with `ivip-ipc-async[fast]`.

    Example:
        >>> OrjsonCodec().loads(OrjsonCodec().dumps({"id": 7, 1: "int key"}))
        {'id': 7, '1': 'int key'}
    """

    id = 1

    def __init__(self) -> None:
        import orjson

        option = orjson.OPT_NON_STR_KEYS
        self._orjson_dumps = orjson.dumps
        self._option = option
        self.loads: Callable[[bytes], Any] = orjson.loads

    def dumps(self, value: Any) -> bytes:
        """The JSON bytes `JsonCodec` writes; `TypeError` for what orjson cannot encode.

        Example:
            >>> OrjsonCodec().dumps({"id": 7}) == JsonCodec().dumps({"id": 7})
            True
        """
        return self._orjson_dumps(value, option=self._option)  # its errors are TypeErrors


def codec_named(name: str) -> Codec:
    """The codec for a name: "json" or "orjson" (as in `IVIP_IPC_CODEC`).

    Example:
        >>> codec_named("json").id
        1
    """
    if name == "json":
        return JsonCodec()
    if name == "orjson":
        return OrjsonCodec()
    raise ValueError(f"unknown codec {name!r}: use 'json' or 'orjson', or pass a Codec")
