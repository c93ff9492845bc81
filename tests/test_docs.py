"""Every docstring example in the package is executed."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import doctest
import importlib
import inspect
import json
import os
import pkgutil
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request

import ivip_ipc_async
from ivip_ipc_async import AsyncCache, AsyncIPC

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(ivip_ipc_async.__path__, prefix="ivip_ipc_async.")
    if not m.name.endswith("__main__")
)


@pytest.fixture
def temp_in_ipc_dir(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The examples' `tempfile.mkdtemp()` directories go into `ipc_dir`, removed after."""
    monkeypatch.setattr(tempfile, "tempdir", str(ipc_dir))
    return ipc_dir


@pytest.mark.parametrize("name", ["ivip_ipc_async", *MODULES])
def test_docstring_examples(name: str, temp_in_ipc_dir: Path) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0


# -- every public name: an example, run; and a place in the rendered reference ----------

PUBLIC: dict[str, list[str]] = {
    "ivip_ipc_async": list(ivip_ipc_async.__all__),
    "ivip_ipc_async.integrations.starlette": [
        "ipc_lifespan",
        "get_ipc",
        "get_cache",
        "ipc_from",
        "cache_from",
        "health_endpoint",
    ],
    "ivip_ipc_async.integrations.prometheus": ["IPCCollector", "multiprocess_exporter"],
    "ivip_ipc_async.integrations.otel": ["instrument"],
}
NOT_CHECKED: set[str] = set()


def public_members(cls: type) -> Iterator[tuple[str, object]]:
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            yield name, value.fget
        elif inspect.isfunction(value):
            yield name, value


# Constants exported at the top, with the module whose source documents them.
DEFINED_IN: dict[str, str] = {"GAP_EVENT": "ivip_ipc_async.ipc"}


