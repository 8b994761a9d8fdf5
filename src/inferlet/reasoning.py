"""Pie's `inferlet.reasoning`: the reasoning decoder is not supported by pie yet. Importing works; every entry point raises
NotSupportedError (a PieError) that says so."""

from __future__ import annotations

from typing import Any

from ._errors import unsupported

_FEATURE = "the reasoning decoder"


class Decoder:
    """Not supported yet: the reasoning decoder."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unsupported(f"{_FEATURE} (inferlet.Decoder)")


class Event:
    """Events of the the reasoning decoder decoder (not supported yet)."""
