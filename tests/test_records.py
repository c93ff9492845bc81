"""Framing, the incremental reader, keys, codec, clock and the LWW mirror (one layer each)."""

from __future__ import annotations

import gc
import json
import random
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivip_ipc_async.clock import HybridLogicalClock
from ivip_ipc_async.mirror import SHARDS, Mirror
from ivip_ipc_async.records import (
    HEADER_SIZE,
    FrameReader,
    JsonCodec,
    Kind,
    Record,
    decode_key,
    encode_frame,
    encode_key,
)

records = st.builds(
    Record,
    kind=st.sampled_from([Kind.MESSAGE, Kind.CACHE_SET, Kind.CACHE_DELETE]),
    topic=st.text(max_size=40),
    key=st.binary(max_size=40),
    data=st.binary(max_size=300),
    hlc=st.integers(0, 2**63),
    node=st.integers(0, 2**63),
    expires=st.floats(0, 2e9),
    seq=st.just(0),
    codec=st.just(1),
)


def frames(recs: list[Record]) -> bytes:
    return b"".join(encode_frame(r, i + 1) for i, r in enumerate(recs))


def same(a: Record, b: Record) -> bool:
    return (a.kind, a.topic, a.key, a.data, a.hlc, a.node, a.expires) == (
        b.kind,
        b.topic,
        b.key,
        b.data,
        b.hlc,
        b.node,
        b.expires,
    )


@given(st.lists(records, max_size=20), st.data())
def test_any_split_of_the_stream_gives_the_same_records(
    recs: list[Record], data: st.DataObject
) -> None:
    blob = frames(recs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=8)))
    reader = FrameReader(max_body=1 << 20)
    out: list[Record] = []
    last = 0
    for cut in [*cuts, len(blob)]:
        out += reader.feed(blob[last:cut])
        last = cut
    assert len(out) == len(recs)
    assert all(same(a, b) for a, b in zip(out, recs, strict=True))
    assert [r.seq for r in out] == list(range(1, len(recs) + 1))
    assert reader.pending == 0
    assert reader.skipped_bytes == 0


