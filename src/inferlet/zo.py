"""Pie's `inferlet.zo`: zo (evolution strategies) is not supported by pie yet. Importing works; every entry point raises
NotSupportedError (a PieError) that says so."""

from __future__ import annotations

from typing import Any

from ._errors import unsupported

_FEATURE = "zo (evolution strategies)"


def adapter_seed(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.zo.adapter_seed)")


def initialize(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.zo.initialize)")


def update(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.zo.update)")
