"""The `ivip-ipc` command (also `python -m ivip_ipc_async`).

Commands: `demo`, `listen`, `notify`, `cache ls|get|set|del|clear` (`list` and
`delete` are the same as `ls` and `del`), `stats`, `peers`,
`bench` (the benchmark suite of a source checkout). `--dir`, `--namespace` and
`--app-dir` may be given anywhere on the line and default like `AsyncIPC()`;
every command says on stderr where it went (`--quiet` to hush it).

Bad input gets one line on stderr and a non-zero exit, never a traceback
(`--debug` shows it). Exit codes: 0 success, 1 not found or a failed operation
(e.g. Redis unreachable), 2 bad arguments or configuration, 3 an unsafe
directory, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from .backends import check_location
from .cache import AsyncCache
from .errors import UnsafeDirectoryError
from .ipc import AsyncIPC
from .waiting import wait_for

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNSAFE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EPILOG = """\
--dir, --namespace and --app-dir may be given before or after the command.
Without --dir, $IVIP_IPC_DIR names the directory; without either, the per-user
default is used with a namespace derived from the working directory, so run the
command from your application's directory, or pass --app-dir (or the --dir and
--namespace it prints) to reach it from elsewhere.

exit codes: 0 success, 1 not found or a failed operation (e.g. Redis
unreachable), 2 bad arguments or configuration, 3 an unsafe directory,
130 interrupted"""


class UsageError(Exception):
    """Bad arguments or configuration found after parsing: exit 2."""


# -- argument types ----------------------------------------------------------------------


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value

    parse.__name__ = f"at least {low}"
    return parse


def _seconds(text: str) -> float:
    """A positive number of seconds (`--timeout`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _namespace(text: str) -> str:
    from .namespaces import check_namespace

    try:
        return check_namespace(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ttl(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None


_LOOKS_LIKE_JSON = re.compile(r"\s*([\[{\"0-9]|-[0-9.]|(true|false|null)\b)")


def _parse_value(text: str, *, string: bool, what: str) -> Any:
    """JSON when it parses; a plain word is a string; broken JSON is refused.

    Example:
        >>> _parse_value('{"a": 1}', string=False, what="VALUE")
        {'a': 1}
        >>> _parse_value("hello", string=False, what="VALUE")
        'hello'
        >>> _parse_value("[1,2", string=True, what="VALUE")
        '[1,2'
    """
    if string:
        return text
    try:
        return json.loads(text)
    except ValueError as exc:
        if _LOOKS_LIKE_JSON.match(text):
            raise UsageError(
                f"{what} {text!r} is not valid JSON ({exc}); fix it, or pass --string "
                "to send it as text"
            ) from None
        return text


def _key(text: str, *, string: bool) -> str | int:
    """An int key when the text is an integer written plainly ("7", "-3"), else a str.

    Example:
        >>> _key("7", string=False), _key("007", string=False), _key("7", string=True)
        (7, '007', '7')
    """
    if not string and re.fullmatch(r"-?[1-9][0-9]*|0", text):
        return int(text)
    return text


def _redact(url: str) -> str:
    """`url` with its password hidden, as the Redis backend shows it."""
    from .backends.redis.connections import redacted

    return redacted(url)


# -- the instance and where it is -----------------------------------------------------


def _target(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The path and namespace to open, from --dir, --namespace and --app-dir."""
    namespace = args.namespace
    if args.app_dir is not None:
        if namespace is not None:
            raise UsageError("give --namespace or --app-dir, not both")
        from .namespaces import default_namespace

        if not os.path.isdir(args.app_dir):
            raise UsageError(f"--app-dir {args.app_dir!r} is not a directory")
        namespace = default_namespace(args.app_dir)
    raw = args.dir if args.dir is not None else os.environ.get("IVIP_IPC_DIR")
    if raw is not None:
        try:
            check_location(raw)
        except (ValueError, ImportError) as exc:
            raise UsageError(str(exc)) from None
    return args.dir, namespace


def _where(args: argparse.Namespace, ipc: AsyncIPC) -> str:
    """Where a started instance is: its directory or Redis URL, and its namespace."""
    stats = ipc.stats()
    if stats.get("backend") == "redis":
        return f"Redis {_redact(str(stats.get('url')))}, namespace {stats.get('namespace')}"
    path = str(stats.get("path", "?"))
    root, _, namespace = path.rpartition("/")
    how = ""
    if args.namespace is None and args.app_dir is None:
        if args.dir is None and not os.environ.get("IVIP_IPC_DIR"):
            how = f" (from the working directory {os.getcwd()})"
    elif args.app_dir is not None:
        how = f" (from --app-dir {os.path.realpath(args.app_dir)})"
    return f"directory {root}, namespace {namespace}{how}"


def _describe(args: argparse.Namespace) -> str:
    """Where the command was going, for error messages (before anything started)."""
    raw = args.dir if args.dir is not None else os.environ.get("IVIP_IPC_DIR")
    if raw is not None and "://" in raw:
        return _redact(raw)
    return raw if raw is not None else "the default directory"


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(f"ivip-ipc: {text}", file=sys.stderr, flush=True)


# -- listen / notify / cache / stats / peers ---------------------------------------------


async def _listen(args: argparse.Namespace, ipc: AsyncIPC) -> int:
    done = asyncio.Event()
    count = 0

    def printer(event: str) -> Callable[[Any], None]:
        def show(message: Any) -> None:
            nonlocal count
            count += 1
            if args.json:
                line = json.dumps({"event": event, "message": message, "t": time.time()})
            else:
                line = f"{event}: {json.dumps(message, ensure_ascii=False)}"
            print(line, flush=True)
            if args.count is not None and count >= args.count:
                done.set()

        return show

    for event in args.events:
        ipc.on(event, printer(event))
    until = f"{args.count} message(s)" if args.count is not None else "Ctrl-C"
    # Always said: a listener that does not say where it listens misleads.
    print(
        f"listening on {', '.join(args.events)} in {_where(args, ipc)}, until {until}",
        file=sys.stderr,
        flush=True,
    )
    await done.wait()
    return EXIT_OK


async def _notify(args: argparse.Namespace, ipc: AsyncIPC) -> int:
    heard = ""  # counted before sending: a listener may leave once it has the message
    with contextlib.suppress(Exception):  # a hint only: e.g. CLIENT LIST may be refused
        heard = f" ({len(await _peer_ids(args, ipc))} live peer(s))"
    await ipc.notify(args.event, args.value)
    _say(args, f"sent {args.event}: {json.dumps(args.value)} to {_where(args, ipc)}{heard}")
    return EXIT_OK


# The cache actions' other names (the first ones the CLI had): alias -> name.
_ACTION_NAMES = {"list": "ls", "delete": "del"}


async def _cache(args: argparse.Namespace, ipc: AsyncIPC) -> int:
    cache: AsyncCache[Any] = AsyncCache(ipc, name=args.cache)
    where = f"cache {args.cache!r} in {_where(args, ipc)}"
    action = _ACTION_NAMES.get(args.action, args.action)
    if action == "clear":
        cleared = await cache.clear()
        _say(args, f"deleted {cleared} key{'' if cleared == 1 else 's'} from {where}")
        return EXIT_OK
    if action == "ls":
        for key in sorted(await cache.keys(), key=lambda k: (isinstance(k, str), k)):
            print(json.dumps({"key": key, "value": await cache.get(key)}, ensure_ascii=False))
    else:
        key = _key(args.key, string=args.str_key)
        missing = object()
        value: Any = None
        if action == "get":
            value = await cache.get(key, missing)
            if value is not missing:
                print(json.dumps(value, ensure_ascii=False))
        elif action == "set":
            await cache.set(key, args.value, args.ttl)
        elif not await cache.delete(key):
            value = missing
        if action != "set" and value is missing:
            print(f"ivip-ipc: {key!r}: not found in {where}", file=sys.stderr)
            return EXIT_FAILED
    _say(args, where)
    return EXIT_OK


async def _stats(args: argparse.Namespace, ipc: AsyncIPC) -> int:
    _say(args, _where(args, ipc))
    print(json.dumps(ipc.stats(), indent=2, sort_keys=True, default=str))
    return EXIT_OK


async def _peer_ids(args: argparse.Namespace, ipc: AsyncIPC) -> list[str]:
    stats = ipc.stats()
    if stats.get("backend") == "redis":
        from .backends.redis.connections import listening_peers

        url = args.dir if args.dir is not None else os.environ.get("IVIP_IPC_DIR", "")
        mine = str(stats.get("peer"))
        return [p for p in await listening_peers(url, str(stats["namespace"])) if p != mine]
    return [str(p) for p in stats.get("peers", [])]


async def _peers(args: argparse.Namespace, ipc: AsyncIPC) -> int:
    peers = await _peer_ids(args, ipc)
    for peer in peers:
        print(peer)
    where = _where(args, ipc)
    if peers:
        _say(args, f"{len(peers)} live peer(s) in {where}")
    else:  # said even with --quiet: it is the answer
        print(f"ivip-ipc: no peers in {where}", file=sys.stderr)
    return EXIT_OK


# -- demo ---------------------------------------------------------------------------------

_SINGLES = 20  # messages each worker sends one at a time, to time a message alone
_SINGLE_GAP = 0.01  # seconds between them


async def _demo_worker(me: int, workers: int, messages: int, path: str) -> dict[str, Any]:
    async with AsyncIPC(path, namespace="demo") as ipc:
        cache: AsyncCache[Any] = AsyncCache(ipc, name="demo")
        alone: list[float] = []
        burst: list[float] = []
        senders: dict[int, int] = {}
        singles_in, burst_in = asyncio.Event(), asyncio.Event()

        def on_single(msg: dict[str, Any]) -> None:
            alone.append(time.time() - msg["t"])
            if len(alone) >= (workers - 1) * _SINGLES:
                singles_in.set()

        def on_burst(msg: dict[str, Any]) -> None:
            burst.append(time.time() - msg["t"])
            senders[msg["from"]] = senders.get(msg["from"], 0) + 1
            if len(burst) >= (workers - 1) * messages:
                burst_in.set()

        ipc.on("single", on_single)
        ipc.on("burst", on_burst)

        async def everyone(step: str) -> None:  # a barrier, through the shared cache
            await cache.set(f"{step}:{me}", True, 0)
            await _until(lambda: all(_has(cache, f"{step}:{i}") for i in range(workers)))

        await everyone("ready")
        # 1. One message at a time: what a single message costs.
        for seq in range(_SINGLES):
            await ipc.notify("single", {"from": me, "seq": seq, "t": time.time()})
            await asyncio.sleep(_SINGLE_GAP)
        await wait_for(singles_in.wait(), 30)
        await everyone("quiet")
        # 2. Every worker sends all its messages at once: throughput, and queueing.
        started = time.perf_counter()
        for seq in range(messages):
            await ipc.notify("burst", {"from": me, "seq": seq, "t": time.time()})
        sent_s = time.perf_counter() - started
        await cache.set(f"worker:{me}", {"pid": os.getpid(), "sent": messages}, 0)
        await wait_for(burst_in.wait(), 60)
        await _until(lambda: all(_has(cache, f"worker:{i}") for i in range(workers)))
        keys = sorted(str(k) for k in await cache.keys() if str(k).startswith("worker:"))
        result = {
            "id": me,
            "pid": os.getpid(),
            "received": len(burst),
            "from": senders,
            "alone_p50_ms": 1000 * statistics.median(alone),
            "burst_p50_ms": 1000 * statistics.median(burst),
            "burst_p99_ms": 1000 * sorted(burst)[int(len(burst) * 0.99)],
            "send_rate": messages / sent_s,
            "cache_keys": keys,
        }
        await everyone("done")  # keep our segments readable until everyone is done
    return result


def _demo_worker_main(argv: Sequence[str]) -> int:
    """Entry of one demo worker process (not a command: `demo` starts these)."""
    me, workers, messages = (int(x) for x in argv[:3])
    result = asyncio.run(_demo_worker(me, workers, messages, argv[3]))
    print(json.dumps(result), flush=True)
    return EXIT_OK


def _has(cache: AsyncCache[Any], key: str) -> bool:
    entry = cache.ipc.mirror.lookup(cache.name, key)
    return entry is not None and entry.live(time.time())


async def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the other demo workers did not show up within 30 s")
        await asyncio.sleep(0.005)


def _demo(args: argparse.Namespace) -> int:
    workers, messages = args.workers, args.messages
    worker_code = (
        "import sys; from ivip_ipc_async.cli import _demo_worker_main; "
        "sys.exit(_demo_worker_main(sys.argv[1:]))"
    )
    with tempfile.TemporaryDirectory(prefix="ivip-ipc-demo-") as tmp:
        print(
            f"starting {workers} worker processes on {tmp}: each sends {_SINGLES} messages "
            f"one at a time, then {messages} at once, to the others, and writes a cache key",
            flush=True,
        )
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", worker_code, str(i), str(workers), str(messages), tmp],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(workers)
        ]
        results, errors = [], []
        try:
            for proc in procs:
                out, err = proc.communicate(timeout=120)
                if proc.returncode == 0 and out.strip():
                    results.append(json.loads(out.strip().splitlines()[-1]))
                else:
                    last = (err.strip().splitlines() or ["no output"])[-1]
                    errors.append(f"worker {proc.pid} exited {proc.returncode}: {last}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    print(
        f"{'worker':>6} {'pid':>8} {'received':>9} {'alone p50':>10} {'burst p50':>10} "
        f"{'burst p99':>10} {'sent/s':>8}  cache keys seen"
    )
    for r in sorted(results, key=lambda r: r["id"]):
        print(
            f"{r['id']:>6} {r['pid']:>8} {r['received']:>9} {r['alone_p50_ms']:>10.3f} "
            f"{r['burst_p50_ms']:>10.3f} {r['burst_p99_ms']:>10.3f} {r['send_rate']:>8.0f}  "
            f"{' '.join(r['cache_keys'])}"
        )
    for error in errors:
        print(f"ivip-ipc: {error}", file=sys.stderr)
    if errors:
        return EXIT_FAILED
    expected = (workers - 1) * messages
    complete = all(r["received"] == expected for r in results)
    keys = all(len(r["cache_keys"]) == workers for r in results)
    alone = statistics.median(r["alone_p50_ms"] for r in results)
    burst = statistics.median(r["burst_p50_ms"] for r in results)
    print(
        f"every worker received {expected} of {expected} burst messages: {complete}; "
        f"every worker saw all {workers} cache keys: {keys}\n"
        f"a message sent alone reached another process in {alone:.3f} ms "
        "(median of the alone p50 column);\n"
        f"in the burst, {workers} workers sending {workers * messages} messages at once on "
        f"{os.cpu_count()} CPUs, in {burst:.3f} ms (median of burst p50): mostly time "
        "waiting in line"
    )
    return EXIT_OK if complete and keys else EXIT_FAILED


# -- bench -----------------------------------------------------------------------------------


BENCH_HELP = """\
usage: ivip-ipc bench [OPTIONS]

Runs the benchmark suite of a source checkout (`python -m benchmarks`): this
project beside Redis, diskcache, multiprocessing pipes and the raw inotify floor,
in one run. The suite lives in the source tree (benchmarks/), not in the
installed package: run this command from a checkout of ivip-ipc-async (with
`pip install -e '.[bench]'`); there, `ivip-ipc bench --help` lists its options.
"""


def _bench(extra: list[str], roots: Sequence[str] | None = None) -> int:
    """Run the benchmark suite of a source checkout (`python -m benchmarks`)."""
    if roots is None:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        roots = (os.getcwd(), here)
    for root in roots:
        if os.path.isfile(os.path.join(root, "benchmarks", "__main__.py")):
            return subprocess.call([sys.executable, "-m", "benchmarks", *extra], cwd=root)
    if {"-h", "--help"} & set(extra):  # an installed package: say what the command is
        print(BENCH_HELP, end="")
        return EXIT_OK
    print(
        "ivip-ipc: the benchmark suite lives in the source tree (benchmarks/); "
        "run this from a checkout of ivip-ipc-async",
        file=sys.stderr,
    )
    return EXIT_FAILED


# -- entry point ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, pointing at the help
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except empty ones and those the help text already gives."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action) or text


def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    """--dir, --namespace & co: on the top parser with defaults, elsewhere without
    (argparse.SUPPRESS), so that they may be given at any position."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("where")
    group.add_argument(
        "--dir",
        default=default(None),
        help="shared directory, or a redis:// URL (default: $IVIP_IPC_DIR, else the "
        "per-user directory)",
    )
    group.add_argument(
        "--namespace",
        type=_namespace,
        default=default(None),
        help='namespace inside it (default: "default" with --dir or $IVIP_IPC_DIR, '
        "else derived from the working directory)",
    )
    group.add_argument(
        "--app-dir",
        default=default(None),
        metavar="PATH",
        help="reach the application started from PATH (its default namespace)",
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        default=default(10.0),
        metavar="SECONDS",
        help="how long to keep trying to reach Redis before giving up (default: 10)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="do not say on stderr where the command went",
    )
    group.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="show the traceback of an error",
    )


def _parser() -> argparse.ArgumentParser:
    formatter = _Help
    parser = _Parser(
        prog="ivip-ipc",
        description="Events and a shared cache between local processes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help, description=description or help, formatter_class=formatter
        )
        if name != "demo":  # the demo makes its own directory
            _common(p, top=False)
        return p

    demo = command(
        "demo",
        "run worker processes that talk through a temporary directory",
        "Start worker processes on a temporary directory: each sends messages to the "
        "others, one at a time and then all at once, and writes a cache key; then print "
        "what each received and how fast.",
    )
    demo.add_argument(
        "--workers", type=_at_least(2), default=4, help="worker processes (at least 2)"
    )
    demo.add_argument(
        "--messages", type=_at_least(1), default=500, help="messages each worker sends at once"
    )

    listen = command("listen", "print messages as they arrive")
    listen.add_argument("events", nargs="+", metavar="EVENT", help="event names to listen to")
    listen.add_argument("--json", action="store_true", help="one JSON object per line")
    listen.add_argument(
        "--count",
        type=_at_least(1),
        default=None,
        metavar="N",
        help="exit after N messages (default: run until Ctrl-C)",
    )

    notify = command("notify", "send one message to the other processes")
    notify.add_argument("event", metavar="EVENT", help="event name")
    notify.add_argument(
        "message",
        metavar="MESSAGE",
        help="JSON (e.g. '{\"id\": 7}', 42, '\"007\"'), or a plain word, sent as a string",
    )
    notify.add_argument("--string", action="store_true", help="send MESSAGE as a string, as is")

    cache = command(
        "cache",
        "read or write the shared cache",
        "Read or write a shared cache: every running process of the application sees "
        "the change. The cache outlives the processes (its entries stay in the shared "
        "directory or in Redis until their TTL ends): `cache clear` starts it clean.",
    )
    cache.add_argument("--cache", default="default", metavar="NAME", help="cache name")
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help: str, *aliases: str) -> argparse.ArgumentParser:
        p = actions.add_parser(
            name, help=help, description=help, formatter_class=formatter, aliases=aliases
        )
        _common(p, top=False)
        p.add_argument("--cache", default=argparse.SUPPRESS, metavar="NAME", help="cache name")
        return p

    def key(p: argparse.ArgumentParser) -> None:
        p.add_argument("key", metavar="KEY", help='an integer ("7") is an int key; else a str')
        p.add_argument(
            "--str-key", action="store_true", help="KEY is a str even if it looks like an int"
        )

    action("ls", "print every key and value, one JSON object per line", "list")
    key(action("get", "print a key's value as JSON (exit 1 when missing)"))
    put = action("set", "set a key in every process")
    key(put)
    put.add_argument("value", metavar="VALUE", help="JSON, or a plain word, stored as a string")
    put.add_argument("--string", action="store_true", help="store VALUE as a string, as is")
    put.add_argument(
        "--ttl",
        type=_ttl,
        default=None,
        help="seconds; 0 never expires (default: the cache's default, 60)",
    )
    key(action("del", "delete a key in every process (exit 1 when missing)", "delete"))
    action("clear", "delete every key of the cache, in every process")

    command("stats", "peers, segments, footprint, counters (JSON)")
    command("peers", "list live peers")
    sub.add_parser(
        "bench",
        help="run the benchmark suite (from a source checkout; see bench --help)",
        add_help=False,
    )
    return parser


_RUNNERS: dict[str, Callable[[argparse.Namespace, AsyncIPC], Coroutine[Any, Any, int]]] = {
    "listen": _listen,
    "notify": _notify,
    "cache": _cache,
    "stats": _stats,
    "peers": _peers,
}


async def _run(args: argparse.Namespace) -> int:
    path, namespace = _target(args)
    options: dict[str, Any] = {}
    where = path if path is not None else os.environ.get("IVIP_IPC_DIR")
    if where is not None and check_location(where) == "redis":
        options["retry_timeout"] = args.timeout
    async with AsyncIPC(path, namespace=namespace, **options) as ipc:
        return await _RUNNERS[args.command](args, ipc)


def _check_codec() -> None:
    from .records import codec_named

    name = os.environ.get("IVIP_IPC_CODEC")
    if name is None:
        return
    try:
        codec_named(name)
    except ImportError as exc:
        raise UsageError(f"IVIP_IPC_CODEC={name!r} needs a missing module: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"IVIP_IPC_CODEC: {exc}") from None


def _error_text(exc: BaseException, args: argparse.Namespace) -> str:
    from .errors import BackendError, BackendUnavailableError

    where = _describe(args)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, BackendError) and exc.__cause__ is not None:
        # The library's wrapper names the place; redis-py's error says what happened.
        cause = str(exc.__cause__) or type(exc.__cause__).__name__
        if isinstance(exc, BackendUnavailableError):
            return f"cannot reach Redis at {where}: {cause}"
        return f"Redis at {where} refused: {cause}"
    module = type(exc).__module__
    if module.startswith("redis"):
        if type(exc).__name__ in ("ConnectionError", "TimeoutError"):
            return f"cannot reach Redis at {where}: {text}"
        return f"Redis at {where} refused: {text}"
    if isinstance(exc, TimeoutError):
        return f"{where}: timed out{': ' + str(exc) if str(exc) else ''}"
    if isinstance(exc, (OSError, RuntimeError)) and where not in text:
        return f"{where}: {text}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Example:
        >>> main(["notify", "--dir", "/tmp/unused", "ev", "[1,2"])  # one line on stderr
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its options are the suite's own
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    try:
        _check_codec()
        if args.command == "demo":
            return _demo(args)
        if args.command == "notify":
            args.value = _parse_value(args.message, string=args.string, what="MESSAGE")
        if args.command == "cache" and args.action == "set":
            args.value = _parse_value(args.value, string=args.string, what="VALUE")
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        code = EXIT_FAILED
        if isinstance(exc, UnsafeDirectoryError):
            code = EXIT_UNSAFE
        elif isinstance(exc, UsageError):
            code = EXIT_USAGE
        text = _error_text(exc, args)
        if code == EXIT_FAILED:
            text += " (--debug for the traceback)"
        print(f"ivip-ipc: {text}"[:2000], file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
