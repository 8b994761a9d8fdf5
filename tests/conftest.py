"""Session fixtures shared by the test suite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    """Factory: tiny_checkpoint(arch) -> directory of a tiny HF checkpoint, built once per arch per session."""
    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny_{arch}"), arch)
        return cache[arch]

    return make
