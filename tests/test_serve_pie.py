"""`pie serve` with the published pie-client, end to end: ping, install and run a decorated function that
imports `inferlet`, a built-in, attach, list, signal, file transfer, terminate; installed programs survive
a restart; uploads are validated; malformed frames are answered and the server stays up."""

from __future__ import annotations

import asyncio
import json
import os
import re

import msgpack
import pytest

pie_client = pytest.importorskip("pie_client")
websockets = pytest.importorskip("websockets")
from pie_client import Event, PieClient, inferlet  # noqa: E402
from serve_util import Server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve") / "home")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))  # a hang guard; loaded 2-core CI runners are slow


@inferlet
async def echo_session(prompt: str, times: int = 1):
    """Talks with its client: prints, receives a signal and a file, sends both back."""
    import inferlet
    from inferlet import session

    print("hello from", prompt)
    got = await session.receive()
    session.send({"got": got, "times": times})
    data = await session.receive_file()
    session.send_file(data[::-1])
    return {"prompt": prompt, "models": inferlet.runtime.models()}


@inferlet
async def generate(prompt: str, max_tokens: int = 6):
    from inferlet import Context, Model, Sampler

    model = Model.load("default")
    ctx = Context(model)
    ctx.user(prompt)
    return await ctx.generate(Sampler.argmax(), max_tokens=max_tokens).collect_text()


@inferlet
async def waits_forever():
    from inferlet import session

    print("waiting")
    return await session.receive()


def test_ping_run_signal_file_and_return(server):
    async def main():
        async with PieClient(server.ws) as c:
            await c.ping()
            p = await c.run(echo_session, prompt="tests", times=3)
            await p.signal("ping!")
            payload = os.urandom(600_000)  # three chunks
            await p.transfer_file(payload)
            events = []
            while True:
                ev, value = await p.recv()
                events.append((ev, value))
                if ev in (Event.Return, Event.Error):
                    break
            assert (Event.Stdout, "hello from tests\n") in events
            assert (Event.Message, json.dumps({"got": "ping!", "times": 3})) in events
            files = [v for e, v in events if e == Event.File]
            assert len(files) == 1 and bytes(files[0]) == payload[::-1]
            assert events[-1] == (Event.Return, json.dumps({"prompt": "tests", "models": ["default"]}))
            # the same source again is not re-uploaded; running it generates with the engine
            assert await c.check_program(generate.program) is False
            p = await c.run(generate, prompt="Hello")
            text = await p.result()
            assert isinstance(text, str)
            assert await c.check_program(generate.program) is True
            p2 = await c.run(generate, prompt="Hello")  # argmax: the same text
            assert await p2.result() == text

    run(main())


def test_builtin_bare_name_and_versioned_name(server):
    async def main():
        async with PieClient(server.ws) as c:
            args = {"prompt": "Hi", "max_tokens": 5, "temperature": 0}
            a = await (await c.launch_process("text-completion", args)).result()
            b = await (await c.launch_process("text-completion@0.1.0", args)).result()
            assert isinstance(a, str) and a == b
            with pytest.raises(Exception, match="no program 'nope'"):
                await c.launch_process("nope", {})
            # an installed program by its bare name: its newest version
            await c.run(generate, prompt="x")
            p = await c.launch_process(generate.name, {"prompt": "Hello"})
            assert isinstance(await p.result(), str)
            # the program's own error arrives as an error event with its message
            p = await c.launch_process(generate.name, {"promt": "typo"})
            with pytest.raises(RuntimeError, match="does not fit generate"):
                await p.result()

    run(main())


def test_attach_list_terminate_and_users_see_only_their_own(server):
    async def main():
        async with PieClient(server.ws, identity="alice") as a, PieClient(server.ws, identity="bob") as b:
            p = await a.run(waits_forever)
            assert (await p.recv()) == (Event.Stdout, "waiting\n")
            listed = await a.list_processes()
            assert [x["id"] for x in listed] == [p.process_id] and listed[0]["username"] == "alice"
            assert await b.list_processes() == []
            with pytest.raises(Exception, match="no process"):
                await b.attach_process(p.process_id)
            await b.authenticate("alice")  # no auth on loopback: a client may name itself (as in Pie)
            assert [x["id"] for x in await b.list_processes()] == [p.process_id]
            await b.authenticate("bob")
            with pytest.raises(Exception, match="no process"):
                await b.terminate_process(p.process_id)
            await p.terminate()
            ev, value = await p.recv()
            assert ev == Event.Error and "terminated" in value

    run(main())


