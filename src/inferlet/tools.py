"""Pie's `inferlet.tools`: tool calling is not supported by pie yet. Importing works; every entry point raises
NotSupportedError (a PieError) that says so."""

from __future__ import annotations

from typing import Any

from ._errors import unsupported

_FEATURE = "tool calling"


def equip_prefix(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.tools.equip_prefix)")


def answer_prefix(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.tools.answer_prefix)")


def native_matcher(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.tools.native_matcher)")


class Decoder:
    """Not supported yet: tool calling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unsupported(f"{_FEATURE} (inferlet.Decoder)")


class Event:
    """Events of the tool calling decoder (not supported yet)."""
