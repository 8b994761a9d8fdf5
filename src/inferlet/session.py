"""Pie's `inferlet.session`: messages and files between the inferlet and the client that launched it.

Works for inferlets launched through `pie serve` (the client's signal_process / transfer_file arrive
at receive() / receive_file(); send() / send_file() become the client's `message` / `file` events).
Under `pie run` there is no client: every call raises NoSessionError (a PieError) that says so.
"""

from __future__ import annotations

import json as _json
from typing import Any

from pie.runtime.scope import current_scope
from pie.runtime.session import require_session


def _channel():
    return require_session(current_scope().session)


def send(message: Any) -> None:
    """Send a message to the client: a str verbatim, anything else as JSON (as Pie's SDK does)."""
    if not isinstance(message, str):
        dump = getattr(message, "model_dump_json", None)
        message = dump() if callable(dump) else _json.dumps(message, default=str)
    _channel().send(message)


async def receive() -> str:
    """The next text message the client sent to this process."""
    return await _channel().receive()


def send_file(data: bytes, name: str | None = None) -> None:
    """Send binary data to the client (`name`: a suggested file name)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"send_file takes bytes, got {type(data).__name__}")
    _channel().send_file(bytes(data), name)


async def receive_file() -> bytes:
    """The next file the client transferred to this process."""
    return await _channel().receive_file()
