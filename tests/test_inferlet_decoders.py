"""chat / reasoning / tools decoders on samples of each roster family's native output format.

The token streams come from the embedded model's byte-level BPE tokenizer with each family's control tokens
added (so they are single tokens, as in the real vocabularies), fed in small batches as a generation would.
"""

import json
from types import SimpleNamespace

import pytest

from inferlet import _formats as F
from inferlet import chat, reasoning, tools
from pie.models.tokenizer import Tokenizer
from pie.paths import embedded_model_dir

QWEN3_TEMPLATE = """{%- if tools %}<|im_start|>system
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>{%- for tool in tools %}
{{ tool | tojson }}{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if opens_think %}<think>
{% endif %}{%- endif %}"""

# the parts of GPT-OSS's template that matter here: messages end with <|end|>, replies with <|return|> or <|call|>
HARMONY_TEMPLATE = """{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endfor %}
{%- if add_generation_prompt %}<|start|>assistant{% endif %}{# <|return|> <|call|> #}"""

FAMILIES = {
    "qwen": ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
               "<|python_tag|>"],
    "harmony": ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>",
                "<|constrain|>"],
    "mistral": ["[INST]", "[/INST]", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]",
                "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"],
    "gemma": ["<start_of_turn>", "<end_of_turn>", "<|turn>", "<turn|>", "<|tool_call>", "<tool_call|>",
              '<|"|>', "<|channel>", "<channel|>"],
}  # fmt: skip


def model_of(family: str, template: str | None = None):
    tok = Tokenizer.from_dir(embedded_model_dir())
    tok.hf.add_special_tokens({"additional_special_tokens": FAMILIES[family]})
    if template is not None:
        tok.hf.chat_template = template
    return SimpleNamespace(_pie=SimpleNamespace(tokenizer=tok), name=family)


def feed_all(dec, model, text: str, step: int = 2) -> list:
    ids = model._pie.tokenizer.encode(text)
    return [dec.feed(ids[i : i + step]) for i in range(0, len(ids), step)]


def calls_of(model, text: str, step: int = 2) -> list[tuple[str, dict]]:
    dec = tools.Decoder(model)
    events = feed_all(dec, model, text, step) + dec.finish() + [dec.feed([]) for _ in range(3)]
    return [(e.name, json.loads(e.args)) for e in events if isinstance(e, tools.Event.Call)]


# ---- format detection ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_is_detected_from_its_control_tokens(family):
    from inferlet._textstream import model_format

    assert model_format(model_of(family)).name == family


# ---- tool calls ---------------------------------------------------------------------------------


def test_qwen3_hermes_calls_stream_and_parse():
    m = model_of("qwen")
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2*(3+4)"}}\n</tool_call><|im_end|>'
    )
    for step in (1, 3, 50):
        assert calls_of(m, text, step) == [
            ("get_weather", {"city": "Paris", "unit": "celsius"}),
            ("calculator", {"expression": "2*(3+4)"}),
        ]
    dec = tools.Decoder(m)
    ids = m._pie.tokenizer.encode(text)
    first = ids.index(m._pie.tokenizer.token_id("<tool_call>"))
    assert isinstance(dec.feed(ids[: first + 3]), tools.Event.Start)  # inside a call, not done yet


def test_qwen35_xml_calls_parse():
    m = model_of("qwen")
    text = (
        "<tool_call>\n<function=search>\n<parameter=query>\nbest pizza in Rome\n</parameter>\n"
        "<parameter=limit>\n3\n</parameter>\n</function>\n</tool_call><|im_end|>"
    )
    assert calls_of(m, text) == [("search", {"query": "best pizza in Rome", "limit": 3})]


def test_llama3_json_python_tag_and_pythonic_calls():
    m = model_of("llama3")
    assert calls_of(m, '{"name": "get_weather", "parameters": {"city": "Tokyo"}}<|eot_id|>') == [
        ("get_weather", {"city": "Tokyo"})
    ]
    assert calls_of(m, '<|python_tag|>brave_search.call(query="pie serving")<|eom_id|>') == [
        ("brave_search", {"query": "pie serving"})
    ]
    assert calls_of(m, '<|python_tag|>{"name": "calc", "parameters": {"x": 2}}<|eom_id|>') == [
        ("calc", {"x": 2})
    ]
    assert calls_of(m, '[get_weather(city="Oslo"), get_time(tz="CET")]<|eot_id|>') == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert calls_of(m, 'The answer is {"name": "x"} as JSON.<|eot_id|>') == []  # prose is not a call


