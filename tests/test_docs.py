"""Every docstring example in the package is executed."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

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
