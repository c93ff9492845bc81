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
import mmap
import struct
import zlib
from collections.abc import Callable, Container
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
# The header as read, the magic as a number: `_parse` unpacks it into locals
# (one unpacking instead of a subscript per field it uses).
_HEADER = struct.Struct("<HBBIQQQdHHII")
_MAGIC_NUMBER: Final = int.from_bytes(MAGIC, "little")
HEADER_SIZE: Final = _HEADER.size
NODE_OFFSET: Final = struct.calcsize("<2sBBIQQ")  # the sender's node id in a header (8 bytes)
_CHECKED = HEADER_SIZE - 4  # bytes covered by header_crc
_CHECKED_HEADER = struct.Struct("<2sBBIQQQdHHI")  # the header without header_crc
_U32 = struct.Struct("<I")
_crc32 = zlib.crc32
_new_record = tuple.__new__  # builds a Record without NamedTuple's Python-level __new__
MAX_NAME_BYTES: Final = 0xFFFF


class Kind(IntEnum):
    """What a record means."""

    MESSAGE = 1
    CACHE_SET = 2
    CACHE_DELETE = 3
    SNAPSHOT_META = 4
    BATCH = 5  # `data` holds whole frames written together: all or none are read
    SKIPPED = 0
    """Never written: what a `FrameReader` with `wanted` topics hands out in place
    of a message nobody here listens to (its sequence number, no body)."""


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
    # The hot path of every write: one unpacking, one pack of the 48 checked
    # bytes, two concatenations (measured 0.65 us against 0.79 us for packing
    # all 52 bytes and slicing).
    kind, topic, key, data, hlc, node, expires, _, codec = record
    raw = topic.encode()
    body = raw + key + data if key else raw + data
    head = _CHECKED_HEADER.pack(
        MAGIC, kind, codec, len(body), seq, hlc, node, expires, len(raw), len(key), _crc32(body)
    )
    return head + _U32.pack(_crc32(head)) + body


_COLLECT_AT: Final = 256 << 10  # an incomplete frame this large is collected piece by piece


