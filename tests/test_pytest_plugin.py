"""The pytest plugin, run in a separate pytest process by `pytester`."""

from __future__ import annotations

import pytest

USER_TESTS = '''
import asyncio
from ivip_ipc_async import IPC, Cache, AsyncCache, AsyncIPC


async def test_ipc_and_cache(ivip_ipc, ivip_cache, ivip_dir):
    assert ivip_ipc.started
    await ivip_cache.set("k", "v")
    assert await ivip_cache.get("k") == "v"
    assert str(ivip_dir) in ivip_ipc.stats()["path"]


async def test_defaults_point_at_the_isolated_dir(ivip_defaults):
    await Cache.set("k", 1)
    assert IPC.stats()["path"].startswith(str(ivip_defaults))


async def test_defaults_again_in_a_new_loop(ivip_defaults):
    assert await Cache.get("k") is None  # a fresh directory per test
    await IPC.notify("x", 1)


async def test_a_real_peer(ivip_ipc, ivip_peer):
    peer = ivip_peer("""
import asyncio
from ivip_ipc_async import IPC
async def main():
    async with IPC:
        print("joined", flush=True)
        print(await IPC.wait_for("price", timeout=10), flush=True)
asyncio.run(main())
""")
    assert await peer.read_line() == "joined"
    await peer.wait_ready(ivip_ipc)
    await ivip_ipc.notify("price", 42)
    assert await peer.read_line() == "42"
'''


def test_plugin_fixtures_in_a_user_suite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_plugin_is_registered_by_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(ivip_dir):\n    assert ivip_dir.is_dir()\n")
    result = pytester.runpytest_subprocess("-q", "--fixtures", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*ivip_ipc*", "*ivip_peer*"])
