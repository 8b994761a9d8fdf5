"""Pie's `inferlet.messaging`: messaging is not supported by pie yet. Importing works; every entry point raises
NotSupportedError (a PieError) that says so."""

from __future__ import annotations

from typing import Any

from ._errors import unsupported

_FEATURE = "messaging"


def push(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.messaging.push)")


async def pull(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.messaging.pull)")


def broadcast(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.messaging.broadcast)")


def subscribe(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.messaging.subscribe)")


class Subscription:
    """Not supported yet: messaging."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unsupported(f"{_FEATURE} (inferlet.messaging.Subscription)")
