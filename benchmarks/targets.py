"""The targets the page and the console print, met or not, and why each miss missed.

Three lists, all ratios or limits read from the medians of one run:

- `message_path`: the message path against the machine's references (a
  `multiprocessing` Pipe, the `asyncio.gather` floor, Redis pipelined, plain redis-py);
- `kept`: what was won before and must stay (idle, cache get, set-to-visible, RSS
  flat, loop stalls);
- `earlier`: the earlier targets that still say something the two lists above do not.

Each miss gets a reason computed from the run's own figures (`reasons`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from . import budget as b
from .harness import Aggregated
from .report import fmt, ratio
from .stalls import TARGET_MS, stall_target

PIPE = "multiprocessing Pipe"
PIPE_LOOP = "multiprocessing Pipe (asyncio receiver)"
AWAITED = "ivip-ipc-async (awaited)"
CONCURRENT = "ivip-ipc-async (concurrent)"
BATCHED = "ivip-ipc-async (batched)"
GATHER = "asyncio.gather floor (no I/O)"
PIPELINED = "redis pub/sub (pipelined)"
ON_REDIS = "ivip-ipc-async on Redis"
PLAIN = "redis pub/sub (redis-py)"
SCRIPT = "redis EVALSHA APPEND (redis-py)"  # the Redis backend's floor


class Target(NamedTuple):
    """One target: its statement, what was measured, met (None: not measured), and the
    short figure (a ratio or a value) the per-Python table shows."""

    name: str
    measured: str
    met: bool | None
    short: str


def get(results: Aggregated, scenario: str, row: str, metric: str) -> float:
    try:
        return results[scenario][row][metric][0]
    except KeyError:
        return float("nan")


def _ok(condition: bool, *inputs: float) -> bool | None:
    """None when an input is missing (a peer or a scenario was skipped)."""
    return None if any(math.isnan(x) for x in inputs) else condition


def _stage(results: Aggregated, name: str) -> float:
    """A budget stage in ns/msg, NaN when not measured or its internal moved."""
    value = get(results, "budget", name, b.METRIC)
    return float("nan") if value == b.MOVED else value


# -- the message path against the machine's references -------------------------------------

T_LAT = "latency p50 <= 1.5x multiprocessing Pipe"
T_P99 = "latency p99 <= 0.5 ms"
T_PIPE = "awaited notify msg/s >= 0.5x Pipe msg/s"
T_PIPELINED = "awaited notify >= 2.5x Redis pipelined PUBLISH"
T_GATHER = "gather of 1,000 notify >= 0.8x the gather floor"
T_BATCH = "notify_many: received >= 0.9x sent"
T_FANIN = "4 senders -> 1 receiver >= 1.0x 1 -> 1 awaited"
T_REDIS = "Redis backend awaited >= 0.9x plain redis-py PUBLISH"


def message_path(results: Aggregated) -> list[Target]:
    """The message path's targets against the machine's references."""
    p50 = get(results, "latency", "ivip-ipc-async", "p50")
    p99 = get(results, "latency", "ivip-ipc-async", "p99")
    pipe = get(results, "latency", PIPE, "p50")
    pipe_loop = get(results, "latency", PIPE_LOOP, "p50")
    awaited = get(results, "throughput", AWAITED, "msg/s")
    pipe_rate = get(results, "throughput", PIPE, "msg/s")
    pipelined = get(results, "throughput", PIPELINED, "msg/s")
    concurrent = get(results, "throughput", CONCURRENT, "msg/s")
    floor = get(results, "throughput", GATHER, "msg/s")
    received = get(results, "throughput", BATCHED, "msg/s")
    sent = get(results, "throughput", BATCHED, "send msg/s")
    fanin = get(results, "many_to_one", "ivip-ipc-async 4->1", "msg/s")
    rb = get(results, "redis_backend", ON_REDIS, "msg/s (awaited)")
    plain = get(results, "redis_backend", PLAIN, "msg/s (awaited)")
    return [
        Target(
            T_LAT,
            f"{fmt(p50)} vs {fmt(pipe)} ms = **{ratio(p50, pipe)}** (vs the Pipe with an "
            f"asyncio receiver, {fmt(pipe_loop)} ms: {ratio(p50, pipe_loop)})",
            _ok(p50 <= 1.5 * pipe, p50, pipe),
            ratio(p50, pipe),
        ),
        Target(T_P99, f"{fmt(p99)} ms", _ok(p99 <= 0.5, p99), f"{fmt(p99)} ms"),
        Target(
            T_PIPE,
            f"{fmt(awaited)} vs {fmt(pipe_rate)} = **{ratio(awaited, pipe_rate)}**",
            _ok(awaited >= 0.5 * pipe_rate, awaited, pipe_rate),
            ratio(awaited, pipe_rate),
        ),
        Target(
            T_PIPELINED,
            f"{fmt(awaited)} vs {fmt(pipelined)} = **{ratio(awaited, pipelined)}**",
            _ok(awaited >= 2.5 * pipelined, awaited, pipelined),
            ratio(awaited, pipelined),
        ),
        Target(
            T_GATHER,
            f"{fmt(concurrent)} vs {fmt(floor)} = **{ratio(concurrent, floor)}**",
            _ok(concurrent >= 0.8 * floor, concurrent, floor),
            ratio(concurrent, floor),
        ),
        Target(
            T_BATCH,
            f"{fmt(received)} received of {fmt(sent)}/s sent = **{ratio(received, sent)}**",
            _ok(received >= 0.9 * sent, received, sent),
            ratio(received, sent),
        ),
        Target(
            T_FANIN,
            f"{fmt(fanin)} vs {fmt(awaited)} = **{ratio(fanin, awaited)}**",
            _ok(fanin >= awaited, fanin, awaited),
            ratio(fanin, awaited),
        ),
        Target(
            T_REDIS,
            f"{fmt(rb)} vs {fmt(plain)} = **{ratio(rb, plain)}**",
            _ok(rb >= 0.9 * plain, rb, plain),
            ratio(rb, plain),
        ),
    ]


# -- kept: what is won stays won ------------------------------------------------------------

T_IDLE = "idle CPU <= 0.1% of a core"
T_GET = "cache get >= 1,000,000 ops/s"
T_VISIBLE = "set-to-visible p50 <= 0.5 ms"
T_RSS = "receiver RSS flat after warm-up"


def kept(results: Aggregated) -> list[Target]:
    idle = get(results, "idle", "ivip-ipc-async", "cpu_percent")
    cache_get = get(results, "cache", "ivip-ipc-async", "get")
    visible = get(results, "cache", "ivip-ipc-async", "visible p50 ms")
    peak = get(results, "throughput", AWAITED, "rss peak MiB")
    end = get(results, "throughput", AWAITED, "rss end MiB")
    stall = stall_target(results)
    return [
        Target(T_IDLE, f"{fmt(idle)} %", _ok(idle <= 0.1, idle), f"{fmt(idle)} %"),
        Target(T_GET, fmt(cache_get), _ok(cache_get >= 1_000_000, cache_get), fmt(cache_get)),
        Target(T_VISIBLE, f"{fmt(visible)} ms", _ok(visible <= 0.5, visible), f"{fmt(visible)} ms"),
        Target(
            T_RSS,
            f"peak {fmt(peak)}, end {fmt(end)} MiB",
            _ok(end <= peak, peak, end),
            f"{fmt(end)} MiB",
        ),
        Target(stall[0], stall[1], stall[2], stall[1].split(" (")[0]),
    ]


# -- earlier: the targets before these that the two lists above do not restate ------------


def earlier(results: Aggregated) -> list[Target]:
    p50 = get(results, "latency", "ivip-ipc-async", "p50")
    floor = get(results, "latency", "raw inotify (floor)", "p50")
    redis_p50 = get(results, "latency", "redis pub/sub", "p50")
    awaited = get(results, "throughput", AWAITED, "msg/s")
    f16_p99 = get(results, "fanout", "ivip-ipc-async 1->16", "p99")
    f16_min = get(results, "fanout", "ivip-ipc-async 1->16", "min msg/s per receiver")
    cache_get = get(results, "cache", "ivip-ipc-async", "get")
    disk = get(results, "cache", "diskcache", "get")
    redis_get = get(results, "cache", "redis GET/SET", "get")
    joiner = next(
        (v["seconds"][0] for k, v in results.get("startup", {}).items() if "late joiner" in k),
        float("nan"),
    )
    rb_p50 = get(results, "redis_backend", ON_REDIS, "p50")
    plain_p50 = get(results, "redis_backend", PLAIN, "p50")
    rb_get = get(results, "redis_backend", ON_REDIS, "cache get/s")
    plain_get = get(results, "redis_backend", PLAIN, "cache get/s")
    return [
        Target(
            "latency p50 <= 3x raw inotify",
            ratio(p50, floor),
            _ok(p50 <= 3 * floor, p50, floor),
            ratio(p50, floor),
        ),
        Target(
            "latency p50 below Redis pub/sub",
            f"{fmt(p50)} vs {fmt(redis_p50)} ms",
            _ok(p50 < redis_p50, p50, redis_p50),
            ratio(p50, redis_p50),
        ),
        Target("fan-out 1->16 p99 <= 5 ms", f"{fmt(f16_p99)} ms", _ok(f16_p99 <= 5, f16_p99), ""),
        Target(
            "fan-out 1->16 per receiver >= 50% of 1->1",
            ratio(f16_min, awaited),
            _ok(f16_min >= 0.5 * awaited, f16_min, awaited),
            "",
        ),
        Target(
            "cache get >= 10x diskcache",
            ratio(cache_get, disk),
            _ok(cache_get >= 10 * disk, cache_get, disk),
            "",
        ),
        Target(
            "cache get >= 100x Redis GET",
            ratio(cache_get, redis_get),
            _ok(cache_get >= 100 * redis_get, cache_get, redis_get),
            "",
        ),
        Target(
            "late joiner with 100,000 keys <= 1 s", f"{fmt(joiner)} s", _ok(joiner <= 1, joiner), ""
        ),
        Target(
            "Redis backend latency p50 <= 1.5x plain redis-py",
            f"{fmt(rb_p50)} vs {fmt(plain_p50)} ms = {ratio(rb_p50, plain_p50)}",
            _ok(rb_p50 <= 1.5 * plain_p50, rb_p50, plain_p50),
            "",
        ),
        Target(
            "Redis backend mirrored get >= 20x GET",
            ratio(rb_get, plain_get),
            _ok(rb_get >= 20 * plain_get, rb_get, plain_get),
            "",
        ),
    ]


# -- why a target was missed: every figure from the run --------------------------------------


def _us(ns: float) -> str:
    return "n/a" if math.isnan(ns) else f"{ns / 1000:.2f} us"


def _sender_budget(r: Aggregated) -> str:
    """The awaited notify's stages from the budget scenario, largest first."""
    whole = _stage(r, b.SENDER_WHOLE)
    parts = {
        "encode": _stage(r, b.ENCODE),
        "frame": _stage(r, b.FRAME),
        "write": _stage(r, b.WRITE),
        "the rest of the call": _stage(r, b.SENDER_OTHER),
    }
    known = {k: v for k, v in parts.items() if not math.isnan(v)}
    if math.isnan(whole) or not known:
        return "the per-message budget was not measured in this run"
    listed = ", ".join(f"{k} {_us(v)}" for k, v in sorted(known.items(), key=lambda kv: -kv[1]))
    return f"one awaited `notify` costs {_us(whole)} in the budget ({listed})"


