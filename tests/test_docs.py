"""Every docstring example in the package is executed."""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import subprocess
import sys
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


def test_readme_quick_start_runs(ipc_dir: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    env = {**os.environ, "IVIP_IPC_DIR": str(ipc_dir)}
    done = subprocess.run(
        [sys.executable, "-c", block], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "valor",
        "default",
        "{'id': 7}",
        "{'order': 1}",
    ]
