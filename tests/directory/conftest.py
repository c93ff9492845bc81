"""Fixtures of the directory backend's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .helpers import Script


@pytest.fixture
def scripts() -> Iterator[list[Script]]:
    started: list[Script] = []
    yield started
    for script in started:
        script.kill()
