"""The `ivip-ipc` command, run as a real process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_backends import REDIS_URL, needs_redis


def ivip(*args: str, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ivip_ipc_async", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,  # type: ignore[call-overload]
    )


def start_listener(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    """`ivip-ipc listen ...`, returned once it said where it listens."""
    listener = subprocess.Popen(
        [sys.executable, "-m", "ivip_ipc_async", "listen", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,  # type: ignore[call-overload]
    )
    assert listener.stderr is not None
    listener.said = listener.stderr.readline()  # type: ignore[attr-defined]
    assert "listening on" in listener.said, listener.said  # type: ignore[attr-defined]
    return listener


def finish(listener: subprocess.Popen[str]) -> str:
    try:
        out, _ = listener.communicate(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    return out


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with `code`, one line on stderr, and no traceback."""
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_namespace() -> Iterator[str]:
    namespace = f"cli-{uuid.uuid4().hex[:8]}"
    yield namespace
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"ivip:{{{namespace}}}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_demo_runs_workers_and_reports() -> None:
    done = ivip("demo", "--workers", "3", "--messages", "50")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("worker"))
    assert header.split() == [
        "worker", "pid", "received", "alone", "p50", "burst", "p50", "burst", "p99", "sent/s",
        "cache", "keys", "seen",
    ]  # fmt: skip
    rows = [line.split() for line in lines[lines.index(header) + 1 :][:3]]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    for row in rows:
        assert row[2] == "100"  # 2 other workers x 50 messages
        assert row[7:] == ["worker:0", "worker:1", "worker:2"]  # the cache keys, not ids
        alone, burst = float(row[3]), float(row[4])
        assert 0 < alone < 1000
        assert 0 < burst < 10_000
    assert "every worker received 100 of 100 burst messages: True" in done.stdout
    assert "every worker saw all 3 cache keys: True" in done.stdout
    assert "a message sent alone reached another process in " in done.stdout
    assert "ms (median of the alone p50 column);" in done.stdout
    assert "in the burst, 3 workers sending 150 messages at once on " in done.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["demo", "--workers", "0"], "argument --workers: must be at least 2, not 0"),
        (["demo", "--workers", "1"], "argument --workers: must be at least 2, not 1"),
        (["demo", "--workers", "-1"], "argument --workers: must be at least 2, not -1"),
        (["demo", "--messages", "0"], "argument --messages: must be at least 1, not 0"),
        (["demo", "--workers", "two"], "argument --workers: 'two' is not a whole number"),
        (["listen", "--count", "0", "ev"], "argument --count: must be at least 1, not 0"),
        (["listen", "--count", "-1", "ev"], "argument --count: must be at least 1, not -1"),
        (["notify", "ev", "[1,2"], "MESSAGE '[1,2' is not valid JSON"),
        (["cache", "set", "k", "{oops"], "VALUE '{oops' is not valid JSON"),
        (["notify", "--namespace", "a/b", "ev", "1"], "invalid namespace 'a/b'"),
        (["--namespace", "../x", "stats"], "invalid namespace '../x'"),
        (["stats", "--dir", "ftp://host/x"], "unsupported backend URL scheme 'ftp'"),
        (["cache", "set", "k", "v", "--ttl", "soon"], "'soon' is not a number of seconds"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["notify"], "the following arguments are required: EVENT, MESSAGE"),
        (["stats", "--app-dir", "/nonexistent-dir", "--dir", "/tmp"], "is not a directory"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(args: list[str], says: str, ipc_dir: Path) -> None:
    done = ivip(*args, env={**os.environ, "IVIP_IPC_DIR": str(ipc_dir)})
    line = one_line_error(done, 2)
    assert says in line
    assert "_demo" not in line  # the private worker stays private
    assert list(ipc_dir.iterdir()) == []  # refused before anything was written


def test_a_message_that_is_not_json_is_sent_as_a_string_only_when_asked(ipc_dir: Path) -> None:
    listener = start_listener("--dir", str(ipc_dir), "--json", "--count", "2", "ev")
    d = ["--dir", str(ipc_dir)]
    assert ivip("notify", *d, "ev", "[1,2", "--string").returncode == 0
    sent = ivip("notify", *d, "ev", "hello")  # a plain word is a string, as documented
    assert sent.returncode == 0
    assert 'sent ev: "hello" to directory' in sent.stderr
    lines = [json.loads(line)["message"] for line in finish(listener).splitlines()]
    assert lines == ["[1,2", "hello"]


def test_cache_set_get_list_delete(ipc_dir: Path) -> None:
    d = ["--dir", str(ipc_dir)]
    assert ivip("cache", *d, "set", "user:7", '{"name": "Ana"}', "--ttl", "0").returncode == 0
    assert ivip("cache", *d, "set", "7", "plain text").returncode == 0
    got = ivip("cache", *d, "get", "user:7")
    assert got.returncode == 0
    assert json.loads(got.stdout) == {"name": "Ana"}
    assert json.loads(ivip("cache", *d, "get", "7").stdout) == "plain text"  # int key 7
    listed = [json.loads(line) for line in ivip("cache", *d, "list").stdout.splitlines()]
    assert {"key": "user:7", "value": {"name": "Ana"}} in listed
    assert {"key": 7, "value": "plain text"} in listed
    assert ivip("cache", *d, "delete", "user:7").returncode == 0
    missing = ivip("cache", *d, "get", "user:7")
    assert "'user:7': not found" in one_line_error(missing, 1)
    assert ivip("cache", *d, "delete", "user:7").returncode == 1


def test_string_keys_that_look_like_numbers(ipc_dir: Path) -> None:
    d = ["--dir", str(ipc_dir)]
    assert ivip("cache", *d, "set", "007", "bond").returncode == 0  # not int 7
    assert ivip("cache", *d, "set", "7", "str", "--str-key").returncode == 0
    assert ivip("cache", *d, "set", "7", "int").returncode == 0
    assert ivip("cache", *d, "set", "n", "42", "--string").returncode == 0
    listed = [json.loads(line) for line in ivip("cache", *d, "list").stdout.splitlines()]
    assert listed == [
        {"key": 7, "value": "int"},
        {"key": "007", "value": "bond"},
        {"key": "7", "value": "str"},
        {"key": "n", "value": "42"},
    ]
    assert json.loads(ivip("cache", *d, "get", "7", "--str-key").stdout) == "str"
    assert json.loads(ivip("cache", *d, "get", "7").stdout) == "int"


def test_dir_and_namespace_in_any_position(ipc_dir: Path) -> None:
    d = ["--dir", str(ipc_dir)]
    n = ["--namespace", "shop"]
    assert ivip(*d, *n, "cache", "set", "k", "1").returncode == 0
    for args in (
        [*d, *n, "cache", "list"],
        ["cache", *d, *n, "list"],
        ["cache", "list", *d, *n],
        [*d, "cache", *n, "list"],
        ["cache", "--cache", "default", "list", *n, *d],
    ):
        done = ivip(*args)
        assert done.returncode == 0, (args, done.stderr)
        assert [json.loads(x) for x in done.stdout.splitlines()] == [{"key": "k", "value": 1}]
        assert done.stderr == f"ivip-ipc: cache 'default' in directory {ipc_dir}, namespace shop\n"
    assert ivip("cache", "list", *d, "--quiet", *n).stderr == ""
    assert ivip("cache", "list", *d).stdout == ""  # the namespace "default": another one


def test_listen_receives_what_notify_sends(ipc_dir: Path) -> None:
    listener = start_listener("--dir", str(ipc_dir), "--json", "--count", "2", "greet", "other")
    said = listener.said  # type: ignore[attr-defined]
    assert said == (
        f"listening on greet, other in directory {ipc_dir}, namespace default, until 2 message(s)\n"
    )
    assert ivip("notify", "--dir", str(ipc_dir), "greet", '{"to": "Ana"}').returncode == 0
    assert ivip("notify", "--dir", str(ipc_dir), "other", "hello").returncode == 0
    lines = [json.loads(line) for line in finish(listener).splitlines()]
    assert [(x["event"], x["message"]) for x in lines] == [
        ("greet", {"to": "Ana"}),
        ("other", "hello"),
    ]


def test_reach_an_app_started_from_another_directory(ipc_dir: Path, tmp_path: Path) -> None:
    """With no --dir, the namespace follows the working directory; --app-dir reaches it."""
    app, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    app.mkdir()
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "IVIP_IPC_DIR"}
    env["XDG_RUNTIME_DIR"] = str(ipc_dir)
    listener = start_listener("--count", "1", "ev", cwd=app, env=env)
    said = listener.said  # type: ignore[attr-defined]
    assert f"in directory {ipc_dir}/ivip-ipc, namespace app-" in said
    assert f"(from the working directory {app})" in said
    # From elsewhere, the notifier says where it sends: nobody listens there.
    missed = ivip("notify", "ev", "1", cwd=elsewhere, env=env)
    assert missed.returncode == 0
    assert f"(from the working directory {elsewhere}) (0 live peer(s))" in missed.stderr
    hit = ivip("notify", "ev", "2", "--app-dir", str(app), cwd=elsewhere, env=env)
    assert hit.returncode == 0
    assert f"(from --app-dir {app}) (1 live peer(s))" in hit.stderr
    assert finish(listener) == "ev: 2\n"