def test_gpt_oss_harmony_calls_in_both_header_orders():
    m = model_of("harmony")
    text = (
        "<|channel|>analysis<|message|>Need the weather.<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location": "San Francisco"}<|call|>'
    )
    assert calls_of(m, text) == [("get_weather", {"location": "San Francisco"})]
    text2 = ' to=functions.lookup<|channel|>commentary json<|message|>{"id": 7}<|call|>'
    assert calls_of(m, text2) == [("lookup", {"id": 7})]
    assert calls_of(m, "<|channel|>final<|message|>No tools needed.<|return|>") == []


def test_mistral_v3_list_and_v11_name_args_calls():
    m = model_of("mistral")
    v3 = '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "neg", "arguments": {"x": 5}}]</s>'
    assert calls_of(m, v3) == [("add", {"a": 1, "b": 2}), ("neg", {"x": 5})]
    v11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon"}[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{"tz": "CET"}</s>'
    assert calls_of(m, v11) == [("get_weather", {"city": "Lyon"}), ("get_time", {"tz": "CET"})]


def test_gemma_tool_code_and_gemma4_native_calls():
    m = model_of("gemma")
    g3 = 'I will look it up.\n```tool_code\nget_weather(city="Rome", days=2)\n```<end_of_turn>'
    assert calls_of(m, g3) == [("get_weather", {"city": "Rome", "days": 2})]
    g4 = '<|tool_call>call:get_weather{city:<|"|>New York, NY<|"|>,days:3,metric:true}<tool_call|>'
    assert calls_of(m, g4) == [("get_weather", {"city": "New York, NY", "days": 3, "metric": True})]


def test_pythonic_parser_rejects_code_that_is_not_a_call():
    assert F.parse_pythonic("import os") is None
    assert F.parse_pythonic("f(x=open('a'))") is None  # only literal arguments


# ---- reasoning ------------------------------------------------------------------------------------


def think_events(model, text, step=2):
    return feed_all(reasoning.Decoder(model), model, text, step)


def test_qwen3_think_span_streams_and_ends_with_the_whole_text():
    m = model_of("qwen", QWEN3_TEMPLATE)
    text = "<think>\nThe user wants 2+2. That is 4.\n</think>\n\nIt is 4.<|im_end|>"
    ev = think_events(m, text)
    kinds = [type(e).__name__ for e in ev]
    assert kinds[0] == "Start" and kinds.count("End") == 1 and "Delta" in kinds
    end = next(e for e in ev if isinstance(e, reasoning.Event.End))
    assert end.text == "\nThe user wants 2+2. That is 4.\n"
    streamed = "".join(e.text for e in ev if isinstance(e, reasoning.Event.Delta))
    assert end.text.startswith(streamed) and len(streamed) > 10
    assert all(isinstance(e, reasoning.Event.Idle) for e in ev[kinds.index("End") + 1 :])


def test_a_template_that_opens_the_span_starts_inside_it():
    m = model_of("qwen", QWEN3_TEMPLATE.replace("{% if opens_think %}", "{% if true %}"))
    ev = think_events(m, "planning...</think>\n\nDone.<|im_end|>")
    assert [e for e in ev if isinstance(e, reasoning.Event.End)] == [reasoning.Event.End("planning...")]


def test_gpt_oss_analysis_channel_and_magistral_think_are_reasoning():
    m = model_of("harmony")
    ev = think_events(
        m,
        "<|channel|>analysis<|message|>Compute 6*7.<|end|><|start|>assistant<|channel|>final<|message|>42<|return|>",
    )
    assert [e for e in ev if isinstance(e, reasoning.Event.End)] == [reasoning.Event.End("Compute 6*7.")]
    m = model_of("mistral")
    ev = think_events(m, "[THINK]Short plan.[/THINK]Answer.</s>", step=1)
    assert [e for e in ev if isinstance(e, reasoning.Event.End)] == [reasoning.Event.End("Short plan.")]


def test_a_model_without_thinking_is_idle():
    m = model_of("llama3")
    assert all(isinstance(e, reasoning.Event.Idle) for e in think_events(m, "Plain answer.<|eot_id|>"))


# ---- chat decoder on the same stream --------------------------------------------------------------


def test_chat_decoder_deltas_and_done_on_a_qwen_reply():
    m = model_of("qwen", QWEN3_TEMPLATE)
    dec = chat.Decoder(m)
    ev = feed_all(dec, m, "Hello there, friend.<|im_end|>", step=2)
    deltas = "".join(e.text for e in ev if isinstance(e, chat.Event.Delta))
    done = [e for e in ev if isinstance(e, chat.Event.Done)]
    assert done == [chat.Event.Done("Hello there, friend.")] and "Hello there, friend.".startswith(deltas)
    assert len(deltas) > 10  # streamed (the last batch's text comes with Done)


