"""The dev driver's framing and message set, and the server's handshake checks (no model, no torch)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from dataclasses import fields

import msgpack
import numpy as np
import pytest

from pie.drivers.dev import wire
from pie.drivers.dev.interpreter import child_env
from pie.drivers.protocol import (
    PROTOCOL_VERSION,
    Capabilities,
    ForwardBatch,
    ForwardResult,
    PageOps,
    PageOpsResult,
    make_batch,
)
from pie.drivers.spec import ExecutorSpec


def assert_same(a, b) -> None:
    """Field-by-field equality of two protocol dataclasses (arrays: dtype, shape and values)."""
    assert type(a) is type(b)
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape, f.name
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y, f.name


def sample_batch() -> ForwardBatch:
    return make_batch(
        [
            dict(token_ids=[5, 6, 7], positions=[0, 1, 2], pages=[0], last_page_len=3, outputs=[2], dist_k=4),
            dict(
                token_ids=[9], positions=[16], pages=[1, 2], last_page_len=1, outputs=[0], return_logits=True
            ),
        ],
        page_size=16,
    )


def big_batch(num_tokens: int) -> ForwardBatch:
    """One request of num_tokens tokens (~num_tokens * 16 bytes of arrays) with a custom mask."""
    pages = (num_tokens + 15) // 16
    last = num_tokens - (pages - 1) * 16
    rng = np.random.default_rng(0)
    return make_batch(
        [
            dict(
                token_ids=rng.integers(0, 1000, num_tokens).tolist(),
                positions=list(range(num_tokens)),
                pages=list(range(pages)),
                last_page_len=last,
                outputs=[num_tokens - 1],
                mask=np.ones((num_tokens, num_tokens), dtype=bool) if num_tokens <= 2048 else None,
            )
        ],
        page_size=16,
    )


CAPS = Capabilities(PROTOCOL_VERSION, "qwen3", 64, 16, 1000, 4096, 64, 32, "cpu", "float32", 2, {"k": [1, 2]},
                    num_swap_slots=8, page_nbytes=4096, kv_fingerprint="qwen3-0123456789abcdef")  # fmt: skip
OPS = PageOps(
    swap_out=np.array([[3, 0], [4, 1]], dtype=np.int32),
    copy=np.array([[5, 6]], dtype=np.int32),
    write=np.array([7], dtype=np.int32),
    write_data=np.arange(16, dtype=np.uint8).reshape(1, 16),
    read=np.array([1, 2], dtype=np.int32),
)
PAGE_RESULT = PageOpsResult(data=np.full((2, 16), 9, dtype=np.uint8))
RESULT = ForwardResult(
    tokens=np.array([3, 4], dtype=np.int64),
    logprobs=np.array([-0.5, -1.0], dtype=np.float32),
    logits=np.arange(2000, dtype=np.float32).reshape(2, 1000),
)


def test_every_message_round_trips_through_encode_decode():
    spec = ExecutorSpec(model_path="/m", device="cuda:1", num_pages=7)
    msgs = [
        wire.hello(PROTOCOL_VERSION, spec),
        wire.ready(PROTOCOL_VERSION, CAPS),
        wire.error("boom", id=3, traceback="tb", kind="ValueError"),
        wire.error("startup failed"),
        wire.forward(41, sample_batch()),
        wire.result(41, RESULT),
        wire.shutdown(),
        wire.bye(),
        wire.page_ops(42, OPS),
        wire.page_result(42, PAGE_RESULT),
        wire.page_ops(43, PageOps()),
        wire.page_result(43, PageOpsResult()),
    ]
    assert {m["type"] for m in msgs} == set(wire.MESSAGE_TYPES)
    back = [wire.decode(wire.encode(m)) for m in msgs]
    assert ExecutorSpec.from_wire(back[0]["spec"]) == spec and back[0]["version"] == PROTOCOL_VERSION
    assert Capabilities.from_wire(back[1]["capabilities"]) == CAPS
    assert back[2] == msgs[2] and back[3]["id"] is None
    assert back[4]["id"] == 41
    assert_same(ForwardBatch.from_wire(back[4]["batch"]), sample_batch())
    assert_same(ForwardResult.from_wire(back[5]["result"]), RESULT)
    assert back[6:8] == msgs[6:8]
    assert back[8]["id"] == 42 and back[9]["id"] == 42
    assert_same(PageOps.from_wire(back[8]["ops"]), OPS)
    assert_same(PageOpsResult.from_wire(back[9]["result"]), PAGE_RESULT)
    empty = PageOps.from_wire(back[10]["ops"])
    assert_same(empty, PageOps()) and empty.swap_out.shape == (0, 2) and empty.is_empty
    assert PageOpsResult.from_wire(back[11]["result"]).data is None


def test_masked_batch_round_trips():
    b = big_batch(40)
    assert b.mask is not None
    assert_same(ForwardBatch.from_wire(wire.decode(wire.encode(wire.forward(0, b)))["batch"]), b)


@pytest.mark.parametrize(
    "body, match",
    [
        (b"\xc1\xc1\xc1", "undecodable"),
        (msgpack.packb([1, 2]), "unexpected message"),
        (msgpack.packb({"type": "launch"}), "unexpected message 'launch'"),
        (msgpack.packb({"no": "type"}), "unexpected message None"),
    ],
)
def test_decode_rejects_foreign_bodies(body, match):
    with pytest.raises(wire.ProtocolError, match=match):
        wire.decode(body)


def test_sync_channel_large_frames_and_eof():
    a, b = socket.socketpair()
    left, right = wire.SyncChannel(a), wire.SyncChannel(b)
    batch = big_batch(1_000_000)  # ~16 MB of arrays: far beyond the socket buffer
    res = ForwardResult(tokens=np.zeros(256, np.int64), logits=np.ones((256, 32000), np.float32))  # 32 MB
    sender = threading.Thread(
        target=lambda: (left.send(wire.forward(1, batch)), left.send(wire.result(1, res)))
    )
    sender.start()
    got_batch = ForwardBatch.from_wire(right.recv()["batch"])
    got_res = ForwardResult.from_wire(right.recv()["result"])
    sender.join()
    assert_same(got_batch, batch)
    assert_same(got_res, res)
    left.close()
    assert right.recv() is None  # EOF between frames is a clean end
    right.close()


def test_sync_channel_truncated_frame_and_bad_length():
    a, b = socket.socketpair()
    header, body = wire.frame(wire.bye())
    a.sendall(header + body[:-1])
    a.close()
    with pytest.raises(wire.ProtocolError, match="mid-frame"):
        wire.SyncChannel(b).recv()
    a, b = socket.socketpair()
    a.sendall(wire.HEADER.pack(wire.MAX_FRAME_BYTES + 1))
    with pytest.raises(wire.ProtocolError, match="implausible"):
        wire.SyncChannel(b).recv()
    a.close()
    b.close()


def test_async_frames_interoperate_with_sync_channel():
    async def main():
        a, b = socket.socketpair()
        sync = wire.SyncChannel(b)
        reader, writer = await asyncio.open_connection(sock=a)
        batch = big_batch(600_000)
        wire.write_frame(writer, wire.forward(7, batch))
        wire.write_frame(writer, wire.shutdown())
        # The peer reads in a thread while we drain: a frame larger than the buffers must not deadlock.
        received = []
        t = threading.Thread(target=lambda: received.extend([sync.recv(), sync.recv()]))
        t.start()
        await writer.drain()
        await asyncio.to_thread(t.join)
        assert received[0]["id"] == 7 and received[1]["type"] == "shutdown"
        assert_same(ForwardBatch.from_wire(received[0]["batch"]), batch)
        big = ForwardResult(tokens=np.arange(4, dtype=np.int64), logits=np.ones((4, 1 << 20), np.float32))
        t = threading.Thread(target=lambda: (sync.send(wire.result(7, big)), sync.close()))
        t.start()
        msg = await wire.read_frame(reader)
        assert_same(ForwardResult.from_wire(msg["result"]), big)
        assert await wire.read_frame(reader) is None
        t.join()
        writer.close()

    asyncio.run(main())


def _spawn_server(*extra: str) -> tuple[subprocess.Popen, wire.SyncChannel]:
    parent, child = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pie.drivers.dev.server", "--fd", str(child.fileno()), *extra],
        pass_fds=(child.fileno(),),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    child.close()
    return proc, wire.SyncChannel(parent)


def test_server_rejects_a_protocol_version_mismatch():
    proc, chan = _spawn_server()
    msg = wire.hello(PROTOCOL_VERSION, ExecutorSpec(model_path="/m"))
    msg["version"] = PROTOCOL_VERSION + 99
    chan.send(msg)
    reply = chan.recv()
    assert reply["type"] == "error"
    assert "protocol version mismatch" in reply["message"] and str(PROTOCOL_VERSION + 99) in reply["message"]
    assert proc.wait(timeout=10) == 1
    chan.close()


def test_server_rejects_a_forward_before_hello_and_exits_on_eof():
    proc, chan = _spawn_server()
    chan.send(wire.forward(0, sample_batch()))
    reply = chan.recv()
    assert reply["type"] == "error" and "expected hello" in reply["message"]
    assert proc.wait(timeout=10) == 1
    chan.close()
    proc, chan = _spawn_server()
    chan.close()  # parent gone before hello: a quiet exit
    assert proc.wait(timeout=10) == 0


def test_server_rejects_a_malformed_executor_target():
    proc, chan = _spawn_server("--executor", "no_colon_here")
    chan.send(wire.hello(PROTOCOL_VERSION, ExecutorSpec(model_path="/m")))
    reply = chan.recv()
    assert reply["type"] == "error" and "module:callable" in reply["message"]
    assert proc.wait(timeout=10) == 1
    out = proc.stdout.read().decode()
    assert "startup failed" in out and os.linesep in out
    chan.close()