@pytest.mark.xfail(
    strict=False,
    reason="hangs intermittently inside full-suite runs (2 of 3 on 2026-11-29: the attached process's result "
    "never reaches pie-client), passes alone; the cause is not found yet",
)
def test_a_detached_process_is_attached_later(server):
    """A detached process keeps running with nobody attached; attaching later replays its events."""

    async def main():
        async with PieClient(server.ws, identity="alice") as a:
            d = await a.launch_process(
                "text-completion", {"prompt": "Hi", "max_tokens": 4}, capture_outputs=False
            )
            await asyncio.sleep(0.5)
            attached = await a.attach_process(d.process_id)
            assert isinstance(await asyncio.wait_for(attached.result(), 60), str)

    run(main())


def test_disconnect_cancels_processes_and_frees_pages(server):
    async def pages_used(c) -> int:
        ok, stats = await c.query("model_status", "")
        assert ok
        stats = json.loads(stats)
        return stats["default.pages_used"] - stats["default.pages_cached"]  # the prefix cache keeps some

    async def main():
        async with PieClient(server.ws) as c:
            before = await pages_used(c)
        c = PieClient(server.ws)
        await c.connect()
        p = await c.launch_process("text-completion", {"prompt": "Hi " * 200, "max_tokens": 100000})
        await asyncio.sleep(1.0)
        await c.close()  # mid-generation
        async with PieClient(server.ws) as c2:
            for _ in range(100):
                if await c2.list_processes() == [] and await pages_used(c2) == before:
                    break
                await asyncio.sleep(0.1)
            assert await c2.list_processes() == []
            assert await pages_used(c2) == before
        assert p.process_id

    run(main())


def test_upload_validation_errors_are_clear(server):
    async def main():
        async with PieClient(server.ws) as c:
            good = echo_session.manifest_toml()
            src = echo_session.source.encode()
            cases = [
                (src, good.replace('language = "python"', 'language = "wasm"'), "Python programs only"),
                (src, good.replace('entry = "echo_session"', 'entry = "missing"'), "entry 'missing'"),
                (src, "not = [toml", "not valid TOML"),
                (src, good.replace("[package]", "[pkg]"), "needs a [package] table"),
                (b"def broken(:\n", good, "does not parse"),
                (b"\xff\xfe", good, "not UTF-8"),
                (b"x" * (5 << 20), good, "the server's limit of"),
            ]
            for source, manifest, message in cases:
                with pytest.raises(Exception, match=re.escape(message)):
                    await c.install_program_bytes(source, manifest)
            await c.ping()

    run(main())


def test_malformed_frames_get_errors_and_the_server_stays_up(server):
    rng = __import__("random").Random(0)

    async def main():
        async with websockets.connect(server.ws + "/v1/ws") as ws:
            bad = [
                b"",
                b"\xc1",  # never-used msgpack byte
                msgpack.packb([1, 2, 3]),
                msgpack.packb({"type": "nope", "corr_id": 5}),
                msgpack.packb({"type": "ping", "corr_id": "x"}),
                msgpack.packb({"type": "launch_process", "corr_id": 6, "inferlet": 3, "input": "{}"}),
                msgpack.packb(
                    {"type": "launch_process", "corr_id": 7, "inferlet": "text-completion", "input": "[1]"}
                ),
                msgpack.packb(
                    {
                        "type": "add_program",
                        "corr_id": 8,
                        "program_hash": "h",
                        "manifest": "",
                        "chunk_index": 3,
                        "total_chunks": 4,
                        "chunk_data": b"",
                    }
                ),
                msgpack.packb(
                    {"type": "check_program", "corr_id": 9, "name": "a", "version": "b\udcff"},
                    unicode_errors="surrogatepass",
                ),
                *(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))) for _ in range(200)),
            ]
            for frame in bad:
                await ws.send(frame)
                reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10))
                assert reply["type"] == "response" and reply["ok"] is False and reply["result"], frame
            await ws.send("text, not binary")
            reply = msgpack.unpackb(await ws.recv())
            assert reply["ok"] is False and "binary" in reply["result"]
            await ws.send(msgpack.packb({"type": "ping", "corr_id": 42}))
            assert msgpack.unpackb(await ws.recv()) == {
                "type": "response",
                "corr_id": 42,
                "ok": True,
                "result": "pong",
            }
        # an oversized frame closes that connection only
        async with websockets.connect(server.ws + "/v1/ws", max_size=None) as ws:
            await ws.send(b"\x00" * (3 << 20))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        async with PieClient(server.ws) as c:
            await c.ping()

    run(main())


def test_programs_persist_across_restarts(tmp_path):
    home = tmp_path / "home"
    s = Server(home)
    try:
        s.wait_ready()

        async def install():
            async with PieClient(s.ws) as c:
                await c.install_program_bytes(generate.source.encode(), generate.manifest_toml())

        run(install())
    finally:
        assert s.stop() == 0
    s = Server(home)
    try:
        s.wait_ready()

        async def check():
            async with PieClient(s.ws) as c:
                assert await c.check_program(generate.program)
                assert isinstance(
                    await (await c.launch_process(generate.program, {"prompt": "Hi"})).result(), str
                )

        run(check())
    finally:
        assert s.stop() == 0
