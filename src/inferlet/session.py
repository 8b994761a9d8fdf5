"""Pie's `inferlet.session`: sessions is not supported by pie yet. Importing works; every entry point raises
NotSupportedError (a PieError) that says so."""

from __future__ import annotations

from typing import Any

from ._errors import unsupported

_FEATURE = "sessions"


def send(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.session.send)")


async def receive(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.session.receive)")


def send_file(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.session.send_file)")


async def receive_file(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.session.receive_file)")