class FrameReader:
    """Incremental frame parser for one byte stream (one segment).

    Feed it bytes as they arrive; it returns the complete, valid records and keeps
    a partial tail for the next feed. Garbage is skipped up to the next header
    that checks out, and counted in `skipped_bytes`.

    Every feed costs about what it is given: the bytes of a large frame are
    collected (and checksummed) as they arrive, and a BATCH frame is given out a
    `limit` at a time, so an event loop never parses megabytes in one callback.

    Example:
        >>> reader = FrameReader(max_body=1024)
        >>> frame = encode_frame(Record(Kind.MESSAGE, "ping", b"", b"1"), seq=1)
        >>> [r.topic for r in reader.feed(b"junk" + frame[:-1])], reader.skipped_bytes
        ([], 4)
        >>> [r.topic for r in reader.feed(frame[-1:])]
        ['ping']
    """

    __slots__ = (
        "_batch",
        "_batch_len",
        "_big",
        "_big_crc",
        "_big_fill",
        "_big_head",
        "_buffer",
        "_checked",
        "_more",
        "_pos",
        "max_body",
        "on_garbage",
        "skipped_bytes",
        "wanted",
    )

    def __init__(self, max_body: int, on_garbage: Callable[[int, str], None] | None = None) -> None:
        self._buffer: bytes | mmap.mmap = b""
        self._pos = 0  # where parsing resumes in `_buffer`
        self._batch: FrameReader | None = None  # a BATCH frame given out in parts
        self._batch_len = 0  # bytes of that frame
        # The body of a large frame being collected: an anonymous mapping, whose
        # pages are zeroed by the kernel as they are first written (a bytearray of
        # 16 MiB is zeroed all at once: milliseconds on the event loop).
        self._big: mmap.mmap | None = None
        self._big_fill = 0
        self._big_crc = 0
        self._big_head = b""  # its header
        self._more = False
        self.max_body = max_body
        self.skipped_bytes = 0
        self.on_garbage = on_garbage
        # The topics (UTF-8) whose messages are wanted; None: every record. A
        # message of another topic is handed out as a `Kind.SKIPPED` record (its
        # sequence number only), without checking or copying its body: a
        # process reads every writer's records, and most are not for it.
        self.wanted: Container[bytes] | None = None
        # False for the frames inside a BATCH, whose bytes the BATCH's own body
        # checksum has just covered: their checksums are not computed again.
        self._checked = True

    @property
    def pending(self) -> int:
        """Bytes held back: an incomplete frame, complete frames not yet given out
        (see `backlog`), and the whole of a BATCH frame given out in part."""
        held = len(self._buffer) - self._pos + self._batch_len
        return held + (HEADER_SIZE + self._big_fill if self._big is not None else 0)

    @property
    def backlog(self) -> bool:
        """True when the last `feed` stopped at its `limit`: call it again."""
        return self._more

    def discard_pending(self) -> int:
        """Drop the incomplete tail (a dead writer's torn record); returns its size."""
        dropped = self.pending
        self._buffer, self._pos = b"", 0
        self._batch, self._batch_len, self._more = None, 0, False
        self._big, self._big_fill = None, 0
        return dropped

    def _held(self) -> bytes:
        """The held bytes of an incomplete frame, as one string (rarely needed)."""
        big = self._big
        head = self._big_head + bytes(big[: self._big_fill]) if big is not None else b""
        return head + bytes(self._buffer[self._pos :])

    def salvage(self) -> list[Record]:
        """Give up on the incomplete frame at the head of the held bytes (its
        length was corrupted or forged while whole frames kept arriving behind
        it) and return the records that follow it. A genuine frame still
        arriving after them stays pending; the skipped bytes count as garbage.

        Example:
            >>> reader = FrameReader(max_body=1 << 20)
            >>> good = encode_frame(Record(Kind.MESSAGE, "ping", b"", b"1"), seq=1)
            >>> forged = encode_frame(Record(Kind.MESSAGE, "x", b"", b"y" * 5000), seq=9)[:52]
            >>> reader.feed(forged + good), reader.pending
            ([], 109)
            >>> [r.topic for r in reader.salvage()], reader.pending, reader.skipped_bytes
            (['ping'], 0, 52)
        """
        if self._batch is not None or not self.pending:
            return []
        buf = self._held()
        self.discard_pending()
        nxt = buf.find(MAGIC, 1)
        skipped = nxt if nxt >= 0 else len(buf)
        self.skipped_bytes += skipped
        if self.on_garbage is not None:
            self.on_garbage(skipped, "a frame whose body never came: corrupted or forged length")
        return self.feed(buf[nxt:]) if nxt >= 0 else []

    def feed(self, data: bytes = b"", limit: int = 0) -> list[Record]:
        """Add `data` and return the records now complete: all of them, or at most
        `limit` (0: no limit). While `backlog` is True, `feed()` gives the rest:
        a caller on an event loop takes a slice at a time, so that no callback
        parses and dispatches a huge batch in one go.

        Example:
            >>> frames = b"".join(
            ...     encode_frame(Record(Kind.MESSAGE, "t", b"", b"%d" % i), i) for i in range(5)
            ... )
            >>> reader = FrameReader(max_body=1024)
            >>> len(reader.feed(frames, limit=2)), reader.backlog
            (2, True)
            >>> len(reader.feed(limit=2)), len(reader.feed(limit=2)), reader.backlog
            (2, 1, False)
        """
        self._more = False
        out: list[Record] = []
        batch = self._batch
        if batch is not None:
            out = batch.feed(b"", limit)
            if batch._more or (limit and len(out) >= limit):
                if not batch._more:
                    self._batch, self._batch_len = None, 0
                self._more = True
                if data:
                    self._append(data)
                return out
            self._batch, self._batch_len = None, 0
        if self._big is not None:
            rest = self._collect(data, out, limit)
            if rest is None:
                return out
            data = rest
        if data:
            self._append(data)
        self._parse(out, limit)
        return out

    def _append(self, data: bytes) -> None:
        pos = self._pos
        buf = self._buffer
        assert isinstance(buf, bytes)  # a mapping is only ever a BATCH body, never fed
        if pos >= len(buf):
            self._buffer, self._pos = data, 0
        elif pos:
            self._buffer, self._pos = buf[pos:] + data, 0
        else:
            self._buffer = buf + data

    def _collect(self, data: bytes, out: list[Record], limit: int) -> bytes | None:
        """Add `data` to the large frame being collected. Once it is complete (and
        handed out into `out`), returns what is left of `data` to parse; None
        while there is nothing more to parse now (still incomplete, or a BATCH
        given out in part: the rest of `data` is kept)."""
        big = self._big
        assert big is not None
        take = len(big) - self._big_fill
        piece = data[:take]
        big[self._big_fill : self._big_fill + len(piece)] = piece
        self._big_fill += len(piece)
        self._big_crc = zlib.crc32(piece, self._big_crc)
        if self._big_fill < len(big):
            return None
        head = _HEADER.unpack_from(self._big_head)
        self._big = None
        self._big_fill = 0
        if self._big_crc != head[10]:
            # Not the frame its header claims: garbage from its second byte on.
            rest = self._big_head + bytes(big) + data[take:]
            self._buffer, self._pos = b"", 0
            self._count_garbage(1, "bad body checksum")
            self._append(rest[1:])
            return b""
        self._frame(head, big, 0, out, limit)
        if self._more:
            self._append(data[take:])
            return None
        return data[take:]

    def _parse(self, out: list[Record], limit: int) -> None:
        buf = self._buffer
        pos = self._pos
        end = len(buf)
        view = memoryview(buf)
        unpack = _HEADER.unpack_from
        crc32 = _crc32
        append = out.append
        kinds = _KINDS.get
        max_body = self.max_body
        wanted = self.wanted
        check = self._checked
        # Every frame of every message read goes through this loop: its common
        # case (a frame that is not a BATCH) is inlined rather than a call.
        try:
            while end - pos >= HEADER_SIZE:
                if limit and len(out) >= limit:
                    self._more = True
                    break
                head = unpack(buf, pos)
                (
                    magic,
                    kind_number,
                    codec,
                    body_len,
                    seq,
                    hlc,
                    node,
                    expires,
                    topic_len,
                    key_len,
                    body_crc,
                    head_crc,
                ) = head
                if magic != _MAGIC_NUMBER:
                    pos = self._resync(buf, pos + 1, "bad magic")
                    continue
                kind = kinds(kind_number)
                if (
                    (check and crc32(view[pos : pos + _CHECKED]) != head_crc)
                    or body_len > max_body
                    or topic_len + key_len > body_len
                    or kind is None
                ):
                    pos = self._resync(buf, pos + 1, "bad header")
                    continue
                start = pos + HEADER_SIZE
                stop = start + body_len
                if (
                    wanted is not None
                    and kind is _MESSAGE
                    and stop <= end
                    and buf[start : start + topic_len] not in wanted
                    # Still checked: a forged length must not swallow the frames
                    # behind it (a bad body resyncs, below, as for any frame).
                    and (not check or crc32(view[start:stop]) == body_crc)
                ):
                    append(_new_record(Record, (_SKIPPED, "", b"", b"", 0, 0, 0.0, seq, codec)))
                    pos = stop
                    continue
                if stop > end:
                    if body_len >= _COLLECT_AT:
                        # Collect it as it arrives instead of holding (and copying)
                        # an ever longer buffer.
                        self._big = mmap.mmap(-1, body_len)
                        self._big_head = bytes(view[pos:start])
                        self._big_fill, self._big_crc = 0, 0
                        pos = end
                        view.release()
                        self._buffer, self._pos = b"", 0
                        self._collect(bytes(buf[start:end]), out, limit)
                        return
                    break  # the rest of this frame has not arrived yet
                if check and crc32(view[start:stop]) != body_crc:
                    pos = self._resync(buf, pos + 1, "bad body checksum")
                    continue
                if kind is _BATCH:
                    if not self._frame(head, buf, start, out, limit):
                        pos = self._resync(buf, pos + 1, "bad topic")
                        continue
                    pos = stop
                    if self._batch is not None:
                        break
                    continue
                key_at = start + topic_len
                data_at = key_at + key_len
                try:
                    topic = str(buf[start:key_at], "utf-8")
                except UnicodeDecodeError:
                    pos = self._resync(buf, pos + 1, "bad topic")
                    continue
                # Slices of bytes (or of a mapping) are bytes already.
                append(
                    _new_record(
                        Record,
                        (
                            kind,
                            topic,
                            buf[key_at:data_at],
                            buf[data_at:stop],
                            hlc,
                            node,
                            expires,
                            seq,
                            codec,
                        ),
                    )
                )
                pos = stop
        finally:
            view.release()
        if self._big is None:
            self._buffer, self._pos = (b"", 0) if pos >= end else (buf, pos)

    def _frame(
        self,
        head: tuple[Any, ...],
        buf: bytes | mmap.mmap,
        start: int,
        out: list[Record],
        limit: int,
    ) -> bool:
        """Hand out the checked frame whose body starts at `buf[start]`; False if
        its topic is not UTF-8."""
        kind, codec, body_len, seq, hlc, node, expires, topic_len, key_len = head[1:10]
        key_at = start + topic_len
        data_at = key_at + key_len
        try:
            topic = str(buf[start:key_at], "utf-8")
        except UnicodeDecodeError:
            return False
        if kind == 5:  # Kind.BATCH: its frames are complete by construction
            inner = FrameReader(self.max_body, self.on_garbage)
            inner.wanted = self.wanted
            inner._checked = False  # the BATCH's checksum covered every byte
            inner._buffer, inner._pos = buf, data_at
            inner._parse_bounded(start + body_len)
            out.extend(inner.feed(b"", limit and limit - len(out)))
            if inner._more:  # given out in parts: the frame stays pending
                self._batch, self._batch_len, self._more = inner, HEADER_SIZE + body_len, True
            return True
        out.append(
            Record(
                _KINDS[kind],
                topic,
                bytes(buf[key_at:data_at]),
                bytes(buf[data_at : start + body_len]),
                hlc,
                node,
                expires,
                seq,
                codec,
            )
        )
        return True

    def _parse_bounded(self, end: int) -> None:
        """Limit this (inner) reader to `_buffer[:end]`: the body of its BATCH."""
        if end < len(self._buffer):
            # A BATCH body inside a larger buffer: its own copy, once.
            self._buffer, self._pos = self._buffer[self._pos : end], 0

    def _count_garbage(self, skipped: int, why: str) -> None:
        self.skipped_bytes += skipped
        if self.on_garbage is not None:
            self.on_garbage(skipped, why)

    def _resync(self, buf: bytes | mmap.mmap, start: int, why: str) -> int:
        found = buf.find(MAGIC, start)
        nxt = found if found >= 0 else max(start, len(buf) - 1)
        self._count_garbage(nxt - (start - 1), why)
        return nxt


