"""The package's shape, read from the source: no import circle among its modules
(an import under `TYPE_CHECKING` or inside a function counts as much as one at the
top), and the layers above the backends reach `AsyncIPC` only through its public
names and the `Medium` (docs/design.md, "The layers").

The directory backend's own rule (only `backend.py` knows the parts) is held by
tests/directory/test_structure.py; the benchmarks' by tests/test_benchmarks_layout.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ivip_ipc_async

PACKAGE = Path(ivip_ipc_async.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["ivip_ipc_async", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom, files: set[str]) -> set[str]:
    """The modules an ImportFrom depends on: `from X import m` of a module m is m;
    of a name defined in X, it is X."""
    if node.level == 0:
        base = node.module or ""
    else:
        parts = importer.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    named = {f"{base}.{alias.name}" for alias in node.names}
    modules = named & files
    return modules if len(modules) == len(named) else modules | {base}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                found |= _resolve(name, path.name == "__init__.py", node, set(files))
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        # A module imported means its package's __init__ runs first, but that is
        # the interpreter's order, not a dependency the module chose: count only
        # the modules named.
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert "ivip_ipc_async.ipc" in graph["ivip_ipc_async.cache"]
    assert "ivip_ipc_async.backends.base" in graph["ivip_ipc_async.ipc"]
    # an import inside a function counts (open_backend imports the Redis extra lazily)
    assert "ivip_ipc_async.backends.redis" in graph["ivip_ipc_async.backends"]


def test_no_import_circle_in_the_package() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError(" -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_layers_above_use_no_private_attribute_of_asyncipc() -> None:
    """cache.py, coordination.py and jobs.py go through `ipc.medium` and public
    names: an `ipc._x` (or `self.ipc._x`) in them is a reach-in."""
    offenders = []
    for name in ("cache.py", "coordination.py", "jobs.py", "integrations/figures.py"):
        for node in ast.walk(ast.parse((PACKAGE / name).read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and (
                    (isinstance(node.value, ast.Name) and node.value.id == "ipc")
                    or (isinstance(node.value, ast.Attribute) and node.value.attr == "ipc")
                )
            ):
                offenders.append(f"{name}:{node.lineno}: ipc.{node.attr}")
    assert offenders == []
