"""Every docstring example in the package is executed."""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import ivip_ipc_async

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(ivip_ipc_async.__path__, prefix="ivip_ipc_async.")
    if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", ["ivip_ipc_async", *MODULES])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0


# -- every public name: an example, run; and a place in the rendered reference ----------

PUBLIC: dict[str, list[str]] = {
    "ivip_ipc_async": list(ivip_ipc_async.__all__),
    "ivip_ipc_async.ipc": ["GAP_EVENT"],
    "ivip_ipc_async.leader": ["run_once", "Leadership"],
    "ivip_ipc_async.integrations.starlette": [
        "ipc_lifespan",
        "get_ipc",
        "get_cache",
        "ipc_from",
        "cache_from",
    ],
}
# Methods of the leader module are reworked by another change; it gives them examples.
NOT_CHECKED = {"Leadership.is_leader", "Leadership.acquire", "Leadership.release"}


def public_members(cls: type) -> Iterator[tuple[str, object]]:
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            yield name, value.fget
        elif inspect.isfunction(value):
            yield name, value


def attribute_docstrings(module_name: str) -> dict[str, tuple[str, int]]:
    """Module attributes documented by a string after their assignment, with its line."""
    module = importlib.import_module(module_name)
    tree = ast.parse(inspect.getsource(module))
    docs = {}
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
def test_attribute_docstring_examples(module_name: str, name: str) -> None:
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