_KINDS: Final = {int(k): k for k in Kind if k is not Kind.SKIPPED}  # on disk
_SKIPPED: Final = Kind.SKIPPED
_MESSAGE: Final = Kind.MESSAGE
_BATCH: Final = Kind.BATCH  # a module global: `Kind.BATCH` is a class lookup of ~75 ns


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
    """Inverse of `encode_key`; `ValueError` for bytes it cannot have made.

    Example:
        >>> decode_key(b"i1"), decode_key(b"s1")
        (1, '1')
    """
    tag = raw[:1]
    if tag == b"s":
        return raw[1:].decode()
    if tag == b"i":
        return int(raw[1:])
    raise ValueError(f"not an encoded cache key: {raw[:40]!r}")


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


_encode_str = json.encoder.encode_basestring
_JSON_PROBE: Final = {"a": [1, 2.5, None, True], "é": "\u2713\n"}


def _checked_c_encoder(factory: Any) -> Callable[[Callable[[Any], Any]], Any] | None:
    """A maker of C JSON encoders from `json.encoder.c_make_encoder`, or None.

    The C encoder is a private CPython API, called with nine positional
    arguments (what `JSONEncoder.iterencode` passes it); encoding through it
    skips the Python layers of `JSONEncoder.encode`, a third of the cost of a
    small message. It is used only if, built that way, it encodes a probe as
    the public encoder does; otherwise (a Python without it, or where it
    changed) `JsonCodec` uses the public `JSONEncoder.encode`: the same bytes.
    This is the one place that calls it.
    """
    if factory is None:
        return None
    public = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    def make(default: Callable[[Any], Any]) -> Any:
        return factory({}, default, _encode_str, None, ":", ",", False, False, False)

    try:
        same = "".join(make(public.default)(_JSON_PROBE, 0)) == public.encode(_JSON_PROBE)
    except Exception:  # a changed signature, a different result type
        return None
    return make if same else None


