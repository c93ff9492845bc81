"""Threat model: hostile names and payloads (other users and planted files: tests/directory/)."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.records import Kind, Record, encode_frame

FAKE_PEER = "00000000cafef00d"


async def test_names_with_separators_nul_and_dots_are_only_data(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, ipc_dir: Path, until: Any
) -> None:
    names = ["../../etc/passwd", "a/b\\c", "nul\x00byte", "..", "", "ü" * 1000]
    got: list[tuple[str, Any]] = []
    for name in names:
        peer_ipc.on(name, lambda m, n=name: got.append((n, m)))
    before = sorted(p.name for p in ipc_dir.rglob("*"))
    for name in names:
        await ipc.notify(name, name)
        await AsyncCache(ipc, name=name or "x").set(name, name)
    await until(lambda: len(got) == len(names))
    assert got == [(n, n) for n in names]
    await until(lambda: peer_ipc.mirror.lookup("..", "..") is not None)
    after = sorted(p.name for p in ipc_dir.rglob("*"))
    # no file was named after an event or a key: only segments/snapshots may appear
    assert {n for n in after if n not in before} <= {
        n for n in after if n.endswith((".seg", ".bin", ".tmp", ".lock"))
    }
    assert not Path("/etc/passwd.seg").exists()


async def test_huge_names_are_refused(ipc: AsyncIPC) -> None:
    with pytest.raises(ValueError, match="too long"):
        await ipc.notify("x" * 70_000, 1)
    with pytest.raises(ValueError, match="too long"):
        await AsyncCache(ipc).set("k" * 70_000, 1)
    with pytest.raises(ValueError, match="too long"):
        AsyncCache(ipc, name="n" * 70_000)


async def test_pickled_payload_in_the_directory_is_never_executed(
    ipc: AsyncIPC, ipc_dir: Path, until: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps(Exploit())
    got: list[Any] = []
    ipc.on("e", got.append)
    seg = ipc_dir / "default" / "log" / f"{FAKE_PEER}-00000001.seg"
    with caplog.at_level(logging.ERROR, logger="ivip_ipc_async"):
        seg.write_bytes(
            encode_frame(Record(Kind.MESSAGE, "e", b"", evil), 1)
            + encode_frame(Record(Kind.CACHE_SET, "default", b"sk", evil, 1, 1), 2)
            + encode_frame(Record(Kind.MESSAGE, "e", b"", b'"fine"'), 3)
        )
        os.chmod(seg, 0o600)
        await until(lambda: got == ["fine"])
        assert await AsyncCache(ipc).get("k", "unreadable") == "unreadable"
    assert not marker.exists()
    assert "could not decode" in caplog.text
