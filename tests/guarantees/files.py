"""Files planted in, removed from, or damaged in the namespace directory under
running peers (docs/design.md, "On disk" and "Untrusted files").

`apply(ns_dir, event)` does one of them and returns what it did, in words. The
choice among the files present is drawn from the event's own number, so the
same schedule picks the same kind of target (which files exist depends on timing).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path

from .schedule import Event

__all__ = ["apply"]

GARBAGE_NOTES = (b"1e308", b'"12"', b"-7", b"[1, 2]", b'{"fence": "x"}', b"\xff\xfe\x00")


def _pick(rnd: random.Random, paths: list[Path]) -> Path | None:
    paths = sorted(paths)
    return rnd.choice(paths) if paths else None


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def apply(ns: Path, event: Event) -> str:
    rnd = random.Random(event.args.get("n", 0))
    junk = rnd.randbytes(rnd.randint(1, 200))
    try:
        if event.kind == "plant":
            return _plant(ns, event.args["where"], rnd, junk)
        if event.kind == "remove":
            return _remove(ns, event.args["what"], rnd)
        if event.kind == "lockfile":
            return _lockfile(ns, event.args["how"], rnd)
    except OSError as exc:
        return f"failed: {exc}"
    return f"unknown event {event.kind}"


def _plant(ns: Path, where: str, rnd: random.Random, junk: bytes) -> str:
    if where == "log":
        if rnd.random() < 0.5:
            path = ns / "log" / f"{rnd.getrandbits(63):016x}-00000001.seg"
            _write(path, junk)
            return f"planted {path.name} ({len(junk)} garbage bytes, no such peer)"
        target = _pick(rnd, list((ns / "log").glob("*.seg")))
        if target is None:
            return "no segment to append to"
        with open(target, "ab") as f:
            f.write(junk)
        return f"appended {len(junk)} garbage bytes to {target.name}"
    if where == "peers":
        name = rnd.choice(
            [f"{rnd.getrandbits(63):016x}.lock", "junk", f"{rnd.getrandbits(63):016x}.sock"]
        )
        _write(ns / "peers" / name, junk)
        return f"planted peers/{name} ({len(junk)} garbage bytes)"
    if where == "locks":
        (ns / "locks").mkdir(mode=0o700, exist_ok=True)
        name = rnd.choice(["junk", "u.zz", "m.0000"])
        _write(ns / "locks" / name, junk)
        return f"planted locks/{name}"
    if where == "snapshot":
        if not (ns / "snapshot.bin").exists():
            return "no snapshot to damage"
        _write(ns / "snapshot.bin", junk)
        return f"overwrote snapshot.bin with {len(junk)} garbage bytes"
    name = f"junk-{rnd.randrange(1000)}"
    _write(ns / name, junk)
    return f"planted {name}"


def _remove(ns: Path, what: str, rnd: random.Random) -> str:
    if what == "peers_dir":
        shutil.rmtree(ns / "peers", ignore_errors=True)
        return "removed peers/ (rm -rf)"
    if what == "snapshot":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ns / "snapshot.bin")
            return "removed snapshot.bin"
        return "no snapshot.bin"
    if what == "peer_files":  # one peer's lock file and doorbell both
        target = _pick(rnd, list((ns / "peers").glob("*.lock")))
        if target is None:
            return "no peers/*.lock"
        for path in (target, target.with_suffix(".sock")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return f"removed peers/{target.stem}.lock and .sock"
    pattern = "*.lock" if what == "peer_lock" else "*.sock"
    target = _pick(rnd, list((ns / "peers").glob(pattern)))
    if target is None:
        return f"no peers/{pattern}"
    os.unlink(target)
    return f"removed peers/{target.name}"


def _lockfile(ns: Path, how: str, rnd: random.Random) -> str:
    locks = ns / "locks"
    candidates = [p for p in locks.glob("*") if p.name in ("u.a", "u.b", "l.boss")]
    target = _pick(rnd, candidates)
    if target is None:
        return "no lock file yet"
    if how == "unlink":
        os.unlink(target)
        return f"unlinked locks/{target.name}"
    if how == "directory":
        os.unlink(target)
        os.mkdir(target, 0o700)
        return f"replaced locks/{target.name} by a directory"
    data = rnd.choice(GARBAGE_NOTES)
    _write(target, data)
    return f"overwrote locks/{target.name} with {data!r}"
