"""The `ivip-ipc` command, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def ivip(*args: str, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ivip_ipc_async", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,  # type: ignore[call-overload]
    )


def test_demo_runs_workers_and_reports() -> None:
    done = ivip("demo", "--workers", "3", "--messages", "50")
    assert done.returncode == 0, done.stderr
    assert "every worker received 100 of 100 messages: True" in done.stdout
    assert "p50 ms" in done.stdout


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
    assert missing.returncode == 1
    assert "not found" in missing.stderr
    assert ivip("cache", *d, "delete", "user:7").returncode == 1


def test_listen_receives_what_notify_sends(ipc_dir: Path) -> None:
    listener = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ivip_ipc_async",
            "listen",
            "--dir",
            str(ipc_dir),
            "--json",
            "--count",
            "2",
            "greet",
            "other",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stderr is not None
        assert "listening on greet, other" in listener.stderr.readline()
        assert ivip("notify", "--dir", str(ipc_dir), "greet", '{"to": "Ana"}').returncode == 0
        assert ivip("notify", "--dir", str(ipc_dir), "other", "hello").returncode == 0
        out, _ = listener.communicate(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(x["event"], x["message"]) for x in lines] == [
        ("greet", {"to": "Ana"}),
        ("other", "hello"),
    ]


def test_stats_and_peers(ipc_dir: Path) -> None:
    stats = ivip("stats", "--dir", str(ipc_dir))
    assert stats.returncode == 0
    data = json.loads(stats.stdout)
    assert data["backend"] == "directory"
    assert data["path"] == str(ipc_dir / "default")
    assert ivip("peers", "--dir", str(ipc_dir)).returncode == 0


def test_bad_arguments_exit_2() -> None:
    done = ivip("notify")
    assert done.returncode == 2
    assert "usage" in done.stderr
    assert ivip("frobnicate").returncode == 2


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
