"""Pie's `inferlet.session`: messages and files to and from the inferlet's client.

Under `pie run` the client is the terminal: send() streams to stderr (to stdout with `pie run --stream`),
send_file() writes a temporary file and names it on stderr, receive() reads a line of stdin when stdin is
not a terminal (`printf 'hi\\n' | pie run my.py`), receive_file() reads a line naming a file. Under a server
the client is the connection. A launched child inferlet has no client: its calls raise SessionError.
The contract a front end implements is pie.runtime.session.Session.
"""

from __future__ import annotations

import json as _json
from typing import Any

from pie.runtime.scope import current_scope
from pie.runtime.session import NoSession, Session


def _session() -> Session:
    s = current_scope().session
    if s is None:
        return NoSession(
            "this inferlet has no client session (Engine.run_inferlet was called without session=)"
        )
    return s


def send(message: Any) -> None:
    """Send a message to the client. Strings are sent verbatim; objects with `model_dump_json` use it;
    anything else is JSON-encoded (json.dumps, default=str), as Pie's SDK does."""
    if not isinstance(message, str):
        dump = getattr(message, "model_dump_json", None)
        message = dump() if callable(dump) else _json.dumps(message, default=str)
    _session().send(message)


async def receive() -> str:
    """Receive a text message from the client (waits for one)."""
    return await _session().receive()


def send_file(data: bytes) -> None:
    """Send binary file data to the client."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"send_file takes bytes, got {type(data).__name__}")
    _session().send_file(bytes(data))


async def receive_file() -> bytes:
    """Receive binary file data from the client."""
    return await _session().receive_file()
