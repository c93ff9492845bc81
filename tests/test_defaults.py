"""The default `IPC` and `Cache` instances: autostart, IVIP_IPC_DIR, new event loops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import ivip_ipc_async
from ivip_ipc_async import IPC, AsyncIPC, Cache


@pytest.fixture
def default_dir(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IVIP_IPC_DIR", str(ipc_dir))
    return ipc_dir


@pytest.fixture
async def defaults(default_dir: Path) -> AsyncIterator[Path]:
    yield default_dir
    await IPC.destroy()


async def test_default_instances_start_on_first_use(defaults: Path, until: Any) -> None:
    got: list[Any] = []
    assert Cache.ipc is IPC
    async with AsyncIPC(defaults) as other:
        other.on("hello", got.append)
        assert not IPC.started
        await IPC.notify("hello", "from default")  # starts it
        assert IPC.started
        await until(lambda: got == ["from default"])
        await Cache.set("chave", "valor", 60)
        assert await Cache.get("chave") == "valor"
        assert (defaults / "default" / "peers").is_dir()


async def test_handlers_registered_at_import_time_survive_start(defaults: Path, until: Any) -> None:
    got: list[Any] = []
    IPC.on("boot", got.append)  # as a module would, before any loop runs
    async with AsyncIPC(defaults) as other:
        await IPC.start()
        await other.notify("boot", 1)
        await until(lambda: got == [1])


async def test_first_of_two_tests_on_per_test_loops(defaults: Path) -> None:
    await Cache.set("loop", 1)
    assert await Cache.get("loop") == 1


async def test_second_of_two_tests_on_per_test_loops(defaults: Path) -> None:
    # A new event loop: the default instance restarts itself in it.
    await Cache.set("loop", 2)
    assert await Cache.get("loop") == 2
    assert IPC.started


def test_asyncio_run_twice(default_dir: Path) -> None:
    async def use(value: int) -> Any:
        await Cache.set("k", value)
        return await Cache.get("k")

    assert asyncio.run(use(1)) == 1
    # The first loop is closed; without destroy(), the instance must recover.
    assert asyncio.run(use(2)) == 2
    asyncio.run(IPC.destroy())


def test_public_names() -> None:
    assert set(ivip_ipc_async.__all__) >= {"IPC", "Cache", "AsyncIPC", "AsyncCache"}


def test_every_public_name_is_exported_at_the_top() -> None:
    """What a user imports comes from `ivip_ipc_async`: the public names of
    the submodules (errors, leadership, the gap event) are the same objects at
    the top, and no page or example imports them from a submodule."""
    import importlib
    import re
    from pathlib import Path

    for module_name in ("errors", "jobs", "ipc", "coordination", "cache"):
        module = importlib.import_module(f"ivip_ipc_async.{module_name}")
        for name in module.__all__:
            assert name in ivip_ipc_async.__all__, f"{module_name}.{name}"
            assert getattr(ivip_ipc_async, name) is getattr(module, name), name
    assert sorted(ivip_ipc_async.__all__) == sorted(set(ivip_ipc_async.__all__))
    root = Path(__file__).parent.parent
    pages = [*root.glob("docs/*.md"), root / "README.md", *root.glob("examples/*.py")]
    pages += [root / "tests" / "typing" / "usage.py"]
    submodule = re.compile(
        r"from ivip_ipc_async\.(errors|jobs|ipc|coordination|emitter|cache|records) import"
    )
    found = [
        f"{page.name}: {line.strip()}"
        for page in pages
        if page.name != "design.md"  # the map of the modules names them on purpose
        for line in page.read_text().splitlines()
        if submodule.search(line)
    ]
    assert found == []


def test_loss_causes_are_stable_names() -> None:
    """The `records_lost_<cause>` counters and the metrics' `cause` label are
    named from `LossCause`, whose values never change (dashboards use them)."""
    from ivip_ipc_async import LossCause

    assert {c.value for c in LossCause} == {
        "retention", "cap", "displaced", "corruption", "truncation", "trimmed", "restart"
    }  # fmt: skip
    assert LossCause.CAP == "cap"
    assert LossCause("retention").counter == "records_lost_retention"
