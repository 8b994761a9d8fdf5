"""Pie's Speculator protocol. Speculative decoding is not supported by pie yet: passing a speculator to
generate() raises NotSupportedError."""

from __future__ import annotations

from typing import Protocol


class Speculator(Protocol):
    def draft(self) -> tuple[list[int], list[int]]: ...

    def accept(self, tokens: list[int]) -> None: ...

    def rollback(self, n: int) -> None: ...

    def reset(self) -> None: ...