@settings(max_examples=300)
@given(st.lists(records, min_size=1, max_size=10), st.data())
def test_corruption_is_never_delivered_as_valid(recs: list[Record], data: st.DataObject) -> None:
    blob = bytearray(frames(recs))
    flips = data.draw(st.lists(st.integers(0, len(blob) * 8 - 1), min_size=1, max_size=3))
    for bit in flips:
        blob[bit // 8] ^= 1 << (bit % 8)
    out = FrameReader(max_body=1 << 20).feed(bytes(blob))
    originals = {(r.topic, r.key, r.data, r.hlc, r.node, i + 1) for i, r in enumerate(recs)}
    for r in out:  # everything delivered is one of the records that was written
        assert (r.topic, r.key, r.data, r.hlc, r.node, r.seq) in originals


@given(st.lists(records, min_size=2, max_size=10), st.binary(min_size=1, max_size=200))
def test_garbage_between_records_is_skipped(recs: list[Record], junk: bytes) -> None:
    head, tail = recs[:1], recs[1:]
    blob = frames(head) + junk + b"".join(encode_frame(r, i + 2) for i, r in enumerate(tail))
    reported: list[int] = []
    reader = FrameReader(max_body=1 << 20, on_garbage=lambda n, why: reported.append(n))
    out = reader.feed(blob)
    # Every intact record after the junk comes through (the junk may at worst
    # swallow nothing: frames are found again by their checked header).
    assert [r.seq for r in out][-len(tail) :] == [i + 2 for i in range(len(tail))]
    assert same(out[0], head[0])


def test_truncated_tail_waits_then_completes() -> None:
    frame = encode_frame(Record(Kind.MESSAGE, "e", b"", b'"x"'), 1)
    reader = FrameReader(max_body=1024)
    assert reader.feed(frame[: HEADER_SIZE - 1]) == []
    assert reader.pending == HEADER_SIZE - 1
    assert reader.feed(frame[HEADER_SIZE - 1 : -1]) == []
    assert [r.topic for r in reader.feed(frame[-1:])] == ["e"]
    assert reader.discard_pending() == 0


def test_oversized_length_is_rejected_as_garbage() -> None:
    big = encode_frame(Record(Kind.MESSAGE, "e", b"", b"x" * 2000), 1)
    small = encode_frame(Record(Kind.MESSAGE, "ok", b"", b"1"), 2)
    reader = FrameReader(max_body=1024)
    out = reader.feed(big + small)
    assert [r.topic for r in out] == ["ok"]
    assert reader.skipped_bytes >= len(big)


def test_keys_keep_their_type() -> None:
    for key in (0, 1, -5, 2**70, "", "1", "ü/\x00", "a" * 1000):
        assert decode_key(encode_key(key)) == key
        assert type(decode_key(encode_key(key))) is type(key)
    assert encode_key(1) != encode_key("1")
    with pytest.raises(TypeError):
        encode_key(True)
    with pytest.raises(TypeError):
        encode_key(1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too long"):
        encode_key("x" * 70_000)


def test_json_codec() -> None:
    codec = JsonCodec()
    assert codec.loads(codec.dumps({"a": [1, "ü", None]})) == {"a": [1, "ü", None]}
    with pytest.raises(TypeError):
        codec.dumps(object())
    loop: dict[str, object] = {}
    loop["self"] = loop
    with pytest.raises(TypeError):
        codec.dumps(loop)


def test_a_cyclic_message_is_refused_at_its_first_repetition() -> None:
    """A cycle is a `TypeError` as soon as it repeats, on any stack: an encoder
    without circular-reference bookkeeping recursed to the recursion limit and,
    with a high limit or in a thread with a small stack, crashed the process
    (SIGSEGV) before reaching it. In a child process, so a crash is seen."""
    code = textwrap.dedent(
        """
        import sys, threading
        from ivip_ipc_async.records import JsonCodec
        sys.setrecursionlimit(100_000)
        threading.stack_size(512 * 1024)
        codec, out = JsonCodec(), []
        def encode():
            loop = []
            loop.append(loop)
            try:
                codec.dumps({"a": loop})
            except TypeError as exc:
                out.append(str(exc))
        for run in (encode, lambda: threading.Thread(target=encode).start()):
            run()
        while threading.active_count() > 1:
            pass
        print(out)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.count("Circular reference") == 2, done.stdout


def test_json_codec_fast_paths_say_what_the_stdlib_says() -> None:
    """`dumps` reuses its C encoders and `loads` calls the C scanner directly:
    the same values and the same errors as `json`, whatever came before."""
    codec = JsonCodec()
    shared = [1, 2]
    for _ in range(3):  # an encoder is reused only after a call that succeeded
        loop: list[object] = [shared]
        loop.append(loop)
        with pytest.raises(TypeError, match="Circular"):
            codec.dumps(loop)
        assert codec.dumps([shared, shared, {"a": shared}]) == b'[[1,2],[1,2],{"a":[1,2]}]'
        with pytest.raises(TypeError):
            codec.dumps({"x": object()})
        assert codec.dumps({"x": shared}) == b'{"x":[1,2]}'
    for text in (b' {"a": 1} ', b"[1]\n", b"\t2", b'"\xc3\xbc"', b"NaN", b"-0.5e3"):
        assert codec.loads(text) == json.loads(text) or text == b"NaN"
    for bad in (b"", b"   ", b"[1] [2]", b'{"a":}', b"[1,", b"tru"):
        with pytest.raises(json.JSONDecodeError) as ours:
            codec.loads(bad)
        with pytest.raises(json.JSONDecodeError) as theirs:
            json.loads(bad)
        assert str(ours.value) == str(theirs.value)


def test_clock_is_monotonic_and_follows_peers() -> None:
    now = [1000]
    clock = HybridLogicalClock(now_ms=lambda: now[0])
    stamps = [clock.tick() for _ in range(100)]
    assert stamps == sorted(set(stamps))
    now[0] = 500  # the wall clock steps back: the HLC does not
    assert clock.tick() > stamps[-1]
    clock.observe((9000 << 16) + 5)
    assert clock.tick() > (9000 << 16) + 5


def _set(key: str, value: bytes, hlc: int, node: int) -> Record:
    return Record(Kind.CACHE_SET, "c", encode_key(key), value, hlc, node)


def _delete(key: str, hlc: int, node: int) -> Record:
    return Record(Kind.CACHE_DELETE, "c", encode_key(key), b"", hlc, node)


@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from("abc"), st.integers(0, 20), st.integers(0, 3)),
        max_size=30,
    ),
    st.randoms(),
)
def test_mirror_converges_whatever_the_order(
    ops: list[tuple[bool, str, int, int]], rnd: random.Random
) -> None:
    recs = [_set(k, b"%d" % h, h, n) if is_set else _delete(k, h, n) for is_set, k, h, n in ops]
    a, b = Mirror(), Mirror()
    for r in recs:
        a.apply(r)
    shuffled = recs * 2  # applied twice, in another order
    rnd.shuffle(shuffled)
    for r in shuffled:
        b.apply(r)

    def state(m: Mirror) -> dict[object, tuple[int, int, bytes, Kind]]:
        records = {k: m.lookup("c", k) for shard in m.caches.get("c", []) for k in shard}
        return {
            k: (e.record.hlc, e.record.node, e.record.data, e.record.kind)
            for k, e in records.items()
            if e is not None
        }

    assert state(a) == state(b)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([Kind.CACHE_SET, Kind.CACHE_DELETE, Kind.MESSAGE]),
            st.sampled_from(["c", "d"]),
            st.sampled_from([b"sa", b"sb", b"i1", b"i01", b"x", b"s\xff", b""]),
            st.integers(0, 9),
            st.integers(0, 2),
            st.sampled_from([0.0, -0.0, 5.0, -1.0, float("nan"), 2e9]),
            st.sampled_from([1, 1, 1, 7]),
        ),
        max_size=40,
    ),
    st.integers(0, 40),
)
def test_a_restore_in_bulk_is_a_series_of_applies(
    ops: list[tuple[Kind, str, bytes, int, int, float, int]], cut: int
) -> None:
    """`Mirror.restore` (a joiner's slices) inserts new keys inline and hands the
    rest to `apply`: the state, the size and the clock it returns are those of
    applying the records of the codec one by one."""
    recs = [
        Record(
            kind,
            topic,
            key,
            b"%d" % hlc if kind is Kind.CACHE_SET else b"",
            hlc,
            node,
            exp,
            3,
            codec,
        )
        for kind, topic, key, hlc, node, exp, codec in ops
    ]
    one, bulk = Mirror(), Mirror()
    for rec in recs:
        if rec.kind is not Kind.MESSAGE and rec.codec == 1:
            one.apply(rec)
    top = bulk.restore(recs[:cut], codec_id=1) if cut else 0
    top = max(top, bulk.restore(recs[cut:], codec_id=1))
    assert top == max(
        (r.hlc for r in recs if r.kind is not Kind.MESSAGE and r.codec == 1), default=0
    )

    def state(m: Mirror) -> dict[tuple[str, object], bytes]:
        return {(n, k): st for n, shards in m.caches.items() for e in shards for k, st in e.items()}

    assert state(bulk) == state(one)
    assert (bulk.nbytes, bulk.rejected) == (one.nbytes, one.rejected)


def test_mirror_expiry_becomes_tombstone_and_is_forgotten() -> None:
    m = Mirror(tombstone_ttl=10)
    m.apply(Record(Kind.CACHE_SET, "c", encode_key("k"), b"1", hlc=(1000 << 16), expires=5.0))
    assert m.expire("c", now=6.0) == 1
    entry = m.lookup("c", "k")
    assert entry is not None
    assert entry.deleted
    # a late copy of the same write cannot resurrect it
    late = Record(Kind.CACHE_SET, "c", encode_key("k"), b"1", hlc=(1000 << 16), expires=5.0)
    assert not m.apply(late)
    assert m.compact(now=1000 + 11) == 1
    assert m.lookup("c", "k") is None


def test_json_codec_refuses_nan_so_any_json_parser_reads_it() -> None:
    with pytest.raises(TypeError, match="JSON"):
        JsonCodec().dumps(float("nan"))


def test_orjson_codec_is_wire_compatible_with_json() -> None:
    from ivip_ipc_async.records import OrjsonCodec, codec_named

    fast, std = OrjsonCodec(), JsonCodec()
    value = {"a": [1, 2.5, None, True, "ü"], "n": {"x": {}}, 7: "int key"}
    assert std.loads(fast.dumps(value)) == fast.loads(std.dumps(value))
    assert fast.id == std.id
    with pytest.raises(TypeError):
        fast.dumps(object())
    with pytest.raises(TypeError):
        fast.dumps(2**70)  # orjson's limit: refused at the call, like json's refusals
    assert isinstance(codec_named("orjson"), OrjsonCodec)
    with pytest.raises(ValueError, match="unknown codec"):
        codec_named("pickle")


@given(st.lists(records, min_size=2, max_size=10), st.integers(0, 10_000))
def test_a_batch_frame_yields_all_its_records_or_none(recs: list[Record], cut: int) -> None:
    inner = frames(recs)
    batch = encode_frame(Record(Kind.BATCH, "", b"", inner), 1)
    whole = FrameReader(max_body=1 << 20).feed(batch)
    assert [r.seq for r in whole] == list(range(1, len(recs) + 1))
    cut = cut % len(batch)
    assert FrameReader(max_body=1 << 20).feed(batch[:cut]) == []


def test_a_reader_skips_the_messages_nobody_wants_but_keeps_their_place() -> None:
    """With `wanted` topics, another topic's message comes out as a SKIPPED
    record (its sequence number, no body, no body check); cache records and the
    frames of a BATCH are treated the same way."""
    recs = [
        Record(Kind.MESSAGE, "a", b"", b"1"),
        Record(Kind.MESSAGE, "b", b"", b"2"),
        Record(Kind.CACHE_SET, "b", b"sk", b"3"),
    ]
    frames = b"".join(encode_frame(r, i + 1) for i, r in enumerate(recs))
    batch = encode_frame(Record(Kind.BATCH, "", b"", frames), 1)
    for data in (frames, batch):
        reader = FrameReader(max_body=1024)
        reader.wanted = {b"a"}
        out = reader.feed(data)
        assert [(r.kind, r.seq) for r in out] == [
            (Kind.MESSAGE, 1),
            (Kind.SKIPPED, 2),
            (Kind.CACHE_SET, 3),
        ]
        assert out[1].data == b""
        assert out[0].data == b"1"
    # A skipped message's body is checked all the same (a forged length must
    # not swallow what follows), and so is a wanted one's.
    damaged = bytearray(frames)
    second = len(encode_frame(recs[0], 1))
    damaged[second + HEADER_SIZE + 1] ^= 0xFF  # the body of "b"
    reader = FrameReader(max_body=1024)
    reader.wanted = {b"a"}
    assert [r.kind for r in reader.feed(bytes(damaged))] == [Kind.MESSAGE, Kind.CACHE_SET]
    assert reader.skipped_bytes > 0
    reader = FrameReader(max_body=1024)
    reader.wanted = {b"b"}
    assert [r.kind for r in reader.feed(bytes(damaged))] == [Kind.SKIPPED, Kind.CACHE_SET]
    assert reader.skipped_bytes > 0


def test_a_mirror_adds_no_object_for_the_cyclic_gc_per_key() -> None:
    """A joiner loading 100,000 keys stalled its loop for 30-120 ms in full
    collections walking two tracked objects per key; a key's state is now an
    untracked tuple, and the cache is spread over `SHARDS` dicts so that no
    single dict resize copies the whole cache."""
    m = Mirror()
    gc.collect()
    before = len(gc.get_objects())
    # Ids that share their low bits (multiples of 1,024) must spread too.
    for i in range(20_000):
        m.apply(Record(Kind.CACHE_SET, "c", encode_key(i << 10), b"%d" % i, hlc=i + 1, node=1))
    m.apply(Record(Kind.CACHE_DELETE, "c", encode_key(7 << 10), b"", hlc=10**6, node=1))
    gc.collect()
    assert len(gc.get_objects()) - before < 200  # the shard dicts, not 20,000 entries
    assert m.count() == 20_000
    assert max(len(shard) for shard in m.caches["c"]) < 20_000 / SHARDS * 2


def test_a_loading_mirror_gives_the_cyclic_gc_nothing_to_walk() -> None:
    """A joiner's full collections walked every key of a shard dict that a
    freshly applied state (a tuple, tracked until a collection looks at it) had
    made tracked: 88 ms for a million keys. States are bytes now, so a shard
    dict is never tracked, whenever a collection comes."""
    m = Mirror()
    gc.disable()  # no collection between the applies and the look (as in a long slice)
    try:
        for i in range(20_000):
            m.apply(Record(Kind.CACHE_SET, "c", encode_key(f"k{i}"), b"%d" % i, hlc=i + 1, node=1))
        m.apply(Record(Kind.CACHE_DELETE, "c", encode_key("k7"), b"", hlc=10**6, node=1))
        tracked = [len(shard) for shard in m.caches["c"] if gc.is_tracked(shard)]
    finally:
        gc.enable()
    assert tracked == []


def test_a_mirror_keeps_a_small_entry_in_half_the_bytes_of_its_decoded_value() -> None:
    """Bytes per key (tracemalloc) of a mirror holding 20,000 small entries, as a
    joiner builds it from frames, beside a plain dict of the same decoded
    values: a tuple of eight objects per key took ~450 bytes, about what the
    plain dict takes (~500); one bytes object per key takes ~225."""
    import tracemalloc

    codec = JsonCodec()
    n = 20_000
    frames_ = b"".join(
        encode_frame(
            Record(
                Kind.CACHE_SET,
                "default",
                encode_key(f"k{j}"),
                codec.dumps({"id": j, "name": "x" * 40}),
                (1 << 60) + j,
                (1 << 62) + 12345,
                0.0,
                j + 1,
            ),
            j + 1,
        )
        for j in range(n)
    )
    datas = [codec.dumps({"id": j, "name": "x" * 40}) for j in range(n)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        m = Mirror()
        for rec in FrameReader(max_body=1 << 20).feed(frames_):
            m.apply(rec)
        del rec
        mirror = tracemalloc.get_traced_memory()[0] - before
        before = tracemalloc.get_traced_memory()[0]
        plain = {f"k{j}": codec.loads(datas[j]) for j in range(n)}
        decoded = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert m.count() == len(plain) == n
    assert mirror / n < 300
    assert mirror < decoded * 0.6


def test_a_record_whose_key_is_not_a_cache_key_is_ignored() -> None:
    """A forged or corrupted key with a valid checksum used to raise inside the
    read pass (the rest of the slice undelivered); it is now ignored and counted."""
    m = Mirror()
    for raw in (b"ix", b"s\xff", b""):
        assert not m.apply(Record(Kind.CACHE_SET, "c", raw, b"1", hlc=1, node=1))
    assert m.rejected == 3
    assert m.apply(Record(Kind.CACHE_SET, "c", encode_key("k"), b"1", hlc=1, node=1))
    assert m.count() == 1


# -- the private CPython fast paths, and their public fallbacks -----------------------

JSON_SAMPLES = [{"id": 7, "name": "Ana é ✓", "tags": ["a", "b"], "x": 1.5, "n": None}, [], "", 0]


def test_json_codec_falls_back_to_the_public_encoder_with_the_same_bytes_and_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without `json.encoder.c_make_encoder` (a private API), `JsonCodec` encodes
    through `JSONEncoder.encode`: the same bytes, the same `TypeError`s."""
    from ivip_ipc_async import records

    fast = [JsonCodec().dumps(v) for v in JSON_SAMPLES]
    monkeypatch.setattr(records, "_c_encoder", None)
    codec = JsonCodec()
    assert [codec.dumps(v) for v in JSON_SAMPLES] == fast
    circular: list[object] = []
    circular.append(circular)
    for bad in (float("nan"), circular, object()):
        with pytest.raises(TypeError):
            codec.dumps(bad)


def test_a_c_encoder_that_changed_is_not_used() -> None:
    """The private C encoder is used only if it still takes the nine arguments
    it is given and encodes a probe as the public encoder does."""
    from ivip_ipc_async import records

    def wrong_signature(*args: object) -> object:
        raise TypeError("make_encoder() takes 10 arguments")

    def wrong_output(*args: object) -> object:
        return lambda value, indent: ["{}"]

    assert records._checked_c_encoder(None) is None
    assert records._checked_c_encoder(wrong_signature) is None
    assert records._checked_c_encoder(wrong_output) is None
    assert records._checked_c_encoder(json.encoder.c_make_encoder) is not None  # type: ignore[attr-defined]


async def test_the_current_task_lookup_falls_back_to_the_public_function() -> None:
    """The group commit asks for the current task on every write: on 3.11 through
    asyncio's private dict when it is there, else `asyncio.current_task`."""
    import asyncio
    import types

    from ivip_ipc_async.backends.directory import segments

    loop = asyncio.get_running_loop()
    assert segments._current_task_getter(asyncio.tasks)(loop) is asyncio.current_task()
    fallback = segments._current_task_getter(types.SimpleNamespace())  # no private dict
    assert fallback is asyncio.current_task
    assert fallback(loop) is asyncio.current_task()
