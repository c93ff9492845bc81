"""The benchmark suite's shape: modules named by what they measure, importable, no
import circle among them (imports inside functions and under TYPE_CHECKING count),
and a module's page sections rewritten in place without touching the others."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _imports(path: Path) -> set[str]:
    """The benchmark modules `path` imports, wherever the import statement stands."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .harness import x
                out.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import budget, cache
                out.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("benchmarks."):
                out.add(node.module.split(".")[1])
            elif node.module == "benchmarks":
                out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("benchmarks."):
                    out.add(alias.name.split(".")[1])
    return out


def test_no_import_circle_among_the_benchmark_modules() -> None:
    modules = {p.stem: p for p in BENCHMARKS.glob("*.py")}
    graph = {name: _imports(path) & set(modules) for name, path in modules.items()}
    assert graph["harness"] == set(), "the floor imports nothing of the suite"
    assert graph["report"] <= {"harness"}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise AssertionError(f"import circle: {cycle}")
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_every_benchmark_module_imports_and_names_no_issue() -> None:
    for path in sorted(BENCHMARKS.glob("*.py")):
        importlib.import_module(f"benchmarks.{path.stem}")
        text = path.read_text()
        assert not re.search(r"(?i)\bissue\b|#\d+\b", text), path.name


def test_a_module_rewrites_only_its_own_sections() -> None:
    from benchmarks.report import replace_sections

    page = "# B\n\n## Locks\n\nold\n\n## Cache scale\n\nkept\n"
    new = replace_sections(page, {"Locks": ["new", ""], "Idle": ["added", ""]})
    assert new == "# B\n\n## Locks\n\nnew\n\n## Cache scale\n\nkept\n\n## Idle\n\nadded\n\n"
