"""The directory backend's shape: a one-way pipeline of parts around passive state.

Read from the source (every import counts: under `TYPE_CHECKING`, inside a
function), so a circle or a part reaching into a sibling fails here, not in a
review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ivip_ipc_async.backends.directory as package

HERE = Path(package.__file__).parent

# Passive state and helpers: any module may import these.
BELOW = {"state", "cap", "layout", "pacing", "inotify", "peerfiles", "recovery"}
# The few part-to-module ties that are one concern split in two files.
ALSO = {
    "reader": {"gaps"},  # the reader reports gaps through its own `Gaps`
    "gaps": {"joining"},  # the resync loads the snapshot as a joiner does
    "snapshots": {"joining"},  # reads snapshot.bin's header as a joiner does
    "locks": {"lock_handover"},  # the locks wake their waiters through it
}


def imports() -> dict[str, set[str]]:
    """Module -> the modules of this package it imports, wherever the import is."""
    out: dict[str, set[str]] = {}
    for path in HERE.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                package.__name__ + "."
            ):
                found.add((node.module or "").split(".")[3])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(package.__name__ + "."):
                        found.add(alias.name.split(".")[3])
        out[path.stem] = found - {path.stem}
    return out


def test_no_import_circle() -> None:
    graph = imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, " -> ".join([*path, module])
        if module in done:
            return
        for other in sorted(graph.get(module, ())):
            visit(other, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_only_the_backend_knows_the_parts() -> None:
    """Every module but `backend.py` (and the package's face) imports only passive
    state and helpers, and the few ties of a concern split in two files."""
    wrong = {
        module: sorted(found - BELOW - ALSO.get(module, set()))
        for module, found in imports().items()
        if module not in {"backend", "__init__"}
    }
    assert {module: found for module, found in wrong.items() if found} == {}
    assert {"state", "cap", "segments", "reader", "liveness", "doorbell", "watcher"} <= (
        imports()["backend"]
    )
