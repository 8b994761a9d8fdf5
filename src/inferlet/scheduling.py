"""Pie's `inferlet.scheduling`: scheduling bids is not supported by pie yet. Importing works; every entry point raises
NotSupportedError (a PieError) that says so."""

from __future__ import annotations

from typing import Any

from ._errors import unsupported

_FEATURE = "scheduling bids"


def balance(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.scheduling.balance)")


def rent(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.scheduling.rent)")


def dividend(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.scheduling.dividend)")


def latency(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.scheduling.latency)")


def price(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.scheduling.price)")