def test_stats_and_peers(ipc_dir: Path) -> None:
    stats = ivip("stats", "--dir", str(ipc_dir))
    assert stats.returncode == 0
    data = json.loads(stats.stdout)
    assert data["backend"] == "directory"
    assert data["path"] == str(ipc_dir / "default")
    nobody = ivip("peers", "--dir", str(ipc_dir), "--quiet")
    assert nobody.returncode == 0
    assert nobody.stdout == ""
    assert nobody.stderr == f"ivip-ipc: no peers in directory {ipc_dir}, namespace default\n"
    listener = start_listener("--dir", str(ipc_dir), "--count", "1", "ev")
    try:
        peers = ivip("peers", "--dir", str(ipc_dir))
        assert peers.returncode == 0
        assert len(peers.stdout.split()) == 1
        assert "1 live peer(s) in directory" in peers.stderr
    finally:
        ivip("notify", "--dir", str(ipc_dir), "ev", "1")
        finish(listener)


@needs_redis
def test_peers_and_messages_on_redis(redis_namespace: str) -> None:
    where = ["--dir", REDIS_URL, "--namespace", redis_namespace]
    nobody = ivip("peers", *where)
    assert nobody.stdout == ""
    assert f"no peers in Redis {REDIS_URL}, namespace {redis_namespace}" in nobody.stderr
    listener = start_listener(*where, "--count", "1", "ev")
    try:
        peers = ivip("peers", *where)
        sent = ivip("notify", *where, "ev", '{"a": 1}')
    finally:
        out = finish(listener)
    assert peers.returncode == 0, peers.stderr
    assert len(peers.stdout.split()) == 1
    assert sent.returncode == 0
    assert "(1 live peer(s))" in sent.stderr
    assert out == 'ev: {"a": 1}\n'


