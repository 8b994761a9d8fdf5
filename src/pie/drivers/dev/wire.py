"""The dev driver's channel: length-prefixed msgpack frames over a local socket.

Frame = 8-byte little-endian body length + msgpack body. Every body is a map with a
"type" key; the message set (client -> server, then server -> client):

    hello    {version, spec}        ->  ready {version, capabilities} | error {message, traceback}
    forward  {id, batch}            ->  result {id, result}           | error {id, message, kind}
    page_ops {id, ops}              ->  page_result {id, result}      | error {id, message, kind}
    shutdown {}                     ->  bye {}

forward and page_ops share one id sequence and are answered in arrival order. Arrays travel as
ForwardBatch/ForwardResult/PageOps/PageOpsResult.to_wire() dicts (dtype, shape, raw bytes), so a
frame is one copy of the array data plus a few hundred bytes. msgpack (not pickle) keeps the
channel language-neutral and safe to decode; the 8-byte length allows frames over 4 GiB
(e.g. full logits of a large batch).

The server side is blocking (`SyncChannel`, one thread, a socket); the client side is
asyncio (`read_frame` / `write_frame` on a StreamReader/StreamWriter pair).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgpack

from pie.drivers.protocol import Capabilities, ForwardBatch, ForwardResult, PageOps, PageOpsResult
from pie.drivers.spec import ExecutorSpec

HEADER = struct.Struct("<Q")
# A sanity bound, not a real limit: a corrupted or foreign stream shows up as an absurd length.
MAX_FRAME_BYTES = 1 << 40

MESSAGE_TYPES = ("hello", "ready", "error", "forward", "result", "page_ops", "page_result", "shutdown", "bye")


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame or message."""


# ---- message constructors ------------------------------------------------------------------


def hello(version: int, spec: ExecutorSpec) -> dict:
    return {"type": "hello", "version": version, "spec": spec.to_wire()}


def ready(version: int, capabilities: Capabilities) -> dict:
    return {"type": "ready", "version": version, "capabilities": capabilities.to_wire()}


def error(message: str, *, id: int | None = None, traceback: str = "", kind: str = "") -> dict:
    return {"type": "error", "id": id, "message": message, "traceback": traceback, "kind": kind}


def forward(id: int, batch: ForwardBatch) -> dict:
    return {"type": "forward", "id": id, "batch": batch.to_wire()}


def result(id: int, res: ForwardResult) -> dict:
    return {"type": "result", "id": id, "result": res.to_wire()}


def page_ops(id: int, ops: PageOps) -> dict:
    return {"type": "page_ops", "id": id, "ops": ops.to_wire()}


def page_result(id: int, res: PageOpsResult) -> dict:
    return {"type": "page_result", "id": id, "result": res.to_wire()}


def shutdown() -> dict:
    return {"type": "shutdown"}


def bye() -> dict:
    return {"type": "bye"}


# ---- encoding ------------------------------------------------------------------------------


def encode(msg: dict) -> bytes:
    """Body bytes of one message (no header)."""
    return msgpack.packb(msg, use_bin_type=True)


def decode(body: bytes | bytearray | memoryview) -> dict:
    """Decode one body; raises ProtocolError unless it is a map with a known "type"."""
    try:
        msg = msgpack.unpackb(body, raw=False)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"undecodable frame ({type(e).__name__}: {e})") from e
    if not isinstance(msg, dict) or msg.get("type") not in MESSAGE_TYPES:
        kind = msg.get("type") if isinstance(msg, dict) else type(msg).__name__
        raise ProtocolError(f"unexpected message {kind!r}; expected one of {', '.join(MESSAGE_TYPES)}")
    return msg


def frame(msg: dict) -> tuple[bytes, bytes]:
    """(header, body) of one message; sent as two writes to avoid copying a large body."""
    body = encode(msg)
    return HEADER.pack(len(body)), body


def _check_length(n: int) -> None:
    if n > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame length {n} is implausible; the peer is not a pie dev driver")


# ---- blocking side (the server) --------------------------------------------------------------


class SyncChannel:
    """Blocking frames over a connected stream socket. recv() returns None on a clean EOF."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(True)
        self.sock = sock

    def send(self, msg: dict) -> None:
        header, body = frame(msg)
        self.sock.sendall(header)
        self.sock.sendall(body)

    def recv(self) -> dict[str, Any] | None:
        header = self._recv_exact(HEADER.size, allow_eof=True)
        if header is None:
            return None
        (n,) = HEADER.unpack(header)
        _check_length(n)
        return decode(self._recv_exact(n, allow_eof=False))

    def _recv_exact(self, n: int, allow_eof: bool) -> bytearray | None:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                if got == 0 and allow_eof:
                    return None
                raise ProtocolError(f"channel closed mid-frame ({got} of {n} bytes)")
            got += k
        return buf

    def close(self) -> None:
        self.sock.close()


# ---- asyncio side (the client) ---------------------------------------------------------------


def write_frame(writer: asyncio.StreamWriter, msg: dict) -> None:
    """Queue one frame; callers await writer.drain(). Synchronous, so frames never interleave."""
    header, body = frame(msg)
    writer.write(header)
    writer.write(body)


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None on a clean EOF (the peer closed between frames)."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ProtocolError("channel closed inside a frame header") from e
    (n,) = HEADER.unpack(header)
    _check_length(n)
    try:
        body = await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise ProtocolError(f"channel closed mid-frame ({len(e.partial)} of {n} bytes)") from e
    return decode(body)
