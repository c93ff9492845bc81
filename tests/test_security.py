"""Threat model: other local users, hostile names, hostile files in the directory."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ivip_ipc_async import AsyncCache, AsyncIPC
from ivip_ipc_async.records import Kind, Record, encode_frame

NOBODY = 65534
FAKE_PEER = "00000000cafef00d"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def _as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a child process as another local user."""
    # Import first: after the switch, root's Python installation may be unreadable.
    prelude = f"import os, socket\nos.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@needs_root
async def test_another_user_can_neither_read_nor_inject(ipc: AsyncIPC, ipc_dir: Path) -> None:
    await ipc.notify("secret", {"token": "s3cr3t"})
    await AsyncCache(ipc).set("k", "v")
    os.chmod(ipc_dir, 0o755)  # even with the outer directory open to all ...
    ns = ipc_dir / "default"
    result = _as_nobody(
        f"""
        ns = {str(ns)!r}
        for attempt in (
            lambda: os.listdir(ns),
            lambda: os.listdir(ns + "/log"),
            lambda: open(ns + "/snapshot.bin", "rb").read(),
            lambda: open(ns + "/log/{FAKE_PEER}-00000001.seg", "wb").write(b"x"),
        ):
            try:
                attempt()
                print("ALLOWED")
            except PermissionError:
                print("denied")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["denied"] * 4


@needs_root
async def test_another_user_cannot_ring_a_doorbell(ipc: AsyncIPC, ipc_dir: Path) -> None:
    os.chmod(ipc_dir, 0o755)
    sock = next((ipc_dir / "default" / "peers").glob("*.sock"))
    result = _as_nobody(
        f"""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.sendto(b"P", {str(sock)!r})
            print("ALLOWED")
        except PermissionError:
            print("denied")
        """
    )
    assert result.stdout.strip() == "denied", result.stderr


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


async def test_symlinks_planted_in_the_directory_are_not_followed(
    ipc: AsyncIPC, peer_ipc: AsyncIPC, ipc_dir: Path, tmp_path: Path, until: Any
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    log = ipc_dir / "default" / "log"
    peers = ipc_dir / "default" / "peers"
    # A "segment" and a "dead peer's lock" that point outside the directory.
    (log / f"{FAKE_PEER}-00000001.seg").symlink_to(outside)
    (peers / f"{FAKE_PEER}.lock").symlink_to(outside)
    got: list[Any] = []
    peer_ipc.on("e", got.append)
    await ipc.notify("e", 1)
    await until(lambda: got == [1])
    await until(lambda: ipc.stats()["rescans"] >= 2)
    assert outside.read_text() == "keep me"  # never written, truncated or deleted


async def test_a_peer_cannot_make_another_delete_files_outside(
    ipc_dir: Path, tmp_path: Path, until: Any
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data").write_text("precious")
    async with AsyncIPC(ipc_dir, retention=0.0, rescan_interval=0.02):
        peers = ipc_dir / "default" / "peers"
        # A dead peer whose lock file is real but whose "segments" are symlinks
        # and oddly named files: collection must only unlink names in log/.
        lock = peers / f"{FAKE_PEER}.lock"
        lock.write_text("{}")
        os.chmod(lock, 0o600)
        (ipc_dir / "default" / "log" / f"{FAKE_PEER}-00000001.seg").symlink_to(victim / "data")
        await until(lambda: not lock.exists())
    assert (victim / "data").read_text() == "precious"