def test_chat_decoder_leaves_out_thinking_and_harmonys_other_channels():
    m = model_of("qwen", QWEN3_TEMPLATE)
    ev = feed_all(chat.Decoder(m), m, "<think>\nhmm, 4.\n</think>\n\nIt is 4.<|im_end|>")
    assert ev[-1] == chat.Event.Done("\n\nIt is 4.") and not any(
        isinstance(e, chat.Event.Interrupt) for e in ev
    )
    m = model_of("harmony", HARMONY_TEMPLATE)
    assert m._pie.tokenizer.token_id("<|end|>") not in chat.stop_tokens(m)  # it ends a message, not the turn
    text = (
        "<|channel|>analysis<|message|>User asks 6*7.<|end|><|start|>assistant<|channel|>final<|message|>"
        "It is 42.<|return|>"
    )
    ev = feed_all(chat.Decoder(m), m, text)
    assert ev[-1] == chat.Event.Done("It is 42.") and not any(isinstance(e, chat.Event.Interrupt) for e in ev)


# ---- templating -----------------------------------------------------------------------------------

WEATHER = {"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object",
           "properties": {"city": {"type": "string"}}, "required": ["city"]}}  # fmt: skip


def test_equip_and_answer_prefix_render_the_templates_tool_turns():
    m = model_of("qwen", QWEN3_TEMPLATE)
    tok = m._pie.tokenizer
    text = tok.decode(tools.equip_prefix(m, [WEATHER]))
    assert text.startswith("<|im_start|>system\n# Tools") and text.endswith("</tool_call><|im_end|>\n")
    assert json.dumps({"type": "function", "function": WEATHER}) in text
    assert tools.equip_prefix(m, [json.dumps(WEATHER)]) == tools.equip_prefix(m, [WEATHER])
    ans = tok.decode(tools.answer_prefix(m, "get_weather", {"temp": 21}))
    assert ans == '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
    with pytest.raises(ValueError, match="needs a 'name'"):
        tools.equip_prefix(m, [{"description": "x"}])
    assert tools.native_matcher(m, [WEATHER]) is None


def test_equip_prefix_without_a_tool_block_lists_the_tools_in_a_turn():
    m = model_of(
        "gemma",
        "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}",
    )
    text = m._pie.tokenizer.decode(tools.equip_prefix(m, [WEATHER]))
    assert text.startswith("<start_of_turn>user\nYou can call these functions") and "get_weather" in text
    assert "```tool_code" in text


# Llama 3.1's template shape: a system turn always, the tools in it when tools_in_user_message is false
LLAMA_TEMPLATE = """{{- bos_token }}<|start_header_id|>system<|end_header_id|>

{% if tools and not tools_in_user_message %}Environment: ipython
{% endif %}Cutting Knowledge Date: December 2023

{% if tools and not tools_in_user_message %}You have access to the following functions.
{% for t in tools %}{{ t | tojson }}

{% endfor %}{% endif %}<|eot_id|>
{%- for m in messages %}{% if m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ m.content }}<|eot_id|>{% else %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{{ m.content }}<|eot_id|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""


def test_equip_prefix_is_the_whole_system_turn_when_the_template_always_renders_one():
    m = model_of("llama3", LLAMA_TEMPLATE)
    tok = m._pie.tokenizer
    tok.hf.bos_token = "<|begin_of_text|>"
    text = tok.decode(tools.equip_prefix(m, [WEATHER]))
    assert text.startswith("<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n")
    assert text.endswith("<|eot_id|>") and '"name": "get_weather"' in text and "<|begin_of_text|>" not in text
    ans = tok.decode(tools.answer_prefix(m, "get_weather", "21C"))
    assert ans == "<|start_header_id|>ipython<|end_header_id|>\n\n21C<|eot_id|>"


def test_non_special_markup_tokens_interrupt_the_chat_decoder():
    """Qwen 3's tokenizer marks <tool_call> as an added but non-special token: it is still a control token."""
    m = model_of("qwen", QWEN3_TEMPLATE)
    hf = m._pie.tokenizer.hf
    hf.add_tokens(["<tool_response>"])  # special=False, as in Qwen's tokenizer
    rid = m._pie.tokenizer.token_id("<tool_response>")
    assert not hf.added_tokens_decoder[rid].special
    dec = chat.Decoder(m)
    assert dec.feed(m._pie.tokenizer.encode("Hi")) == chat.Event.Delta("Hi")
    assert dec.feed([rid]) == chat.Event.Interrupt(rid)
