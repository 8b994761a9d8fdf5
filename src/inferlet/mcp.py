"""Pie's `inferlet.mcp`: MCP is not supported by pie yet. Importing works; every entry point raises
NotSupportedError (a PieError) that says so."""

from __future__ import annotations

from typing import Any

from ._errors import unsupported

_FEATURE = "MCP"


def available_servers(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.mcp.available_servers)")


def connect(*args: Any, **kwargs: Any) -> Any:
    unsupported(f"{_FEATURE} (inferlet.mcp.connect)")


class McpSession:
    """Not supported yet: MCP."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unsupported(f"{_FEATURE} (inferlet.mcp.McpSession)")
