"""`pie serve`'s OpenAI-compatible API with the official `openai` client, /health and /metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
from serve_util import Server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-openai") / "home", "--max-body-bytes", "100000")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["default"]
    with urllib.request.urlopen(server.url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok", "models": ["default"]}


def test_chat_plain_and_streaming_agree(client):
    r = client.chat.completions.create(model="default", messages=MSGS, max_tokens=8, temperature=0)
    c = r.choices[0]
    assert (
        r.object == "chat.completion"
        and c.message.role == "assistant"
        and c.finish_reason in ("stop", "length")
    )
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 8
    stream = client.chat.completions.create(
        model="default",
        messages=MSGS,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        c.finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_n_seed_stop_max_completion_tokens_and_logprobs(client):
    kw = dict(model="default", messages=MSGS, temperature=1.0, top_p=0.9, seed=7, max_completion_tokens=12)
    a = client.chat.completions.create(n=3, **kw)
    b = client.chat.completions.create(n=3, **kw)
    assert len(a.choices) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    r = client.chat.completions.create(
        model="default", messages=MSGS, max_tokens=3, temperature=0, logprobs=True
    )
    lp = r.choices[0].logprobs.content
    assert r.choices[0].finish_reason == "length" and len(lp) == r.usage.completion_tokens == 3
    assert all(t.logprob <= 0 for t in lp) and "".join(t.token for t in lp) == r.choices[0].message.content
    full = client.chat.completions.create(model="default", messages=MSGS, max_tokens=10, temperature=0)
    text = full.choices[0].message.content
    if len(text) > 3:
        stop = text[2:4]
        cut = client.chat.completions.create(
            model="default", messages=MSGS, max_tokens=10, temperature=0, stop=[stop]
        )
        assert cut.choices[0].message.content == text[: text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_completions_plain_batch_and_streaming(client):
    r = client.completions.create(model="default", prompt="The for statement", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 6
    batch = client.completions.create(
        model="default", prompt=["The for statement", "def f"], max_tokens=6, temperature=0, logprobs=0
    )
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == r.choices[0].text
    assert len(batch.choices[0].logprobs.token_logprobs) == len(batch.choices[0].logprobs.tokens)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="default", prompt="The for statement", max_tokens=6, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == r.choices[0].text


def test_responses_plain_and_streaming(client):
    r = client.responses.create(
        model="default", input="Say hello", instructions="Be brief.", max_output_tokens=8, temperature=0
    )
    assert r.status in ("completed", "incomplete") and r.output_text and r.usage.output_tokens <= 8
    events = list(
        client.responses.create(
            model="default",
            input="Say hello",
            instructions="Be brief.",
            max_output_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text


def test_errors_are_openais_shape(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-x", messages=MSGS)
    assert e.value.code == "model_not_found"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="not among 'tools'"):
        client.chat.completions.create(
            model="default",
            messages=MSGS,
            tools=[tool],
            tool_choice={"type": "function", "function": {"name": "g"}},
        )
    with pytest.raises(openai.BadRequestError, match="response_format type 'xml'"):
        client.chat.completions.create(model="default", messages=MSGS, response_format={"type": "xml"})
    with pytest.raises(openai.BadRequestError, match="'temperature' must be in"):
        client.chat.completions.create(model="default", messages=MSGS, temperature=5)
    with pytest.raises(openai.BadRequestError, match="role 'tool'"):
        client.chat.completions.create(
            model="default", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]
        )
    for body, status in (
        (b"{not json", 400),
        (b"[1]", 400),
        (b'{"model": "default", "prompt": "' + b"x" * 200_000 + b'"}', 413),
    ):
        req = urllib.request.Request(
            server.url + "/v1/completions", data=body, headers={"content-type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == status and "message" in json.loads(e.value.read())["error"]


def test_metrics_after_requests(server, client):
    client.chat.completions.create(model="default", messages=MSGS, max_tokens=4, temperature=0, stream=True)
    list(
        client.chat.completions.create(
            model="default", messages=MSGS, max_tokens=4, temperature=0, stream=True
        )
    )
    with urllib.request.urlopen(server.url + "/metrics") as r:
        text = r.read().decode()
    for name in (
        "pie_time_to_first_token_seconds_count",
        "pie_time_per_output_token_seconds_bucket",
        "pie_inter_token_latency_seconds_bucket",
        "pie_num_requests_waiting",
        "pie_kv_pages_used",
        "pie_kv_pages_cached",
        "pie_prefix_cache_hit_rate",
        "pie_num_sequences_preempted",
    ):
        assert name in text, name
    ttft = [
        ln
        for ln in text.splitlines()
        if ln.startswith('pie_time_to_first_token_seconds_count{model="default"}')
    ]
    assert ttft and float(ttft[0].split()[-1]) >= 1


def test_invalid_text_is_refused(server):
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": "a\ud800b"}]}).encode()
    req = urllib.request.Request(
        server.url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "not valid text" in json.loads(e.value.read())["error"]["message"]
    bad_utf8 = b'{"model": "default", "prompt": "\xff\xfe"}'
    req = urllib.request.Request(
        server.url + "/v1/completions", data=bad_utf8, headers={"content-type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400


def test_bench_serve_against_the_server(server, capsys):
    from pie.cli.main import main

    argv = [
        "bench",
        "serve",
        "--base-url",
        server.url + "/v1",
        "--num-prompts",
        "6",
        "--max-concurrency",
        "3",
        "--input-len",
        "12",
        "--output-len",
        "5",
        "--json",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    rec = json.loads(out)
    assert rec["completed"] == 6 and rec["failed"] == 0 and rec["model"] == "default"
    assert rec["total_output_tokens"] == 30  # ignore_eos: every request generates its 5 tokens
    assert 0 < rec["ttft_ms_p50"] <= rec["ttft_ms_p99"] and rec["tpot_ms_mean"] > 0 and rec["itl_ms_p50"] > 0
    assert "TTFT" in err and "output throughput" in err