def _receiver_parts(r: Aggregated) -> str:
    """The receiver's per-record stages, each timed alone in the budget, largest first."""
    parts = {
        "parse": _stage(r, b.PARSE),
        "dispatch": _stage(r, b.DISPATCH),
        "decode": _stage(r, b.DECODE),
        "read": _stage(r, b.READ),
    }
    known = {k: v for k, v in parts.items() if not math.isnan(v)}
    if not known:
        return "the per-message budget was not measured in this run"
    listed = ", ".join(f"{k} {_us(v)}" for k, v in sorted(known.items(), key=lambda kv: -kv[1]))
    return f"timed alone in the budget, {listed} per record"


def _why_latency(r: Aggregated) -> str:
    p50 = get(r, "latency", "ivip-ipc-async", "p50")
    pipe = get(r, "latency", PIPE, "p50")
    loop = get(r, "latency", PIPE_LOOP, "p50")
    inotify = get(r, "latency", "raw inotify (floor)", "p50")
    wake = _stage(r, b.WAKE_DOORBELL)
    own = (p50 - loop) * 1e6  # ns
    return (
        f"p50 {fmt(p50)} ms against the Pipe's {fmt(pipe)} ms. The Pipe's receiver blocks "
        f"in a read; with the same Pipe waited on by an asyncio loop it was {fmt(loop)} ms "
        f"({ratio(loop, pipe)}): the asyncio wake-up alone costs {fmt(loop - pipe)} ms "
        f"over a blocking read, against the {fmt(1.5 * pipe)} ms the 1.5x allows. "
        f"The library's own path took {_us(own)} more than the asyncio "
        f"Pipe: {_sender_budget(r)}; the doorbell's one-way wake-up measured "
        f"{_us(wake)} (budget); then read, parse, decode and dispatch "
        f"({_us(_stage(r, b.PARSE) + _stage(r, b.DECODE) + _stage(r, b.DISPATCH))}). "
        f"Raw inotify, the floor of a file-based design, was {fmt(inotify)} ms. Closing it "
        "means removing the receiver's asyncio wake-up from the path (a receiver blocked "
        "in a read in a thread, handing over to the loop) or shaving the sender's and "
        "the receiver's Python per message to a few microseconds each."
    )


