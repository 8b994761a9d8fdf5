"""openai_tools without a server: request checks, forced-call grammars per native format, prompt rendering.

The tokenizers are test_inferlet_decoders' (the embedded tokenizer with each family's control tokens added)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from test_inferlet_decoders import QWEN3_TEMPLATE, model_of

from inferlet import tools
from inferlet.grammar import Grammar, GrammarError, Matcher, _llg
from pie.server.openai_params import ApiError
from pie.server.openai_tools import Structure, forced_call_constraint, parse_structure, prompt_ids

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}

CALLS = {
    "qwen": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
}


def _matcher(family: str, tool_list: list[dict]):
    m = model_of(family, QWEN3_TEMPLATE)
    tok = m._pie.tokenizer
    src = forced_call_constraint(family, tool_list, "m").lark(tok)
    g = Grammar(_llg().LLMatcher.grammar_from_lark(src), "t").check()
    return m, tok, Matcher(g, SimpleNamespace(_tok=tok), tok.vocab_size)


@pytest.mark.parametrize("family", ["qwen", "llama3"])
def test_forced_call_grammar_accepts_the_native_call_and_the_decoder_parses_it(family):
    m, tok, mt = _matcher(family, [WEATHER, TIME])
    ids = tok.encode(CALLS[family])
    if family == "qwen":  # the markers are control tokens here, referenced by id in the grammar
        assert ids[0] == tok.token_id("<tool_call>")
    mt.accept_tokens(ids)
    assert mt.is_accepting
    dec = tools.Decoder(m)
    evs = [dec.feed(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    got = [e for e in evs if isinstance(e, tools.Event.Call)] + dec.finish()
    assert [(c.name, json.loads(c.args)) for c in got] == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("family", ["qwen", "llama3"])
def test_forced_call_grammar_refuses_other_names_and_bad_arguments(family):
    _, tok, mt = _matcher(family, [WEATHER])
    bad = CALLS[family].replace("get_weather", "rm_rf")
    with pytest.raises(GrammarError):
        mt.accept_tokens(tok.encode(bad))
    _, tok, mt = _matcher(family, [WEATHER])
    with pytest.raises(GrammarError):
        mt.accept_tokens(tok.encode(CALLS[family].replace('"city"', '"town"')))


@pytest.mark.parametrize("family", ["harmony", "mistral", "gemma"])
def test_forced_call_is_a_clear_400_where_the_format_has_no_grammar(family):
    with pytest.raises(ApiError, match=f"format \\({family}\\)") as e:
        forced_call_constraint(family, [WEATHER], "m")
    assert e.value.status == 400 and e.value.param == "tool_choice"


def test_prompt_renders_tools_history_and_falls_back_for_templates_without_tools():
    m = model_of("qwen", QWEN3_TEMPLATE)
    tok = m._pie.tokenizer
    s = parse_structure({"tools": [WEATHER]}, chat=True)
    msgs = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = tok.decode(prompt_ids(tok, msgs, s, "qwen"), skip_special_tokens=False)
    block = text.split("<tools>")[2].split("</tools>")[0]  # the template's tool block
    assert json.loads(block)["function"]["name"] == "get_weather"
    assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text  # arguments back as an object
    assert "<tool_response>\nsunny\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    plain = model_of("qwen")  # the embedded template ignores tools=
    ptok = plain._pie.tokenizer
    text = ptok.decode(prompt_ids(ptok, msgs[:1], s, "qwen"), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou may call these functions:") and "<tool_call>" in text
    none = Structure(tools=s.tools, tool_choice="none")
    text = ptok.decode(prompt_ids(ptok, msgs[:1], none, "qwen"), skip_special_tokens=False)
    assert "functions" not in text


@pytest.mark.parametrize(
    "body, match",
    [
        ({"tools": "x"}, "'tools' must be a list"),
        ({"tools": [WEATHER, WEATHER]}, "appears twice"),
        ({"tool_choice": "sometimes", "tools": [WEATHER]}, "'tool_choice' must be"),
        ({"tool_choice": "required"}, "needs 'tools'"),
        ({"response_format": {"type": "json_schema"}}, "json_schema needs"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "cannot both",
        ),
    ],
)
def test_structure_checks(body, match):
    with pytest.raises(ApiError, match=match):
        parse_structure(body, chat=True)
    with pytest.raises(ApiError, match="chat parameter"):
        parse_structure({"tools": [WEATHER]}, chat=False)