def attribute_docstrings(module_name: str) -> dict[str, tuple[str, int]]:
    """Module attributes documented by a string after their assignment, with its line
    (a re-exported constant's from the module that defines it)."""
    module = importlib.import_module(module_name)
    docs = {}
    for name, where in DEFINED_IN.items():
        if module_name != where and hasattr(module, name):
            docs[name] = attribute_docstrings(where)[name]
    tree = ast.parse(inspect.getsource(module))
    for node, after in zip(tree.body, tree.body[1:], strict=False):
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if (
            isinstance(target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[target.id] = (after.value.value, after.lineno)
    return docs


def test_every_public_name_has_an_example() -> None:
    missing = []
    for module_name, names in PUBLIC.items():
        module = importlib.import_module(module_name)
        attributes = attribute_docstrings(module_name)
        for name in names:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = obj.__doc__ or ""
            else:  # an instance or a constant: its attribute docstring
                doc = attributes.get(name, ("", 0))[0]
            if ">>>" not in doc:
                missing.append(name)
            if inspect.isclass(obj):
                for member, fn in public_members(obj):
                    qualified = f"{name}.{member}"
                    if ">>>" not in (getattr(fn, "__doc__", None) or ""):
                        missing.append(qualified)
    assert sorted(set(missing) - NOT_CHECKED) == []


@pytest.mark.parametrize(
    ("module_name", "name"),
    [
        ("ivip_ipc_async", "IPC"),
        ("ivip_ipc_async", "Cache"),
        ("ivip_ipc_async.ipc", "GAP_EVENT"),
        ("ivip_ipc_async.integrations.starlette", "get_ipc"),
        ("ivip_ipc_async.integrations.starlette", "get_cache"),
    ],
)
def test_attribute_docstring_examples(module_name: str, name: str, temp_in_ipc_dir: Path) -> None:
    """doctest does not see the docstring of an instance or a constant: run it here."""
    module = importlib.import_module(module_name)
    doc, line = attribute_docstrings(module_name)[name]
    test = doctest.DocTestParser().get_doctest(
        doc, dict(vars(module)), f"{module_name}.{name}", module.__file__, line
    )
    assert test.examples
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_the_reference_renders_every_public_name() -> None:
    reference = (Path(__file__).parent.parent / "docs" / "reference.md").read_text()
    rendered = set(re.findall(r"^::: (\S+)$", reference, flags=re.M))
    for module_name, names in PUBLIC.items():
        for name in names:
            assert f"{module_name}.{name}" in rendered, name
    assert "ivip_ipc_async.integrations.pytest_plugin" in rendered


# -- the pages' code, run as printed -------------------------------------------------------

DOCS = Path(__file__).parent.parent / "docs"


def md_blocks(path: Path, lang: str) -> list[str]:
    """The fenced code blocks of a markdown file in one language, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def write_test_files(pytester: pytest.Pytester) -> None:
    for block in md_blocks(DOCS / "testing.md", "python"):
        name = block.split("\n", 1)[0].removeprefix("# ").strip()
        assert re.fullmatch(r"test_\w+\.py", name), name
        pytester.path.joinpath(name).write_text(block)


@pytest.mark.parametrize("config", ["toml", "ini"])
def test_testing_page_examples_pass_with_its_configuration(
    pytester: pytest.Pytester, config: str
) -> None:
    page = DOCS / "testing.md"
    if config == "toml":
        (toml,) = md_blocks(page, "toml")
        pytester.makepyprojecttoml(toml)
    else:
        (ini,) = md_blocks(page, "ini")
        pytester.path.joinpath("pytest.ini").write_text(ini)
    write_test_files(pytester)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=5)


def test_testing_page_is_right_that_async_tests_need_the_configuration(
    pytester: pytest.Pytester,
) -> None:
    pytester.path.joinpath("pytest.ini").write_text("[pytest]\n")
    write_test_files(pytester)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(failed=5)
    result.stdout.fnmatch_lines(["*async def functions are not natively supported*"])


def run_program(code: str, ipc_dir: Path, timeout: float = 30) -> list[str]:
    # TMPDIR too: an example's `tempfile.mkdtemp()` lands in `ipc_dir`, removed after.
    env = {**os.environ, "IVIP_IPC_DIR": str(ipc_dir), "TMPDIR": str(ipc_dir)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout.splitlines()


def test_getting_started_is_the_readme_quick_start() -> None:
    """The README's quick start is run twice at once by tests/test_readme.py."""
    from .test_readme import README, quick_start, shown_outputs

    index = DOCS / "index.md"
    assert md_blocks(index, "python")[0] == quick_start()
    assert [b.splitlines() for b in md_blocks(index, "text")] == shown_outputs()
    assert len(md_blocks(README, "text")) == 2


async def test_index_listen_only_program(ipc_dir: Path) -> None:
    code = md_blocks(DOCS / "index.md", "python")[1]
    listener = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code,
        env={**os.environ, "IVIP_IPC_DIR": str(ipc_dir)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        async with AsyncIPC(ipc_dir) as ipc:
            deadline = time.monotonic() + 10
            while not ipc.stats()["peers"]:  # it listens once it is a live peer
                assert time.monotonic() < deadline, "the listener did not join"
                await asyncio.sleep(0.01)
            # A live peer may not have subscribed yet (the program subscribes after
            # start() returns): send the batch again until the program has heard one.
            talking = asyncio.create_task(listener.communicate())
            while not talking.done():
                assert time.monotonic() < deadline + 10, "the listener heard nothing"
                await ipc.notify_many("ticks", [1, "last"])
                await asyncio.wait([talking], timeout=0.5)
            out, err = talking.result()
    finally:
        if listener.returncode is None:
            listener.kill()
            await listener.wait()
    assert listener.returncode == 0, err
    assert out.decode().splitlines() == ["tick 1", "tick last"]


def test_index_own_instances_program(ipc_dir: Path) -> None:
    code = md_blocks(DOCS / "index.md", "python")[2]
    assert run_program(code, ipc_dir) == ["{'status': 'paid'}", "no order shipped yet"]
    assert len(md_blocks(DOCS / "index.md", "python")) == 3  # a new block needs a test


def test_api_page_imports(ipc_dir: Path) -> None:
    block = md_blocks(DOCS / "api.md", "python")[0]
    assert run_program(block, ipc_dir) == []


def test_api_page_atomic_operations(ipc_dir: Path) -> None:
    """The atomic operations' program prints what the page says it prints."""
    _, program = md_blocks(DOCS / "api.md", "python")
    (shown,) = md_blocks(DOCS / "api.md", "text")
    assert run_program(program, ipc_dir) == shown.splitlines()


def fastapi_page_app(index: int) -> Any:
    """The `app` of a python block of docs/fastapi.md, run as a module."""
    code = md_blocks(DOCS / "fastapi.md", "python")[index]
    namespace: dict[str, Any] = {"__name__": f"fastapi_md_{index}"}
    exec(compile(code, f"docs/fastapi.md block {index}", "exec"), namespace)
    return namespace["app"]


@pytest.fixture
def docs_env(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IVIP_IPC_DIR", str(ipc_dir))
    return ipc_dir


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Serve `app` with uvicorn in this event loop; yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert not task.done(), "the server did not start"
            assert time.monotonic() < deadline, "the server did not start"
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_fastapi_page_lifespan_app(docs_env: Path) -> None:
    async with serve(fastapi_page_app(0)) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.put("/users/7", json={"name": "Ana"})).json() == {"ok": True}
        assert (await client.get("/users/7")).json() == {"name": "Ana"}
        assert (await client.post("/invalidate")).json() == {"ok": True}


async def test_fastapi_page_starlette_endpoint(docs_env: Path) -> None:
    from ivip_ipc_async import Cache

    async with serve(fastapi_page_app(1)) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/cache/k")).json() is None
        await Cache.set("k", {"v": 1})  # the same default Cache, in this loop
        assert (await client.get("/cache/k")).json() == {"v": 1}


async def test_fastapi_page_own_lifespan(docs_env: Path) -> None:
    async with serve(fastapi_page_app(2)) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/state")).json() == {"ipc": True, "http": True}
    assert (docs_env / "shop").is_dir()  # its own instance, namespace "shop"


async def test_fastapi_page_fan_out(docs_env: Path) -> None:
    from httpx_ws import aconnect_ws

    async with serve(fastapi_page_app(3)) as url, httpx.AsyncClient(base_url=url) as client:
        async with aconnect_ws(f"{url}/ws/news", client) as ws:
            assert (await client.post("/publish/news", json={"n": 1})).json() == {"ok": True}
            assert await asyncio.wait_for(ws.receive_json(), 10) == {"n": 1}
        async with client.stream("GET", "/sse/news") as events:
            lines = events.aiter_lines()
            assert (await client.post("/publish/news", json={"n": 2})).json() == {"ok": True}
            assert await asyncio.wait_for(anext(lines), 10) == 'data: {"n": 2}'


@pytest.mark.parametrize("limit", [None, "1"])
def test_fastapi_page_on_open_sse_streams_at_shutdown(
    limit: str | None, ipc_dir: Path, tmp_path: Path
) -> None:
    """What the page says: an open event stream holds uvicorn's shutdown forever,
    unless `--timeout-graceful-shutdown` is given."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "uvicorn", "examples.fastapi_app:app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "info",
    ]  # fmt: skip
    if limit is not None:
        command += ["--timeout-graceful-shutdown", limit]
        assert (
            f"--timeout-graceful-shutdown {limit.replace('1', '5')}"
            in (DOCS / "fastapi.md").read_text()
        )
    log_path = tmp_path / "uvicorn.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            command,
            cwd=DOCS.parent,
            env={**os.environ, "IVIP_IPC_DIR": str(ipc_dir)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert time.monotonic() < deadline, log_path.read_text()
            try:
                httpx.get(f"{url}/pid", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        # A plain HTTP/1.1 client, as curl is.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"GET /sse/news HTTP/1.1\r\nHost: app\r\nAccept: */*\r\n\r\n")
            received = b""
            while b"data: " not in received:
                chunk = client.recv(4096)
                assert chunk, received
                received += chunk
            server.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            if limit is None:
                with pytest.raises(subprocess.TimeoutExpired):
                    server.wait(3)  # "Waiting for connections to close", for ever
                assert "Waiting for connections to close" in log_path.read_text()
            else:
                server.wait(10)
                assert time.monotonic() - stopped < 1 + 5
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


async def square(x: int) -> int:
    return x * x


async def test_api_page_memoize_key_formula(ipc_dir: Path) -> None:
    text = " ".join((DOCS / "api.md").read_text().split())
    formula = (
        'name + ":" + json.dumps([args, kwargs], sort_keys=True, separators=(",", ":"), '
        "ensure_ascii=False)"
    )
    assert formula in text
    assert "`slow:[[1],{}]`" in text
    given = {"json": json, "name": "slow", "args": (1,), "kwargs": {}}
    assert eval(formula, given) == "slow:[[1],{}]"
    async with AsyncIPC(ipc_dir) as ipc:
        cache: AsyncCache[Any] = AsyncCache(ipc)
        slow = cache.memoize("slow", square, 30)
        assert await slow(1) == 1
        assert await cache.keys() == ["slow:[[1],{}]"]
        await cache.clear()
        assert await cache.memoize(ttl=30)(square)(2, **{}) == 4
        assert await cache.keys() == [f"{__name__}.square:[[2],{{}}]"]  # module.qualname


async def test_fastapi_page_run_once(docs_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = fastapi_page_app(4)

    @app.get("/ran")
    async def ran(request: Request) -> Any:
        return request.state.ran_migrations

    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/ran")).json() is True  # the only worker: it ran the job
    assert capsys.readouterr().out == "migrating\n"


async def test_fastapi_page_leadership(docs_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(fastapi_page_app(5)):
        deadline = time.monotonic() + 10
        while "running the due jobs" not in capsys.readouterr().out:  # this worker leads
            assert time.monotonic() < deadline, "the scheduler did not run"
            await asyncio.sleep(0.01)


async def test_fastapi_page_probes(docs_env: Path) -> None:
    """The readiness block serves 200 from a started instance, and the Kubernetes
    example probes the routes that block defines."""
    import yaml

    async with serve(fastapi_page_app(6)) as url, httpx.AsyncClient(base_url=url) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["problems"] == []
        assert (await client.get("/livez")).json() == {"ok": True}
    (pod,) = md_blocks(DOCS / "fastapi.md", "yaml")
    (container,) = yaml.safe_load(pod)["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"


def test_every_fastapi_page_block_is_run() -> None:
    assert len(md_blocks(DOCS / "fastapi.md", "python")) == 7  # a new block needs a test


def test_index_command_line_session(ipc_dir: Path, tmp_path: Path) -> None:
    """docs/index.md's commands, run as printed from one application directory."""
    lines = [
        shlex.split(line, comments=True)
        for line in md_blocks(DOCS / "index.md", "sh")[2].splitlines()
    ]
    assert [line[:2] for line in lines] == [
        ["ivip-ipc", "listen"],
        ["ivip-ipc", "notify"],
        ["ivip-ipc", "cache"],
        ["ivip-ipc", "peers"],
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IVIP_IPC")}
    env["XDG_RUNTIME_DIR"] = str(ipc_dir)
    cli = [sys.executable, "-m", "ivip_ipc_async"]

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli + args[1:], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
        )

    listener = subprocess.Popen(
        cli + lines[0][1:], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert listener.stdout is not None
        assert listener.stderr is not None
        assert "listening on user:updated in directory" in listener.stderr.readline()
        peers = run(lines[3])
        assert peers.returncode == 0
        assert len(peers.stdout.split()) == 1  # the listener
        sent = run(lines[1])
        assert sent.returncode == 0
        assert "(1 live peer(s))" in sent.stderr
        assert listener.stdout.readline() == 'user:updated: {"id": 7}\n'
        missing = run(lines[2])  # nothing set it: "not found", exit 1
        assert missing.returncode == 1
        assert "'user:7': not found in cache 'default'" in missing.stderr
    finally:
        listener.terminate()
        listener.communicate(timeout=10)


# -- docs/metrics.md ---------------------------------------------------------------------------
# (its multi-worker block runs under `uvicorn --workers 2` in tests/test_metrics.py)


def test_every_metrics_page_block_is_run() -> None:
    assert len(md_blocks(DOCS / "metrics.md", "python")) == 3  # a new block needs a test


def test_metrics_page_one_process_app(ipc_dir: Path, tmp_path: Path) -> None:
    """The single-process block, served by a real uvicorn and scraped."""
    (tmp_path / "metrics_one.py").write_text(md_blocks(DOCS / "metrics.md", "python")[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "uvicorn", "metrics_one:app", "--app-dir", str(tmp_path),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    server = subprocess.Popen(
        command,
        cwd=DOCS.parent,
        env={**os.environ, "IVIP_IPC_DIR": str(ipc_dir)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, "no answer from the app"
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                if 'ivip_ipc_healthy{namespace="default"' in text:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert "ivip_ipc_records_lost_total{" in text
        assert "ivip_ipc_footprint_bytes{" in text
    finally:
        server.terminate()
        _, err = server.communicate(timeout=15)
    assert "Traceback" not in err, err


def test_metrics_page_opentelemetry_setup(ipc_dir: Path) -> None:
    """The OpenTelemetry block, in a process of its own (it sets the global
    meter provider), then the IPC started and the reader flushed."""
    code = md_blocks(DOCS / "metrics.md", "python")[2] + textwrap.dedent(
        """
        import asyncio

        async def main():
            async with IPC:
                reader.force_flush()

        asyncio.run(main())
        metrics.get_meter_provider().shutdown()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "IVIP_IPC_DIR": str(ipc_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    exported = json.loads(done.stdout.split("\n}\n")[0] + "\n}")
    (scope,) = exported["resource_metrics"][0]["scope_metrics"]
    names = {metric["name"]: metric for metric in scope["metrics"]}
    assert names["ivip_ipc.lag"]["unit"] == "By"
    (point,) = names["ivip_ipc.healthy"]["data"]["data_points"]
    assert point["value"] == 1
    assert point["attributes"]["ivip_ipc.namespace"] == "default"