def _why_p99(r: Aggregated) -> str:
    p99 = get(r, "latency", "ivip-ipc-async", "p99")
    pipe99 = get(r, "latency", PIPE, "p99")
    loop99 = get(r, "latency", PIPE_LOOP, "p99")
    return (
        f"p99 {fmt(p99)} ms; the plain Pipe's p99 was {fmt(pipe99)} ms and the asyncio "
        f"Pipe's {fmt(loop99)} ms in the same run. On 2 shared cores the tail is "
        "scheduling (another process holds the core the receiver needs) plus the "
        "library's periodic work landing on a message (maintenance rounds, GC); when "
        "the Pipe's own p99 is near 0.5 ms the machine, not the library, sets the "
        "tail. Closing it: fewer allocations per message (less GC), periodic work "
        "spread thin, and a quieter machine to tell which."
    )


def _sender_wall(r: Aggregated) -> str:
    """The benchmark sender's time per message beside the budget's `notify` alone."""
    sent = get(r, "throughput", AWAITED, "send msg/s")
    whole = _stage(r, b.SENDER_WHOLE)
    per = 1e9 / sent if sent else float("nan")
    return (
        f"the benchmark's sender took {_us(per)} per message, {_us(per - whole)} more "
        "than the `notify` alone: it builds each message (a dict with a fresh "
        "timestamp) and shares the machine with the receiver"
    )