# None: the public encoder (see `_checked_c_encoder`).
_c_encoder = _checked_c_encoder(getattr(json.encoder, "c_make_encoder", None))


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
        decoder = json.JSONDecoder()
        self._decode = decoder.decode
        self._scan: Callable[[str, int], tuple[Any, int]] = decoder.scan_once  # type: ignore[attr-defined]
        # C encoders ready for use, each with its own `markers` dict: one is taken
        # for a call (list.pop and append are atomic, so two threads never share
        # one) and given back only if the call succeeded, since a failing call
        # leaves entries in its markers. Making one costs 0.4 us of the 1.5 us
        # that encoding a small message takes.
        self._encoders: list[Any] = []

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
        new_encoder = _c_encoder
        if new_encoder is None:
            try:
                return self._encode(value).encode()
            except ValueError as exc:  # circular references, NaN
                raise TypeError(f"value cannot be encoded as JSON: {exc}") from exc
        # What `JSONEncoder.encode` does, minus its Python layers (a third of the
        # cost of a small message).
        encoders = self._encoders
        try:
            make = encoders.pop()
        except IndexError:
            make = new_encoder(self._default)
        try:
            out = "".join(make(value, 0)).encode()
        except ValueError as exc:  # circular references, NaN
            raise TypeError(f"value cannot be encoded as JSON: {exc}") from exc
        encoders.append(make)
        return out

    def loads(self, data: bytes) -> Any:
        """Decode JSON bytes.

        Example:
            >>> JsonCodec().loads(b'{"name":"Ana"}')
            {'name': 'Ana'}
        """
        text = data.decode()
        # The C scanner directly (what `json.loads` ends in, minus two regular
        # expressions and two Python calls: 0.9 us instead of 1.7 us for a small
        # message); anything but one value with nothing around it (whitespace,
        # errors) goes through the full decoder, which decides as it always did.
        try:
            value, end = self._scan(text, 0)
        except StopIteration:
            return self._decode(text)
        if end != len(text):
            return self._decode(text)
        return value


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