def test_unreachable_redis_is_one_line_exit_1() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    line = one_line_error(ivip("stats", "--dir", url, "--timeout", "1"), 1)
    assert line.startswith(f"ivip-ipc: cannot reach Redis at {url}: ")
    debug = ivip("stats", "--dir", url, "--debug", "--timeout", "1")
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr


def test_unknown_redis_host_is_one_line_exit_1() -> None:
    url = "redis://no-such-host.invalid:6379/0"
    assert f"cannot reach Redis at {url}" in one_line_error(
        ivip("peers", "--dir", url, "--timeout", "1"), 1
    )


def test_redis_password_is_not_printed() -> None:
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    line = one_line_error(ivip("stats", "--dir", url, "--timeout", "1"), 1)
    assert "s3cret" not in line
    assert "user:***@127.0.0.1" in line


def test_timeout_bounds_the_wait_for_an_unreachable_redis() -> None:
    """`--timeout` is how long the command keeps trying (10 s by default); a bad
    value is a usage error (exit 2) naming it."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    one_line_error(ivip("stats", "--dir", url, "--timeout", "1"), 1)
    assert time.monotonic() - started < 9  # the default would wait 10 s
    for bad in ("0", "-1", "soon", "inf"):
        assert "--timeout" in one_line_error(ivip("stats", "--dir", url, "--timeout", bad), 2)


def test_redis_without_redis_py_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['redis'] = None  # as if redis-py were not installed\n"
        "from ivip_ipc_async.cli import main\n"
        "sys.exit(main(['peers', '--dir', 'redis://127.0.0.1:6379/0']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    line = one_line_error(done, 2)
    assert line == (
        "ivip-ipc: redis://127.0.0.1:6379/0 needs redis-py: pip install 'ivip-ipc-async[redis]'"
    )


@needs_redis
def test_redis_db_out_of_range_is_one_line_exit_1() -> None:
    url = REDIS_URL.rsplit("/", 1)[0] + "/99999"
    line = one_line_error(ivip("cache", "list", "--dir", url), 1)
    assert "refused: DB index is out of range" in line


def test_a_bad_codec_in_the_environment(ipc_dir: Path) -> None:
    env = {**os.environ, "IVIP_IPC_CODEC": "bogus", "IVIP_IPC_DIR": str(ipc_dir)}
    helped = ivip("--help", env=env)
    assert helped.returncode == 0
    assert "exit codes:" in helped.stdout
    line = one_line_error(ivip("stats", env=env), 2)
    assert line == (
        "ivip-ipc: IVIP_IPC_CODEC: unknown codec 'bogus': use 'json' or 'orjson', or pass a Codec"
    )
    # The package still imports; the default instance says what is wrong when used.
    code = (
        "import asyncio, ivip_ipc_async\n"
        "try:\n"
        "    asyncio.run(ivip_ipc_async.Cache.set('k', 1))\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("$IVIP_IPC_CODEC: unknown codec 'bogus'")


@pytest.mark.parametrize("command", ["demo", "listen", "notify", "cache", "stats", "peers"])
def test_subcommand_help_has_text_and_defaults(command: str) -> None:
    done = ivip(command, "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    if command == "demo":
        assert "worker processes (at least 2) (default: 4)" in text
        assert "messages each worker sends at once (default: 500)" in text
    else:
        assert "--dir DIR shared directory, or a redis:// URL (default: $IVIP_IPC_DIR" in text
        assert "--app-dir PATH reach the application started from PATH" in text
    if command == "cache":
        assert "--cache NAME cache name (default: default)" in text


def test_cache_set_help_has_defaults() -> None:
    done = ivip("cache", "set", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--ttl TTL seconds; 0 never expires (default: the cache's default, 60)" in text
    assert "--str-key KEY is a str even if it looks like an int" in text
    assert "--dir DIR" in text


def test_unsafe_directory_exits_3(ipc_dir: Path) -> None:
    target = ipc_dir / "open"
    target.mkdir()
    os.chmod(target, 0o777)
    done = ivip("stats", "--dir", str(target))
    assert done.returncode == 3
    assert "group or others can write" in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a directory's owner needs root")
def test_foreign_directory_exits_3(ipc_dir: Path) -> None:
    theirs = ipc_dir / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    done = ivip("cache", "--dir", str(theirs), "list")
    assert done.returncode == 3
    assert "owned by uid 65534" in done.stderr


def test_bench_outside_a_checkout_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ivip_ipc_async.cli import main; sys.exit(main(['bench', '--help']))",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    # From a checkout (this one), the suite's own help is printed.
    assert done.returncode == 0, done.stderr
    assert "python -m benchmarks" in done.stdout


def test_bench_help_of_an_installed_package_says_what_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Installed from a wheel there is no benchmarks/ beside the package: `bench
    --help` explains where the suite lives (it printed an error), and running it
    says so on stderr with a failing exit."""
    from ivip_ipc_async.cli import _bench

    assert _bench(["--help"], roots=[str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ivip-ipc bench")
    assert "source checkout" in out
    assert _bench(["--quick"], roots=[str(tmp_path)]) == 1
    assert "lives in the source tree" in capsys.readouterr().err