def _why_pipe(r: Aggregated) -> str:
    awaited = get(r, "throughput", AWAITED, "msg/s")
    sent = get(r, "throughput", AWAITED, "send msg/s")
    pipe = get(r, "throughput", PIPE, "msg/s")
    need = 1e9 / (0.5 * pipe) if pipe else float("nan")
    return (
        f"{fmt(awaited)} msg/s received, {fmt(sent)}/s sent: the sender is the "
        "bottleneck when the two are close. 0.5x the Pipe's "
        f"{fmt(pipe)} msg/s needs at most {_us(need)} per message sent; "
        f"{_sender_budget(r)}, and {_sender_wall(r)}. The Pipe's sender sends ready "
        "bytes (one small pickle-free write, no encoding). "
        "Closing it: cut the largest stages above (a compiled or cached encoder for "
        "the default codec, framing without a per-record header pack, fewer Python "
        "calls between `notify` and `os.write`)."
    )


def _why_pipelined(r: Aggregated) -> str:
    awaited = get(r, "throughput", AWAITED, "msg/s")
    pipelined = get(r, "throughput", PIPELINED, "msg/s")
    orjson = get(r, "throughput", "ivip-ipc-async (awaited, orjson)", "msg/s")
    need = 1e9 / (2.5 * pipelined) if pipelined else float("nan")
    return (
        f"{fmt(awaited)} vs {fmt(pipelined)} msg/s: 2.5x means {fmt(2.5 * pipelined)} "
        f"msg/s, at most {_us(need)} per message sent; {_sender_budget(r)}, and "
        f"{_sender_wall(r)}. "
        f"With `OrjsonCodec` the awaited rate was {fmt(orjson)} msg/s. Closing it: the "
        "same sender-side cuts as for the Pipe target."
    )


