"""Pie's wire frames: msgpack maps, one per WebSocket binary message (pie-client 0.5).

Client -> server frames carry "type" and, when they expect an answer, "corr_id"; the answer is
{"type": "response", "corr_id", "ok", "result": str}. A frame that cannot be decoded or has a field
of the wrong type is answered with ok = false and the reason (corr_id 0 when it has none we can read).
"""

from __future__ import annotations

import msgpack
from blake3 import blake3

from pie.errors import PieError

CHUNK_SIZE = 256 * 1024  # what the client sends and expects

# type -> {field: python type}; every listed field is required
REQUESTS: dict[str, dict[str, type | tuple]] = {
    "auth_identify": {"corr_id": int, "username": str},
    "auth_by_token": {"corr_id": int, "token": str},
    "query": {"corr_id": int, "subject": str, "record": str},
    "check_program": {"corr_id": int, "name": str, "version": str},
    "add_program": {
        "corr_id": int,
        "program_hash": str,
        "manifest": str,
        "chunk_index": int,
        "total_chunks": int,
        "chunk_data": bytes,
    },
    "launch_process": {"corr_id": int, "inferlet": str, "input": str},
    "attach_process": {"corr_id": int, "process_id": str},
    "list_processes": {"corr_id": int},
    "terminate_process": {"corr_id": int, "process_id": str},
    "signal_process": {"process_id": str, "message": str},
    "transfer_file": {
        "process_id": str,
        "file_hash": str,
        "chunk_index": int,
        "total_chunks": int,
        "chunk_data": bytes,
    },
    "ping": {"corr_id": int},
}
OPTIONAL: dict[str, dict[str, type]] = {
    "add_program": {"force_overwrite": bool},
    "launch_process": {"capture_outputs": bool, "token_budget": (int, type(None))},
}


class FrameError(PieError):
    """A client frame that is not a valid request; corr_id is the one to answer, if readable."""

    def __init__(self, message: str, corr_id: int = 0) -> None:
        super().__init__(message)
        self.corr_id = corr_id


def decode(data: bytes) -> dict:
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=4 * CHUNK_SIZE)
    except UnicodeDecodeError:
        raise FrameError("a string in the frame is not valid UTF-8") from None
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise FrameError(f"the frame is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(msg, dict):
        raise FrameError(f"a frame must be a msgpack map, got {type(msg).__name__}")
    corr_id = msg.get("corr_id")
    cid = (
        corr_id if isinstance(corr_id, int) and not isinstance(corr_id, bool) and 0 <= corr_id < 2**32 else 0
    )
    kind = msg.get("type")
    if kind not in REQUESTS:
        known = ", ".join(REQUESTS)
        raise FrameError(f"unknown request type {kind!r} (this server knows: {known})", cid)
    for name, want in REQUESTS[kind].items():
        _check(msg, name, want, kind, cid, required=True)
    for name, want in OPTIONAL.get(kind, {}).items():
        _check(msg, name, want, kind, cid, required=False)
    return msg


def _check(msg: dict, name: str, want, kind: str, cid: int, required: bool) -> None:
    if name not in msg:
        if required:
            raise FrameError(f"{kind}: missing field {name!r}", cid)
        return
    value = msg[name]
    wants = want if isinstance(want, tuple) else (want,)
    ok = isinstance(value, wants) and not (isinstance(value, bool) and bool not in wants)
    if ok and isinstance(value, int) and not isinstance(value, bool) and (value < 0 or value >= 2**32):
        ok = False
    if not ok:
        names = "/".join(w.__name__ for w in wants)
        raise FrameError(f"{kind}: field {name!r} must be {names}, got {type(value).__name__}", cid)


def encode(frame: dict) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def response(corr_id: int, ok: bool, result: str) -> dict:
    return {"type": "response", "corr_id": corr_id, "ok": ok, "result": result}


def file_frames(process_id: str, data: bytes, name: str | None) -> list[dict]:
    """A file to the client as chunk frames, with the blake3 hash it checks."""
    digest = blake3(data).hexdigest()
    chunks = [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)] or [b""]
    return [
        {
            "type": "file",
            "process_id": process_id,
            "file_hash": digest,
            "chunk_index": i,
            "total_chunks": len(chunks),
            "chunk_data": c,
            "name": name,
        }
        for i, c in enumerate(chunks)
    ]


class Upload:
    """Chunks of one upload (a program or a file) collected in order, under a size limit."""

    def __init__(self, total_chunks: int, max_bytes: int, what: str) -> None:
        if total_chunks < 1:
            raise FrameError(f"{what}: total_chunks must be at least 1")
        if (total_chunks - 1) * CHUNK_SIZE > max_bytes:
            raise FrameError(f"{what}: {total_chunks} chunks exceed the server's limit of {max_bytes} bytes")
        self.total, self.max_bytes, self.what = total_chunks, max_bytes, what
        self.buffer = bytearray()
        self.next = 0

    def add(self, index: int, total: int, data: bytes) -> bool:
        """Append one chunk; True once the last one is in."""
        if total != self.total:
            raise FrameError(f"{self.what}: total_chunks changed from {self.total} to {total} mid-upload")
        if index != self.next:
            raise FrameError(f"{self.what}: chunk {index} arrived where chunk {self.next} was expected")
        if len(data) > CHUNK_SIZE:
            raise FrameError(
                f"{self.what}: a chunk of {len(data)} bytes is over the {CHUNK_SIZE}-byte chunk size"
            )
        self.buffer += data
        if len(self.buffer) > self.max_bytes:
            raise FrameError(f"{self.what}: over the server's limit of {self.max_bytes} bytes")
        self.next += 1
        return self.next == self.total

    def check_hash(self, expected: str) -> bytes:
        data = bytes(self.buffer)
        if blake3(data).hexdigest() != expected:
            raise FrameError(f"{self.what}: the blake3 hash of the data does not match the one sent")
        return data
