"""`pie serve`'s response_format (json_object / json_schema) and tools / tool_choice with the `openai` client.

The embedded default model is tiny and random: a constraint makes its output parse (a JSON schema, or a
forced tool call), so the tests check the plumbing deterministically; "auto" is checked for shape only.
"""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
from serve_util import Server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-openai-tools") / "home")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


MSGS = [{"role": "user", "content": "Give me a person as JSON"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "days": {"type": "integer", "maximum": 9},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMA_FMT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_json_schema_validates(client, seed):
    r = client.chat.completions.create(
        model="default", messages=MSGS, response_format=SCHEMA_FMT, temperature=1.0, seed=seed, max_tokens=200
    )
    c = r.choices[0]
    assert c.finish_reason == "stop", c.message.content
    jsonschema.validate(json.loads(c.message.content), PERSON)


def test_json_schema_streaming_matches(client):
    kw = dict(
        model="default", messages=MSGS, response_format=SCHEMA_FMT, temperature=1.0, seed=5, max_tokens=200
    )
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole and len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_object_n_choices(client, seed):
    r = client.chat.completions.create(
        model="default",
        messages=MSGS,
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=seed,
        n=2,
        max_tokens=300,
    )
    for c in r.choices:
        if c.finish_reason == "stop":  # any JSON: a random model may run out of tokens inside a string
            json.loads(c.message.content)
        else:
            assert c.finish_reason == "length"


def test_completions_json_schema(client):
    r = client.completions.create(
        model="default",
        prompt="A person:",
        max_tokens=200,
        temperature=0.8,
        seed=3,
        extra_body={"response_format": SCHEMA_FMT},
    )
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


def _check_call(c, names: set[str]) -> dict:
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    args = json.loads(call.function.arguments)
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tool_choice_required_and_named(client, seed):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    kw = dict(
        model="default", messages=msgs, tools=[WEATHER, TIME], temperature=1.0, seed=seed, max_tokens=200
    )
    r = client.chat.completions.create(tool_choice="required", **kw)
    _check_call(r.choices[0], {"get_weather", "get_time"})
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(tool_choice=named, **kw)
    _check_call(r.choices[0], {"get_time"})


def test_tool_call_streaming_final_chunk(client):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    stream = client.chat.completions.create(
        model="default",
        messages=msgs,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=200,
        stream=True,
    )
    chunks = [ch for ch in stream if ch.choices]
    calls = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].index == 0
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_history_round_trip_and_auto_shape(client):
    first = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=200,
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    r = client.chat.completions.create(
        model="default", messages=history, tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=8
    )
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls")
    if c.finish_reason == "tool_calls":
        assert c.message.tool_calls and all(t.type == "function" for t in c.message.tool_calls)
    else:
        assert isinstance(c.message.content, str) and not c.message.tool_calls
    assert r.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt
    r = client.chat.completions.create(
        model="default", messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=4
    )
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_object"}, "logprobs": True}, "logprobs"),
    ],
)
def test_bad_structure_is_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=MSGS, max_tokens=4, **kw)
    err = e.value.body
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
