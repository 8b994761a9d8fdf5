"""Pie's `inferlet.media`: images, audio and video is not supported by pie yet. Importing works; every entry point raises
NotSupportedError (a PieError) that says so."""

from __future__ import annotations

from typing import Any

from ._errors import unsupported

_FEATURE = "images, audio and video"


class Image:
    """Not supported yet: images, audio and video."""

    @classmethod
    def from_bytes(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.Image.from_bytes)")


class Video:
    """Not supported yet: images, audio and video."""

    @classmethod
    def from_bytes(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.Video.from_bytes)")


class Audio:
    """Not supported yet: images, audio and video."""

    @classmethod
    def from_bytes(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.Audio.from_bytes)")
