"""Pie's `inferlet.audio`: speech is not supported by pie yet. Importing works; every entry point raises
NotSupportedError (a PieError) that says so."""

from __future__ import annotations

from typing import Any

from ._errors import unsupported

_FEATURE = "speech"


class Speech:
    """Not supported yet: speech."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unsupported(f"{_FEATURE} (inferlet.Speech)")


class SpeechBuilder:
    """Not supported yet: speech."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unsupported(f"{_FEATURE} (inferlet.SpeechBuilder)")


class Voice:
    """Not supported yet: speech."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unsupported(f"{_FEATURE} (inferlet.Voice)")


def write_wav(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.audio.write_wav)")
