"""Tools, tool_choice and response_format of /v1/chat/completions (and response_format of /v1/completions).

The request is checked here (400 with the field on error); the run renders the conversation with the tools
through the model's chat template, generates under a grammar when the request asks for one (llguidance,
inferlet.grammar) and parses the model's native tool-call format with inferlet.tools.Decoder.

Forcing a call (tool_choice "required" or a named function) is a grammar over the model's native call
format: one call, its JSON object matching {"name": <a tool>, "arguments": <its parameters>}. That is
feasible where the format wraps a JSON object in plain text: qwen (hermes `<tool_call>` JSON) and llama3
(a bare JSON reply, "parameters"). The other formats (harmony, mistral, gemma) get a 400 that says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pie.server.openai_params import ApiError

# JSON inside a grammar: fixed separators, no free whitespace (as inferlet.grammar's JSON schemas)
_X_GUIDANCE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class Structure:
    """What a chat request asks beyond text: tools, how to choose them, and an output format."""

    tools: list[dict] | None = None  # OpenAI function entries {"type": "function", "function": {...}}
    tool_choice: str | dict = (
        "auto"  # "auto", "none", "required" or {"type": "function", "function": {"name"}}
    )
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", ...}

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced(self) -> list[dict]:
        """The tools a call is forced among ([] when none is forced)."""
        if not self.uses_tools or self.tool_choice == "auto":
            return []
        if self.tool_choice == "required":
            return list(self.tools or [])
        name = self.tool_choice["function"]["name"]
        return [t for t in self.tools or [] if t["function"]["name"] == name]


def _schema_of(v, where: str) -> dict:
    if not isinstance(v, dict):
        raise ApiError(400, f"{where} must be a JSON schema object", where.split(".")[0])
    return v


def parse_tools(d: dict) -> list[dict] | None:
    tools = d.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ApiError(
            400, "'tools' must be a list of {type: function, function: {name, parameters}}", "tools"
        )
    out, names = [], set()
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict):
            raise ApiError(400, f"tools[{i}] must be {{type: 'function', function: {{name, ...}}}}", "tools")
        name = f.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"tools[{i}].function.name must be a non-empty string", "tools")
        if name in names:
            raise ApiError(400, f"tools[{i}]: the function name {name!r} appears twice", "tools")
        names.add(name)
        params = f.get("parameters", {"type": "object", "properties": {}})
        entry = {"name": name, "parameters": _schema_of(params, f"tools[{i}].function.parameters")}
        if isinstance(f.get("description"), str):
            entry["description"] = f["description"]
        out.append({"type": "function", "function": entry})
    return out or None


def parse_tool_choice(d: dict, tools: list[dict] | None) -> str | dict:
    tc = d.get("tool_choice")
    if tc is None:
        return "auto" if tools else "none"
    if isinstance(tc, str):
        if tc not in ("auto", "none", "required"):
            raise ApiError(
                400,
                f"'tool_choice' must be 'auto', 'none', 'required' or a function, got {tc!r}",
                "tool_choice",
            )
        if tc == "required" and not tools:
            raise ApiError(400, "tool_choice 'required' needs 'tools'", "tool_choice")
        return tc
    name = tc.get("function", {}).get("name") if isinstance(tc, dict) else None
    if not isinstance(name, str):
        raise ApiError(
            400, "'tool_choice' as an object is {type: 'function', function: {name}}", "tool_choice"
        )
    if name not in {t["function"]["name"] for t in tools or []}:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among 'tools'", "tool_choice")
    return {"type": "function", "function": {"name": name}}


def parse_response_format(d: dict) -> dict | None:
    rf = d.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise ApiError(
                400, "response_format json_schema needs json_schema: {name, schema: {...}}", "response_format"
            )
        return {"type": "json_schema", "schema": js.get("schema", {})}
    raise ApiError(
        400,
        f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
        "response_format",
    )


def parse_structure(d: dict, chat: bool) -> Structure:
    rf = parse_response_format(d)
    if not chat:
        for key in ("tools", "tool_choice"):
            if d.get(key) is not None:
                raise ApiError(400, f"'{key}' is a chat parameter: use /v1/chat/completions", key)
        return Structure(response_format=rf)
    tools = parse_tools(d)
    s = Structure(tools=tools, tool_choice=parse_tool_choice(d, tools), response_format=rf)
    if rf is not None and s.forced:
        raise ApiError(
            400,
            "response_format and a forced tool call (tool_choice) cannot both shape the output",
            "response_format",
        )
    return s


# ---- constraints -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallGrammar:
    """An inferlet Schema (build_constraint): `pre` + one JSON object matching `schema` + `post`, as a Lark
    grammar compiled by llguidance. A marker that is one token of the model's vocabulary (Qwen's
    <tool_call>) is referenced by its id: llguidance never matches a control token against text."""

    pre: str
    post: str
    schema: dict

    def lark(self, tok) -> str:
        def part(text: str) -> str:
            parts = []
            for piece in text.split("\n"):
                tid = tok.token_id(piece) if piece else None
                parts.append(f"<[{tid}]>" if tid is not None else json.dumps(piece) if piece else "")
            return ' "\\n" '.join(parts).strip()

        body = " ".join(x for x in (part(self.pre), "call", part(self.post)) if x)
        return f"start: {body}\ncall: %json {json.dumps(self.schema)}\n"

    def build_constraint(self, model):
        from inferlet.grammar import Grammar, GrammarConstraint, _llg

        src = self.lark(model._pie.tokenizer)
        grammar = Grammar(_llg().LLMatcher.grammar_from_lark(src), "tool-call grammar").check()
        return GrammarConstraint.from_grammar(grammar, model)


def call_schema(tools: list[dict], args_key: str) -> dict:
    """The JSON schema of one call among `tools`: {"name": const, args_key: parameters}."""
    alts = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, args_key: t["function"]["parameters"]},
            "required": ["name", args_key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def forced_call_constraint(fmt_name: str, tools: list[dict], model_name: str) -> CallGrammar:
    """A grammar that makes the output exactly one call in the model's native format."""
    if fmt_name == "qwen":
        pre, key, post = "<tool_call>\n", "arguments", "\n</tool_call>"
    elif fmt_name == "llama3":
        pre, key, post = "", "parameters", ""
    else:
        raise ApiError(
            400,
            f"tool_choice 'required' / a named function is not supported for {model_name!r}: its native "
            f"tool-call format ({fmt_name}) has no JSON-grammar form in pie yet; use tool_choice 'auto'",
            "tool_choice",
        )
    return CallGrammar(pre, post, {**call_schema(tools, key), "x-guidance": _X_GUIDANCE})