def _why_gather(r: Aggregated) -> str:
    concurrent = get(r, "throughput", CONCURRENT, "msg/s")
    floor = get(r, "throughput", GATHER, "msg/s")
    batched = get(r, "throughput", BATCHED, "send msg/s")
    task = 1e9 / floor if floor else float("nan")
    per = 1e9 / concurrent if concurrent else float("nan")
    return (
        f"{fmt(concurrent)} vs {fmt(floor)} calls/s: a gathered call cost {_us(per)} "
        f"here, of which the Task and `gather` alone are {_us(task)}; 0.8x allows "
        f"{_us(0.25 * task)} of `notify` on top, against {_us(per - task)} now. "
        "A gathered `notify` already ends in its task's first step (it writes at "
        "once, without suspending), so what is left is the call itself: 0.8x "
        "would need a `notify` five times cheaper, in compiled code. On 3.12+ "
        "`asyncio.eager_task_factory` also spares the Task's scheduling (see "
        "docs/api.md); the batch path, `notify_many`, "
        f"sent {fmt(batched)} msg/s."
    )


def _why_batch(r: Aggregated) -> str:
    received = get(r, "throughput", BATCHED, "msg/s")
    sent = get(r, "throughput", BATCHED, "send msg/s")
    cpu = get(r, "throughput", BATCHED, "receiver CPU us/msg")
    cap = 1e6 / cpu if cpu else float("nan")
    need = 1e6 / (0.9 * sent) if sent else float("nan")
    return (
        f"{fmt(received)} msg/s received of {fmt(sent)}/s sent. The receiver used "
        f"{fmt(cpu)} us of CPU per message in this workload (a cap of {fmt(cap)} msg/s "
        f"on one core); keeping up with 0.9x of this sender needs at most {fmt(need)} us. "
        f"Its stages: {_receiver_parts(r)}. Closing it: the "
        "receiver's per-record Python (parse a batch in one pass, decode and dispatch "
        "without a per-message closure) must cost less than the sender's per-message "
        "encode."
    )


def _why_fanin(r: Aggregated) -> str:
    fanin = get(r, "many_to_one", "ivip-ipc-async 4->1", "msg/s")
    awaited = get(r, "throughput", AWAITED, "msg/s")
    cpu = get(r, "throughput", AWAITED, "receiver CPU us/msg")
    # Five busy processes on 2 cores: a fair scheduler gives each 2/5 of a core.
    share = 2 / 5
    need = share * 1e6 / awaited if awaited else float("nan")
    return (
        f"{fmt(fanin)} msg/s from four senders vs {fmt(awaited)} from one. Five busy "
        f"processes share 2 cores, and a fair scheduler gives each about {share:.1f} of "
        f"a core. On that share, matching 1 -> 1 needs at most {fmt(need)} us of CPU "
        f"per message received; the receiver used {fmt(cpu)} us per message in the "
        f"1 -> 1 awaited workload ({_receiver_parts(r)}), the sender "
        f"{_us(_stage(r, b.SENDER_WHOLE))} per awaited `notify`. Closing it: a "
        "receiver several times cheaper per message than a sender, in compiled code "
        "(parse and decode already run in the stdlib's C; what is left is the Python "
        "around them)."
    )


