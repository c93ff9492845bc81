"""Metrics (issue #25): every figure of stats() and health() as Prometheus
metrics (a collector, and prometheus_client's multiprocess mode scraped from a
real `uvicorn --workers 2`) and as OpenTelemetry instruments."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.integrations.figures import KNOWN, figures
from ivip_ipc_async.integrations.otel import instrument
from ivip_ipc_async.integrations.prometheus import IPCCollector

from .redis_server import free_port
from .test_backends import medium  # noqa: F401 - the parametrized fixture
from .test_docs import DOCS, md_blocks
from .test_integrations import _all_workers

ROOT = Path(__file__).resolve().parent.parent


def open_ipc(medium: str) -> AsyncIPC:  # noqa: F811
    path, _, namespace = medium.partition("#")
    return AsyncIPC(path, namespace=namespace or "metrics")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text exposition -> {(sample name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


async def test_every_number_of_stats_and_health_is_exported(medium: str) -> None:  # noqa: F811
    async with open_ipc(medium) as ipc, open_ipc(medium) as other:
        got: list[int] = []
        ipc.on("x", got.append)
        for i in range(5):
            await other.notify("x", i)
        deadline = asyncio.get_running_loop().time() + 10
        while len(got) < 5:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        cache, other_cache = AsyncCache(ipc), AsyncCache(ipc, name="other")
        async with ipc.lock("metrics"):
            await cache.set("k", 1, 0.05)
            await cache.get("k")  # a hit
        await other_cache.get("absent")  # a miss, in another cache of the instance
        await asyncio.sleep(0.06)
        await cache.get("k")  # an expired entry: a miss and an expiration
        stats = ipc.stats()
        assert (stats["lock_waits"], stats["lock_holds"]) == (1, 1)
        assert stats["lock_wait_seconds"] >= 0
        assert stats["lock_hold_seconds"] > 0
        assert (stats["cache_hits"], stats["cache_misses"], stats["cache_expirations"]) == (1, 2, 1)
        exported = {figure.name for figure in figures(ipc)}
        for key, value in stats.items():
            if isinstance(value, bool | int | float) and not key.startswith("records_lost"):
                spec = KNOWN.get(key)
                assert (spec.name if spec else key) in exported, key
        assert {"records_lost", "healthy", "problems", "info"} <= exported
        # health()'s peers and lag_bytes are stats()'s (Redis tracks no peers: none)
        assert ("peers" in exported) == ("peers" in stats)

        registry = CollectorRegistry()
        registry.register(IPCCollector(ipc))
        found = samples(generate_latest(registry).decode())
        peer = stats["peer"]
        namespace = medium.partition("#")[2] or "metrics"
        labels = frozenset({"namespace": namespace, "peer": peer}.items())
        assert found[("ivip_ipc_records_read_total", labels)] >= 5
        assert found[("ivip_ipc_healthy", labels)] == 1
        assert found[("ivip_ipc_started", labels)] == 1
        assert found[("ivip_ipc_dispatch_time_seconds_total", labels)] >= 0
        assert found[("ivip_ipc_records_lost_total", labels | {("cause", "unknown")})] == 0
        backend = "redis" if medium.startswith("redis") else "directory"
        info = [k for k in found if k[0] == "ivip_ipc_info"]
        assert len(info) == 1
        assert ("backend", backend) in info[0][1]
        if backend == "directory":
            assert found[("ivip_ipc_peers", labels)] == 1
            assert ("ivip_ipc_footprint_bytes", labels) in found
            assert ("ivip_ipc_lag_bytes", labels) in found
        else:
            assert found[("ivip_ipc_connected", labels)] == 1


async def test_opentelemetry_instruments_read_by_the_sdk(medium: str) -> None:  # noqa: F811
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        async with open_ipc(medium) as ipc:
            instrument(ipc, meter=provider.get_meter("test"))
            await ipc.notify("x", 1)
            await ipc.notify("x", 2)
            data = reader.get_metrics_data()
        assert data is not None
        metrics = {
            m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        }
        assert metrics["ivip_ipc.records_written"].data.data_points[0].value >= 2
        assert metrics["ivip_ipc.records_written"].data.is_monotonic
        assert metrics["ivip_ipc.healthy"].data.data_points[0].value == 1
        assert metrics["ivip_ipc.dispatch_time"].unit == "s"
        (lost,) = metrics["ivip_ipc.records_lost"].data.data_points
        assert lost.attributes["ivip_ipc.cause"] == "unknown"
        assert lost.attributes["ivip_ipc.peer"] == ipc.stats().get(
            "peer", lost.attributes["ivip_ipc.peer"]
        )
        if not medium.startswith("redis"):
            assert metrics["ivip_ipc.footprint"].unit == "By"
            assert metrics["ivip_ipc.peers"].unit == "{peer}"
        assert all(name.startswith("ivip_ipc.") for name in metrics)
    finally:
        provider.shutdown()


def test_the_package_imports_without_the_metrics_libraries() -> None:
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"  # import of it raises ImportError
        "sys.modules['opentelemetry'] = None\n"
        "import ivip_ipc_async, ivip_ipc_async.integrations.prometheus\n"
        "import ivip_ipc_async.integrations.otel, ivip_ipc_async.integrations.figures\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout == "ok\n", done.stderr


# -- a real multi-worker app, scraped over HTTP -----------------------------------------------

# docs/metrics.md's multi-worker app, and two routes for the test.
APP = md_blocks(DOCS / "metrics.md", "python")[1] + textwrap.dedent(
    """

    import os


    @app.get("/pid")
    async def pid():
        return {"pid": os.getpid()}


    @app.post("/notify")
    async def notify():
        await IPC.notify("x", 1)
        return {"pid": os.getpid()}


    @app.post("/lock-and-cache")
    async def lock_and_cache():
        from ivip_ipc_async import Cache

        async with IPC.lock("metrics-test", timeout=10):
            await Cache.set("k", 1)
            await Cache.get("k")  # a hit
            await Cache.get("absent")  # a miss
        return {"pid": os.getpid()}
    """
)


@contextlib.asynccontextmanager
async def uvicorn_workers(tmp_path: Path, ipc_dir: Path) -> AsyncIterator[str]:
    (tmp_path / "metrics_app.py").write_text(APP)
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    port = free_port()
    output = tmp_path / "server.log"
    command = [
        sys.executable, "-m", "uvicorn", "metrics_app:app", "--app-dir", str(tmp_path),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--log-level", "warning",
    ]  # fmt: skip
    env = {
        **os.environ,
        "IVIP_IPC_DIR": str(ipc_dir),
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
    }
    with output.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = output.read_text(errors="replace")
    assert "Traceback" not in text, text


async def test_a_scrape_of_two_uvicorn_workers_shows_both(tmp_path: Path, ipc_dir: Path) -> None:
    async with uvicorn_workers(tmp_path, ipc_dir) as base:
        pids = await _all_workers(base, count=2)
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            for _ in range(10):
                assert (await client.post("/notify")).status_code == 200
            for _ in range(4):
                assert (await client.post("/lock-and-cache")).status_code == 200
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                found = samples((await client.get("/metrics")).text)
                peers = {
                    dict(labels).get("pid"): value
                    for (name, labels), value in found.items()
                    if name == "ivip_ipc_peers"
                }
                written = sum(
                    v for (n, _), v in found.items() if n == "ivip_ipc_records_written_total"
                )
                read = sum(v for (n, _), v in found.items() if n == "ivip_ipc_records_read_total")
                # Each worker sees the other; every record written was read by the other.
                # (10 messages and 4 cache writes)
                if peers == {str(p): 1.0 for p in pids} and written == 14 and read == 14:
                    break
                assert loop.time() < deadline, (pids, peers, written, read)
                await asyncio.sleep(0.1)
            healthy = {
                dict(labels)["pid"]
                for (name, labels), value in found.items()
                if name == "ivip_ipc_healthy" and value == 1
            }
            assert healthy == {str(p) for p in pids}
            assert all(
                dict(labels)["namespace"] == "default"  # $IVIP_IPC_DIR's
                for (name, labels) in found
                if name.startswith("ivip_ipc_")
            )
            assert not any(re.search(r"ivip_ipc_\w+_total_total", name) for name, _ in found)

            def total(name: str) -> float:
                return sum(v for (n, _), v in found.items() if n == name)

            # Lock waits and holdings, and every cache's reads, moved (issue #25).
            assert total("ivip_ipc_lock_waits_total") == 4
            assert total("ivip_ipc_lock_holds_total") == 4
            assert total("ivip_ipc_lock_wait_time_seconds_total") >= 0
            assert total("ivip_ipc_lock_hold_time_seconds_total") > 0
            assert total("ivip_ipc_cache_hits_total") == 4
            assert total("ivip_ipc_cache_misses_total") == 4
            assert total("ivip_ipc_cache_expirations_total") == 0