def output_constraint(s: Structure, fmt_name: str, model_name: str):
    """The constraint the request asks for (None: free generation)."""
    from inferlet.grammar import AnyJson, JsonSchema

    if s.forced:
        return forced_call_constraint(fmt_name, s.forced, model_name)
    rf = s.response_format
    if rf is None:
        return None
    if rf["type"] == "json_object":
        return AnyJson()
    return JsonSchema(json.dumps(rf["schema"]))


def check_constraint(c, model) -> None:
    """Compile the constraint now so a bad schema is a 400 before anything runs."""
    from inferlet.grammar import GrammarError

    try:
        c.build_constraint(model)
    except GrammarError as e:
        param = "response_format" if not isinstance(c, CallGrammar) else "tools"
        raise ApiError(400, f"the schema does not compile: {e}", param) from None


# ---- rendering the conversation --------------------------------------------------------------------------


def template_message(m: dict) -> dict:
    """An OpenAI message as chat templates take it (tool-call arguments as objects)."""
    out = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        calls = []
        for c in m["tool_calls"]:
            f = c.get("function", {})
            args = f.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                pass
            calls.append(
                {
                    "id": c.get("id"),
                    "type": "function",
                    "function": {"name": f.get("name"), "arguments": args},
                }
            )
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if m.get(key):
            out[key] = m[key]
    return out


def _fallback_system(tools: list[dict], fmt_name: str) -> str:
    """The tool block for a template that renders no tools (it ignores tools=): hermes-style text."""
    specs = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    if fmt_name == "llama3":
        how = 'reply with only {"name": <function name>, "parameters": <arguments object>}'
    else:
        how = (
            'reply with <tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n</tool_call>'
        )
    return f"You may call these functions:\n{specs}\nTo call one, {how}"


def prompt_ids(tok, messages: list[dict], s: Structure, fmt_name: str) -> list[int]:
    """Token ids of the conversation plus the generation prompt, tools rendered by the template."""
    from pie.sdk.chat import ChatState

    msgs = [template_message(m) for m in messages]
    kw: dict = {}
    if s.uses_tools:
        kw["tools"] = s.tools
        plain = ChatState()
        plain.messages = list(msgs)
        with_tools = ChatState(kw)
        with_tools.messages = list(msgs)
        if str(with_tools.cue(tok)) == str(plain.cue(tok)):  # the template ignores tools
            kw = {}
            msgs = [{"role": "system", "content": _fallback_system(s.tools or [], fmt_name)}, *msgs]
    st = ChatState(kw)
    st.messages = msgs
    try:
        text = st.cue(tok)
    except Exception as e:  # a template that refuses the conversation (roles, tool turns)
        raise ApiError(
            400, f"the model's chat template cannot render these messages: {e}", "messages"
        ) from None
    return tok.encode(text)


def openai_calls(calls, index_base: int = 0) -> list[dict]:
    """inferlet.tools Call events as OpenAI tool_calls."""
    import uuid

    return [
        {
            "index": index_base + i,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c.name, "arguments": c.args},
        }
        for i, c in enumerate(calls)
    ]
