"""The README's code, run exactly as printed, as a newcomer runs it.

The quick start is run twice at once, from one working directory and with no
configuration, in real processes; what each prints is checked against the
output the README shows. Every other Python block of the README runs too, and
must print what its comments say.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


def blocks(path: Path, lang: str) -> list[str]:
    """The fenced code blocks of a markdown file in one language, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def quick_start() -> str:
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.M | re.S)[0]


def shown_outputs() -> list[list[str]]:
    """The outputs the README shows for the quick start, one list of lines per process."""
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.splitlines() for b in re.findall(r"^```text\n(.*?)^```", section, re.M | re.S)]


@pytest.fixture
def newcomer(tmp_path: Path, ipc_dir: Path) -> tuple[Path, dict[str, str]]:
    """A working directory holding hello.py, and a newcomer's environment: no
    IVIP_IPC_DIR, so the default directory and namespace are used (the per-user
    root is moved into `ipc_dir` through XDG_RUNTIME_DIR, so nothing is left behind;
    tmp_path would be too long a path for the doorbell sockets)."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "hello.py").write_text(quick_start())
    env = {k: v for k, v in os.environ.items() if not k.startswith("IVIP_IPC")}
    env["XDG_RUNTIME_DIR"] = str(ipc_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return app, env


def start(app: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "hello.py"],
        cwd=app,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> list[str]:
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert err == ""  # no warning, no traceback
    return out.splitlines()


def as_printed(lines: list[str], first: int, second: int) -> list[str]:
    """The README's sample output with its two sample pids replaced by real ones."""
    return [line.replace("4101", str(first)).replace("4188", str(second)) for line in lines]


def test_quick_start_two_processes_a_second_apart(newcomer: tuple[Path, dict[str, str]]) -> None:
    app, env = newcomer
    first = start(app, env)
    second: subprocess.Popen[str] | None = None
    try:
        assert first.stdout is not None
        # The second terminal: started once the first waits (about a second later).
        head = [first.stdout.readline().rstrip("\n"), first.stdout.readline().rstrip("\n")]
        time.sleep(1)  # "a second apart", as a person would; the result does not depend on it
        second = start(app, env)
        first_lines = head + finish(first)
        second_lines = finish(second)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    shown_first, shown_second = shown_outputs()
    assert first_lines == as_printed(shown_first, first.pid, second.pid)
    assert second_lines == as_printed(shown_second, first.pid, second.pid)


def test_quick_start_started_together(newcomer: tuple[Path, dict[str, str]]) -> None:
    """Started at the same instant, each still meets the other and ends cleanly."""
    app, env = newcomer
    procs = [start(app, env), start(app, env)]
    outputs = [finish(proc) for proc in procs]
    for proc, other, lines in zip(procs, reversed(procs), outputs, strict=True):
        me = f"pid {proc.pid}"
        assert all(line.startswith(f"{me}: ") for line in lines)
        assert lines[1] == f"{me}: waiting up to 60 s for another process"
        met = {f"{me}: hello from pid {other.pid}", f"{me}: welcome from pid {other.pid}"}
        assert met & set(lines), lines
        assert re.fullmatch(
            rf"{me}: the cache now says the last process to start was pid "
            rf"({proc.pid}|{other.pid})",
            lines[-1],
        )


def test_quick_start_alone_says_so_and_ends(newcomer: tuple[Path, dict[str, str]]) -> None:
    """Run once only, it says what to do (shortened: the 60 s wait set to 1 s)."""
    app, env = newcomer
    code = (app / "hello.py").read_text()
    assert code.count("met.wait(), 60)") == 1
    (app / "hello.py").write_text(code.replace("met.wait(), 60)", "met.wait(), 1)"))
    pid_line = finish(start(app, env))
    assert pid_line[-1].endswith(": nobody came; run this file again while one waits")


def test_more_of_the_api_prints_what_its_comments_say(tmp_path: Path, ipc_dir: Path) -> None:
    code = blocks(README, "python")[1]
    # TMPDIR: the block's `tempfile.mkdtemp()` lands in `ipc_dir` (short enough for
    # the doorbell sockets), which is removed after the test.
    env = {**os.environ, "IVIP_IPC_DIR": str(tmp_path), "TMPDIR": str(ipc_dir)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "got 1",
        "nobody was ready",
        "ticks done",
        "valor",
        "default",
        "True True",
        "0",
        "{'id': 7}",
        "{'order': 1}",
        "{'status': 'paid'}",
    ]


def test_every_python_block_of_the_readme_is_run_here() -> None:
    # The quick start and "More of the API": add a test above for any new block.
    assert len(blocks(README, "python")) == 2
    assert blocks(README, "python")[0] == quick_start()


def test_readme_commands_are_the_ones_ci_runs() -> None:
    assert blocks(README, "sh")[:2] == [
        "pip install -e . && python -m ivip_ipc_async demo\n",
        "pip install -e '.[test]' && pytest\n",
    ]
    assert "pip install -e '.[test]'" in (ROOT / ".ci" / "run").read_text()


def test_supported_pythons_are_the_ones_ci_runs() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    prefix = "Programming Language :: Python :: 3."
    classified = [c.rsplit(" ", 1)[1] for c in project["classifiers"] if c.startswith(prefix)]
    assert classified == ["3.11", "3.12", "3.13"]
    assert project["requires-python"] == ">=3.11"
    assert "versions=(3.11 3.12 3.13)" in (ROOT / ".ci" / "run").read_text()
    assert "Python 3.11, 3.12 or 3.13" in README.read_text()


async def test_destroy_right_after_an_async_handler_wakes_main(ipc_dir: Path) -> None:
    """The quick start's shape in one process: an async handler sets an event and
    returns; main wakes and destroys at once, before the handler task's done
    callbacks have run. On Python 3.12+ (where gather over finished tasks does not
    yield) destroy() used to spin for ever there: the first copy of hello.py hung."""
    import asyncio

    from ivip_ipc_async import AsyncIPC

    async with AsyncIPC(ipc_dir) as sender:
        receiver = await AsyncIPC(ipc_dir).start()
        met = asyncio.Event()

        async def on_hello(message: object) -> None:
            met.set()

        receiver.on("hello", on_hello)
        await sender.notify("hello", 1)
        await asyncio.wait_for(met.wait(), 10)
        await asyncio.wait_for(receiver.destroy(), 5)
