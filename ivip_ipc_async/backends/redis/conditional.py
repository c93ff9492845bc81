"""Conditional cache writes on Redis: one script, one round trip.

`ConditionalWrites.write_if` packs the `CONDITIONAL` script's `EVALSHA` (the
header's fields as bytes, so no number above 2**53 passes through Lua's
doubles) and sends it through the writer, in order with this process's other
writes (`Writer.alone`). The script decides by the rule of `conditions.decide`
on the entry's hash, and stores and publishes like any cache write, so the
mirrors converge on what Redis holds. Its answer is the frame stored (applied
here at once) or the entry that refused it (given to this mirror too, so a
`get` right after a lost `add` shows the winner).
"""

from __future__ import annotations

import struct
import time
import zlib
from typing import Final

from ...conditions import Conditional, Mode, Outcome, is_live
from ...records import MAGIC, FrameReader
from .scripts import CONDITIONAL_SHA
from .settings import Shared
from .writer import Writer, _bulks

__all__ = ["ConditionalWrites"]

_U64: Final = struct.Struct("<Q")
_F64: Final = struct.Struct("<d")


class ConditionalWrites:
    """`write_if` of the Redis backend.

    Args:
        shared: What the backend's parts share (settings, sink).
        writer: The writer (sequence numbers, the write connection, order).
    """

    def __init__(self, shared: Shared, writer: Writer) -> None:
        self._shared = shared
        self._settings = shared.settings
        self._writer = writer

    async def write_if(self, op: Conditional) -> Outcome:
        settings = self._settings
        record = op.record
        topic = record.topic.encode()
        if op.mode is Mode.INCR:
            data = b"%d" % op.delta
            crc = zlib.crc32(topic + record.key)  # the script goes on over the digits
        else:
            data = record.data
            crc = zlib.crc32(topic + record.key + data)
        expires_ms = int(record.expires * 1000) if record.expires else 0
        entry_key = settings.entry_key(record.topic, record.key)

        def request(seq: int) -> bytes:
            hlc = op.stamp()  # read at the send: after every write of this process before it
            frame_size = len(topic) + len(record.key) + len(data) + 52
            maxlen = min(
                settings.stream_maxlen, max(1, (settings.stream_max_bytes >> 1) // frame_size)
            )
            parts = [
                b"EVALSHA", CONDITIONAL_SHA.encode(), b"3", entry_key, settings.stream_key.encode(),
                settings.index_key.encode(),
                op.mode.value.encode(),
                MAGIC + bytes((record.kind, record.codec if op.mode is not Mode.INCR else 1)),
                _U64.pack(seq), _U64.pack(hlc), b"%020d" % hlc,
                _U64.pack(record.node), b"%020d" % record.node,
                _F64.pack(record.expires), b"%d" % expires_ms,
                topic, record.key, data, (op.expected or "").encode(),
                b"%d" % int(time.time() * 1000), b"%d" % maxlen, settings.channel.encode(),
                b"%d" % int(settings.state_ttl * 1000), b"%d" % crc,
                b"%d" % len(settings.entry_prefix),
            ]  # fmt: skip
            return _bulks(parts, len(parts))

        reply = await self._writer.alone(request)
        status = int(reply[0])
        if status == -1:
            raise TypeError("incr: the key holds a value that is not an integer")
        if status == -2:
            raise OverflowError("incr: the result is beyond ±(2**53 - 1)")
        frame = reply[1] if len(reply) > 1 else b""
        records = FrameReader(settings.max_record_size, self._shared.garbage).feed(frame)
        stored = records[0] if records else None
        sink = self._shared.sink
        if stored is not None and sink is not None:
            sink.written([stored])  # applied here (a refusal's: the winner, seen at once)
        if status == 1:
            return Outcome(True, stored)
        return Outcome(False, stored if is_live(stored, time.time()) else None)
