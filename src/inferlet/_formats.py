"""The native reasoning and tool-call formats of the roster's chat models, read from generated text.

Which format a model speaks is decided from its tokenizer (the control tokens in its vocabulary and its chat
template); the decoders in reasoning.py and tools.py stream generated tokens to text with the control tokens
kept, and the parsers here find the spans. They are written by hand because transformers renders prompts
(chat templates) but has no parser for generated tool calls; each parser follows the format its model card
and chat template document:

    qwen      (Qwen 2.5 / 3, hermes)  <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>
    qwen      (Qwen 3.5 / Coder, XML) <tool_call>\\n<function=NAME>\\n<parameter=K>\\nV\\n</parameter>\\n</function>\\n</tool_call>
              thinking                <think> ... </think> (a template whose generation prompt opens it starts inside)
    llama3    (Llama 3.1-3.3)         {"name": ..., "parameters": {...}} as the whole reply, or
                                      <|python_tag|>{json} / <|python_tag|>tool.call(query="...") ending <|eom_id|>
              (Llama 3.2 pythonic)    [get_weather(city="Paris"), ...]
    harmony   (GPT-OSS)               <|channel|>analysis<|message|>...<|end|> is the reasoning;
                                      <|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>{...}<|call|>
                                      (or `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>`)
    mistral   (v3)                    [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
              (v11+ / Magistral)      [TOOL_CALLS]NAME[ARGS]{...} (or NAME[CALL_ID]id[ARGS]{...}); [THINK]...[/THINK]
    gemma     (Gemma 4)               <|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}<tool_call|>; <|channel>thought ...<channel|>
              (Gemma 2 / 3)           no tool tokens: a ```tool_code\\nNAME(key="v")\\n``` block, Google's documented format
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

_JSON = json.JSONDecoder()


@dataclass(frozen=True)
class Format:
    name: str  # qwen, llama3, harmony, mistral, gemma, plain
    think: tuple[str, str] | None  # reasoning span markers (open, close) in the text stream
    turn_end: tuple[str, ...]  # end-of-turn markers: a call without a closing marker ends there


_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|return|>", "<|call|>", "<|end|>", "</s>",
              "<end_of_turn>", "<turn|>", "<|endoftext|>")  # fmt: skip


def detect(vocab: set[str], template: str) -> Format:
    """The format of a tokenizer, from its control tokens and chat template."""
    ends = tuple(t for t in _TURN_ENDS if t in vocab or t in template)
    if "<|channel|>" in vocab and "<|message|>" in vocab:
        return Format("harmony", ("<|channel|>analysis<|message|>", "<|end|>"), ends)
    if "[TOOL_CALLS]" in vocab or "[INST]" in vocab:
        return Format("mistral", ("[THINK]", "[/THINK]") if "[THINK]" in vocab else None, ends)
    if "<|start_header_id|>" in vocab or "<|python_tag|>" in vocab:
        return Format("llama3", None, ends)
    if "<start_of_turn>" in vocab or "<|turn>" in vocab or "<|tool_call>" in vocab:
        think = ("<|channel>", "<channel|>") if "<|channel>" in vocab else None
        return Format("gemma", think, ends)
    think = ("<think>", "</think>") if "<think>" in vocab or "<think>" in template else None
    if "<tool_call>" in vocab or "<tool_call>" in template or "<|im_start|>" in vocab:
        return Format("qwen", think, ends)
    return Format("plain", think, ends)


# ---- tool-call parsers: each takes the text seen so far and returns (calls, consumed chars, in_call) -----


@dataclass(frozen=True)
class Call:
    name: str
    args: str  # JSON text of the arguments object


def _args_json(value) -> str:
    if isinstance(value, str):  # some models emit the arguments as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return json.dumps(value)
    return json.dumps(value if value is not None else {}, ensure_ascii=False)


def _json_at(text: str, i: int):
    """(value, end) of the JSON value starting at text[i] (after spaces), or None while incomplete/invalid."""
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    try:
        return _JSON.raw_decode(text, i)
    except json.JSONDecodeError:
        return None


def _call_of(obj) -> Call | None:
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        args = obj.get("arguments", obj.get("parameters", {}))
        return Call(obj["name"], _args_json(args))
    return None


def parse_hermes_body(body: str) -> Call | None:
    """The inside of <tool_call>...</tool_call>: JSON (Qwen 2.5 / 3) or XML functions (Qwen 3.5 / Coder)."""
    body = body.strip()
    if body.startswith("<function="):
        m = re.match(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", body, re.S)
        if m is None:
            return None
        args = {}
        for k, v in re.findall(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", m.group(2), re.S):
            args[k.strip()] = _typed(v)
        return Call(m.group(1).strip(), json.dumps(args, ensure_ascii=False))
    got = _json_at(body, 0)
    return _call_of(got[0]) if got else None


def _typed(v: str):
    """An XML parameter's value: JSON when it parses (numbers, lists...), else the text."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def parse_pythonic(src: str) -> list[Call] | None:
    """`name(a=1, b="x")`, `[f(a=1), g()]` or `tool.call(query="x")` (Llama's built-ins, Gemma's tool_code)."""
    src = src.strip()
    try:
        tree = ast.parse(src, mode="eval").body
    except SyntaxError:
        return None
    nodes = tree.elts if isinstance(tree, ast.List) else [tree]
    calls = []
    for n in nodes:
        if not isinstance(n, ast.Call) or n.args and not n.keywords and len(n.args) > 1:
            return None
        f = n.func
        if isinstance(f, ast.Attribute) and f.attr == "call" and isinstance(f.value, ast.Name):
            name = f.value.id  # Llama built-in tools: brave_search.call(query="...")
        elif isinstance(f, ast.Name | ast.Attribute):
            name = ast.unparse(f)
        else:
            return None
        try:
            args = {k.arg: ast.literal_eval(k.value) for k in n.keywords if k.arg}
            if n.args:  # a lone positional argument (the model skipped the name)
                args["input"] = ast.literal_eval(n.args[0])
        except ValueError:
            return None
        calls.append(Call(name, json.dumps(args, ensure_ascii=False)))
    return calls


def parse_gemma4_args(src: str) -> str | None:
    """Gemma 4's `{key:<|"|>text<|"|>,n:3,flag:true}` (strings quoted by the <|"|> token) as JSON text."""
    strings: list[str] = []

    def hold(m: re.Match) -> str:
        strings.append(m.group(1))
        return f'"\ue000{len(strings) - 1}"'

    body = re.sub(r'<\|"\|>(.*?)<\|"\|>', hold, src, flags=re.S)
    body = re.sub(r"([{,]\s*)([A-Za-z_][\w-]*)\s*:", r'\1"\2":', body)  # bare keys get quotes
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None

    def restore(v):
        if isinstance(v, str) and v.startswith("\ue000"):
            return strings[int(v[1:])]
        if isinstance(v, dict):
            return {k: restore(x) for k, x in v.items()}
        if isinstance(v, list):
            return [restore(x) for x in v]
        return v

    return json.dumps(restore(value), ensure_ascii=False)


_HARMONY_TO = re.compile(r"to=(?:functions\.)?([^\s<]+)")


def parse_harmony_header(header: str) -> str | None:
    """The recipient (tool name) of a harmony message header such as ` to=functions.f<|channel|>commentary json`."""
    m = _HARMONY_TO.search(header)
    return m.group(1) if m and m.group(1) != "assistant" else None
