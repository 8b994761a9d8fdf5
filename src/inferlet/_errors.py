"""The error raised by parts of Pie's SDK that pie does not implement yet."""

from __future__ import annotations

from typing import NoReturn

from pie.errors import PieError


class NotSupportedError(PieError, NotImplementedError):
    """A part of Pie's `inferlet` API that pie does not support yet (importing it works; using it raises)."""


def unsupported(feature: str, hint: str = "") -> NoReturn:
    """Raise NotSupportedError naming `feature`; `hint` says what to use instead, if anything."""
    msg = f"{feature} is not supported by pie yet"
    raise NotSupportedError(f"{msg}; {hint}" if hint else msg)
