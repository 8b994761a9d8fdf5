"""`pie serve` security: loopback without auth by default, refusal elsewhere, tokens (`pie auth`) on the
WebSocket upgrade and HTTP, x-pie-identity not trusted once auth is on, users see only their own."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

pie_client = pytest.importorskip("pie_client")
openai = pytest.importorskip("openai")
import msgpack  # noqa: E402
import websockets  # noqa: E402
from pie_client import PieClient  # noqa: E402
from serve_util import SRC, Server  # noqa: E402

from pie.cli.main import main  # noqa: E402


def test_auth_commands_store_only_hashes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIE_HOME", str(tmp_path))
    assert main(["auth", "add", "alice"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("pie_") and len(token) > 40
    stored = (tmp_path / "auth.json").read_text()
    assert token not in stored and "alice" in stored
    assert oct((tmp_path / "auth.json").stat().st_mode & 0o777) == "0o600"
    assert main(["auth", "add", "bob"]) == 0 and main(["auth", "add", "bob"]) == 0
    capsys.readouterr()
    assert main(["auth", "list"]) == 0
    assert capsys.readouterr().out.splitlines() == ["alice\t1 token(s)", "bob\t2 token(s)"]
    assert main(["auth", "remove", "bob"]) == 0 and main(["auth", "remove", "bob"]) == 1
    assert "no user 'bob'" in capsys.readouterr().err
    assert main(["auth", "add", "a b"]) == 1


def test_refuses_a_public_bind_without_users(tmp_path):
    env = {**os.environ, "PIE_HOME": str(tmp_path), "PYTHONPATH": str(SRC)}
    r = subprocess.run(
        [sys.executable, "-m", "pie", "serve", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2 and "refusing to listen on 0.0.0.0 without authentication" in r.stderr


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    home = tmp_path_factory.mktemp("serve-auth") / "home"
    env = {**os.environ, "PIE_HOME": str(home), "PYTHONPATH": str(SRC)}
    tokens = {}
    for user in ("alice", "bob"):
        r = subprocess.run(
            [sys.executable, "-m", "pie", "auth", "add", user], capture_output=True, text=True, env=env
        )
        tokens[user] = r.stdout.strip()
    s = Server(home)
    try:
        s.wait_ready()
        yield s, tokens
    finally:
        s.stop()


def test_http_needs_a_token(secured):
    s, tokens = secured
    for headers in ({}, {"Authorization": "Bearer pie_wrong"}, {"x-pie-identity": "alice"}):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(s.url + "/v1/models", headers=headers))
        assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "invalid_api_key"
    with urllib.request.urlopen(s.url + "/health") as r:  # health stays open for load balancers
        assert r.status == 200
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=tokens["alice"], max_retries=0)
    assert [m.id for m in client.models.list().data] == ["default"]
    r = client.completions.create(model="default", prompt="Hi", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3


def test_websocket_tokens_and_isolation(secured):
    s, tokens = secured
    host = s.ws.removeprefix("ws://")

    async def main_():
        # no token: the connection opens but nothing but auth_by_token works
        async with PieClient(s.ws, identity="alice") as anon:
            with pytest.raises(Exception, match="not authenticated"):
                await anon.launch_process("text-completion", {"prompt": "x"})
            ok, result = await anon._send_msg_and_wait({"type": "auth_by_token", "token": tokens["bob"]})
            assert ok and "bob" in result
            assert await anon.list_processes() == []
        # a wrong token is refused at the upgrade
        with pytest.raises(websockets.InvalidStatus):
            async with PieClient(f"ws://alice:pie_wrong@{host}"):
                pass
        # the token in the URL (HTTP Basic, which the unmodified client sends); x-pie-identity is ignored
        async with (
            PieClient(f"ws://alice:{tokens['alice']}@{host}", identity="bob") as alice,
            PieClient(f"ws://bob:{tokens['bob']}@{host}") as bob,
        ):
            p = await alice.launch_process("text-completion", {"prompt": "Hi " * 50, "max_tokens": 100000})
            listed = await alice.list_processes()
            assert [x["username"] for x in listed] == ["alice"]
            assert await bob.list_processes() == []
            for call in (bob.attach_process, bob.terminate_process):
                with pytest.raises(Exception, match="no process"):
                    await call(p.process_id)
            await p.terminate()
        # a raw upgrade with a Bearer header works too
        async with websockets.connect(
            s.ws + "/v1/ws", additional_headers={"Authorization": f"Bearer {tokens['bob']}"}
        ) as ws:
            await ws.send(msgpack.packb({"type": "list_processes", "corr_id": 1}))
            reply = msgpack.unpackb(await ws.recv())
            assert reply["ok"] and json.loads(reply["result"]) == []

    asyncio.run(asyncio.wait_for(main_(), 120))
