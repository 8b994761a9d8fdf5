"""Pie's `inferlet.adapter`: adapters is not supported by pie yet. Importing works; every entry point raises
NotSupportedError (a PieError) that says so."""

from __future__ import annotations

from typing import Any

from ._errors import unsupported

_FEATURE = "adapters"


class Adapter:
    """Not supported yet: adapters."""

    @classmethod
    def create(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.Adapter.create)")

    @classmethod
    def open(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.Adapter.open)")