def _why_redis(r: Aggregated) -> str:
    rb = get(r, "redis_backend", ON_REDIS, "msg/s (awaited)")
    plain = get(r, "redis_backend", PLAIN, "msg/s (awaited)")
    script = get(r, "redis_backend", SCRIPT, "msg/s (awaited)")
    per_rb = 1e9 / rb if rb else float("nan")
    per_plain = 1e9 / plain if plain else float("nan")
    per_script = 1e9 / script if script else float("nan")
    return (
        f"{fmt(rb)} vs {fmt(plain)} msg/s: {_us(per_rb)} per awaited write against "
        f"{_us(per_plain)} for a bare `PUBLISH`, {_us(per_rb - per_plain)} more. The "
        "floor of this design is plain redis-py running the backend's own APPEND script "
        "(`EVALSHA`: store in the stream, publish, keep the stream expiring) with a "
        f"subscriber receiving: {fmt(script)} msg/s = {ratio(script, plain)} of the bare "
        f"`PUBLISH` ({_us(per_script - per_plain)} per write on the server, for delivery "
        f"that survives a reconnect); the library itself is at {ratio(rb, script)} of that "
        f"floor ({_us(per_rb - per_script)} of client-side work per write: framing, JSON, "
        "the retry deadline, and reading back its own pushes). With Redis, the sender and "
        "the receiver on 2 cores, every extra wake-up shows. Closing the rest: a plain "
        "`PUBLISH` on the hot path (per-sender streams written in the background), which "
        "gives up the single atomic store-and-publish the catch-up relies on."
    )


def _why_kept(r: Aggregated, name: str) -> str:
    if name == T_IDLE:
        wake = get(r, "idle", "ivip-ipc-async", "wakeups_per_s")
        return (
            f"{fmt(get(r, 'idle', 'ivip-ipc-async', 'cpu_percent'))} % with {fmt(wake)} "
            "context switches/s. On Linux the watcher is an inotify fd on the event "
            "loop (no thread, no wake-ups of its own): what is left is the 2 s "
            "maintenance round, ~380 us of CPU per round over 20 s (0.019 %), about "
            "220 us of it what any asyncio wake-up after 2 s asleep costs. A miss here "
            "means the watchfiles fallback runs (stats()['watcher']) or the machine "
            "was busy."
        )
    if name == T_GET:
        return (
            f"{fmt(get(r, 'cache', 'ivip-ipc-async', 'get'))} gets/s: the mirror's get path "
            "grew; compare with the last published page."
        )
    if name == T_VISIBLE:
        return (
            f"p50 {fmt(get(r, 'cache', 'ivip-ipc-async', 'visible p50 ms'))} ms: the "
            "write-to-mirror path of a reader is slower than the message path "
            f"({fmt(get(r, 'latency', 'ivip-ipc-async', 'p50'))} ms p50)."
        )
    if name == T_RSS:
        return (
            f"end {fmt(get(r, 'throughput', AWAITED, 'rss end MiB'))} MiB above peak "
            f"{fmt(get(r, 'throughput', AWAITED, 'rss peak MiB'))} MiB: something is kept "
            "per message."
        )
    rows = r.get("loop_stall", {})
    over = [
        f"{k}: {fmt(v['worst gap ms'][0])} ms, "
        f"{fmt(v.get('worst gap less GC ms', (math.nan,))[0])} ms without the cyclic GC"
        for k, v in rows.items()
        if v["worst gap ms"][0] > TARGET_MS
    ]
    return (
        "; ".join(over) + ". Where the gap without GC is within the limit, the stall is "
        "the collector's pass over many live objects (fewer long-lived objects, or "
        "`gc.freeze()` after loading, would close it); otherwise the named workload "
        "does too much in one callback."
    )


REASONS: dict[str, Callable[[Aggregated], str]] = {
    T_LAT: _why_latency,
    T_P99: _why_p99,
    T_PIPE: _why_pipe,
    T_PIPELINED: _why_pipelined,
    T_GATHER: _why_gather,
    T_BATCH: _why_batch,
    T_FANIN: _why_fanin,
    T_REDIS: _why_redis,
}


def reasons(results: Aggregated) -> list[tuple[str, str]]:
    """(target, why) for every missed target of `message_path` and `kept`."""
    out = []
    for target in message_path(results):
        if target.met is False:
            out.append((target.name, REASONS[target.name](results)))
    for target in kept(results):
        if target.met is False:
            out.append((target.name, _why_kept(results, target.name)))
    return out


MESSAGE_PATH = "Message path targets"
KEPT = "Kept (won before, must stay)"
EARLIER = "Earlier targets"


def all_targets(results: Aggregated) -> dict[str, list[Target]]:
    return {
        MESSAGE_PATH: message_path(results),
        KEPT: kept(results),
        EARLIER: earlier(results),
    }
