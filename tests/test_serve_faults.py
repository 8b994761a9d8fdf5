"""`pie serve` under load and faults: process limits (429 / launch error), cancelled HTTP streams and
terminated processes free their pages, wrong field types of every request are answered, SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import random

import msgpack
import pytest

pytest.importorskip("websockets")

pie_client = pytest.importorskip("pie_client")
import websockets  # noqa: E402
from pie_client import Event, PieClient, inferlet  # noqa: E402
from serve_util import Server  # noqa: E402

from pie.server.frames import CHUNK_SIZE, REQUESTS  # noqa: E402


@inferlet
async def wait_for_signal():
    from inferlet import session

    return await session.receive()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-faults") / "home", "--max-processes", "3")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


async def post(port: int, path: str, body: dict, lines: int | None = None) -> tuple[int, list[str]]:
    """A bare HTTP/1.1 POST: (status, first `lines` body lines, or all); closing early drops the client."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    try:
        status = int((await reader.readline()).split()[1])
        while (await reader.readline()).strip():
            pass
        out: list[str] = []
        while lines is None or len(out) < lines:
            line = await reader.readline()
            if not line:
                break
            if line.startswith(b"data: ") or line.startswith(b"{"):
                out.append(line.decode())
        return status, out
    finally:
        writer.close()  # also when cancelled: the server sees the client go


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


async def _pages(c: PieClient) -> int:
    """KV pages held by live contexts (used minus those only the prefix cache keeps, by design)."""
    ok, stats = await c.query("model_status", "")
    stats = json.loads(stats)
    return stats["default.pages_used"] - stats["default.pages_cached"]


async def _settle(c: PieClient, pages: int) -> None:
    for _ in range(100):
        if await c.list_processes() == [] and await _pages(c) == pages:
            return
        await asyncio.sleep(0.1)
    assert await c.list_processes() == []
    assert await _pages(c) == pages


def test_limits_answer_429_and_launch_errors(server):
    async def main():
        async with PieClient(server.ws) as c:
            procs = [await c.run(wait_for_signal) for _ in range(3)]
            with pytest.raises(Exception, match="limit of 3 processes"):
                await c.launch_process("text-completion", {"prompt": "x"})
            status, body = await post(server.port, "/v1/completions", {"model": "default", "prompt": "x"})
            assert status == 429 and "rate_limit_error" in "".join(body)
            for i, p in enumerate(procs):
                await p.signal(f"go {i}")
            assert [await p.result() for p in procs] == ["go 0", "go 1", "go 2"]
            r = await c.launch_process("text-completion", {"prompt": "x", "max_tokens": 2})  # room again
            assert isinstance(await r.result(), str)

    run(main())


def test_terminate_and_a_dropped_http_stream_free_pages(server):
    async def main():
        async with PieClient(server.ws) as c:
            before = await _pages(c)
            p = await c.launch_process("text-completion", {"prompt": "Hi " * 300, "max_tokens": 100000})
            await asyncio.sleep(1.0)
            assert await _pages(c) > before
            await p.terminate()
            ev, value = await p.recv()
            assert ev == Event.Error and "terminated" in value
            await _settle(c, before)
            body = {"model": "default", "prompt": "Hi " * 300, "max_tokens": 100000, "stream": True}
            status, lines = await post(server.port, "/v1/completions", body, lines=3)  # then goes away
            assert status == 200 and len(lines) == 3
            await _settle(c, before)
            ok, stats = await c.query("model_status", "")
            decoded = json.loads(stats)["default.tokens_decoded"]
            assert decoded < 1000  # it stopped, not ran to its end
            # a non-streaming request whose client goes away is cancelled too
            body["stream"] = False
            task = asyncio.create_task(post(server.port, "/v1/completions", body))
            await asyncio.sleep(2.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await _settle(c, before)
            ok, stats = await c.query("model_status", "")
            assert json.loads(stats)["default.tokens_decoded"] < decoded + 1000

    run(main())


def _wrong(value):
    """A value of another msgpack type than `value`'s."""
    for other in (7, "s", b"b", [1], {"k": 1}, None, True, 1.5, -1, 2**40):
        if type(other) is not type(value):
            return other
    return None


def test_every_request_with_a_wrong_field_type_is_answered(server):
    rng = random.Random(1)
    samples = {int: 1, str: "x", bytes: b"", bool: True}

    async def main():
        async with websockets.connect(server.ws + "/v1/ws") as ws:
            corr = 100
            for kind, fields in REQUESTS.items():
                for name in fields:
                    corr += 1
                    msg = {f: samples[t if isinstance(t, type) else t[0]] for f, t in fields.items()}
                    msg.update(type=kind, corr_id=corr)
                    msg[name] = _wrong(msg[name]) if name != "corr_id" else "bad"
                    await ws.send(msgpack.packb(msg, use_bin_type=True))
                    reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10))
                    assert reply["ok"] is False and name in reply["result"], (kind, name, reply)
                    assert reply["corr_id"] == (corr if name != "corr_id" else 0)
            # an oversized chunk inside a frame the transport accepts
            big = {
                "type": "add_program",
                "corr_id": 1,
                "program_hash": "h",
                "manifest": "",
                "chunk_index": 0,
                "total_chunks": 2,
                "chunk_data": rng.randbytes(CHUNK_SIZE + 1),
            }
            await ws.send(msgpack.packb(big, use_bin_type=True))
            reply = msgpack.unpackb(await ws.recv())
            assert reply["ok"] is False and "chunk size" in reply["result"]
            await ws.send(msgpack.packb({"type": "ping", "corr_id": 2}))
            assert msgpack.unpackb(await ws.recv())["ok"] is True

    run(main())


def test_many_connections_at_once(server):
    async def one(i):
        async with PieClient(server.ws) as c:
            await c.ping()
            return i

    async def main():
        assert sorted(await asyncio.gather(*(one(i) for i in range(300)))) == list(range(300))

    run(main())


def test_sigterm_drains_running_work_then_exits_0(tmp_path):
    s = Server(tmp_path / "home")
    try:
        s.wait_ready()

        async def main():
            async with PieClient(s.ws) as c:
                p = await c.launch_process(
                    "text-completion", {"prompt": "Hi", "max_tokens": 40, "temperature": 0}
                )
                s.proc.send_signal(15)
                text = await p.result()  # the running process finishes and its result still arrives
                assert isinstance(text, str)

        run(main())
        assert s.proc.wait(60) == 0
    finally:
        s.stop()
