"""The Redis backend on the previous major of redis-py (7.x, RESP2 by default).

The rest of the suite runs on the redis-py the `test` extra installs (8.x, RESP3
by default). Here redis-py 7.x is installed into a scratch directory and the
Redis half of the contract suite (tests/test_backends.py and the Redis backend's
own tests, tests/redis_backend/) runs again in a child pytest with that directory first
on `sys.path`, so every behaviour is checked on both majors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_backends import REDIS, REDIS_URL

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def redis_py7(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding redis-py 7.x (installed once per test session)."""
    target = tmp_path_factory.mktemp("redis-py7")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            str(target),
            "redis>=7,<8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        pytest.skip(f"could not install redis-py 7.x from the package index: {done.stderr[-500:]}")
    return target


@pytest.mark.once_per_ci
@pytest.mark.skipif(not REDIS, reason=f"no Redis server answers at {REDIS_URL}")
@pytest.mark.timeout(420)
def test_the_redis_contract_holds_on_redis_py_7(redis_py7: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(redis_py7), str(HERE.parent)])}
    # The contract on redis-py 7; the whole deployments (Sentinel, Cluster:
    # once_per_ci) run once, on the redis-py the suite installs (CI's budget).
    env["IVIP_CI_REPEAT"] = "1"
    version = subprocess.run(
        [sys.executable, "-c", "import redis; print(redis.__version__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version.startswith("7."), f"the child would run redis-py {version}, not 7.x"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "-k",
            "redis",
            str(HERE / "test_backends.py"),
            str(HERE / "redis_backend"),
        ],
        env=env,
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, (
        f"on redis-py {version}:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
    )
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary, summary
    # Only skips that come from the server or the URL, never from redis-py 7 itself.
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    allowed = ("(Redis 7+)", "the relay needs", "no redis-server binary", "once_per_ci")
    assert all(any(a in line for a in allowed) for line in skips), skips
