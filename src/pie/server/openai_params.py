"""Request bodies of the OpenAI-compatible API, checked into one GenRequest (400 with the field on error).

Tools, tool_choice and response_format are checked in openai_tools. Not supported yet (400 that says
so): response formats on /v1/responses, top_logprobs > 0, echo, suffix, best_of.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pie.errors import PieError


class ApiError(PieError):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class GenRequest:
    model: str
    prompts: list  # chat: one list of (role, text); completions: str or token-id lists
    chat: bool
    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # an extension (vLLM's too): generate max_tokens whatever the model says
    structure: object = None  # openai_tools.Structure: tools / tool_choice / response_format (None: none)
    messages: list[dict] | None = None  # chat: the messages as sent (tool turns, assistant tool_calls)

    @property
    def structured(self) -> bool:
        """Whether the run goes through openai_tools (tools, a grammar, or tool turns in the history)."""
        s = self.structure
        tool_turns = any(m.get("role") == "tool" or m.get("tool_calls") for m in self.messages or [])
        return tool_turns or s is not None and (s.uses_tools or s.response_format is not None)


def parse_json(body: bytes, limit: int) -> dict:
    if len(body) > limit:
        raise ApiError(413, f"the request body is {len(body)} bytes, over the limit of {limit}")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _get(d: dict, key: str, types, default=None, lo=None, hi=None):
    v = d.get(key, default)
    if v is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        names = " or ".join("number" if t is float else t.__name__ for t in types)
        raise ApiError(400, f"'{key}' must be {names}, got {json.dumps(v)[:60]}", key)
    if lo is not None and v < lo or hi is not None and v > hi:
        raise ApiError(400, f"'{key}' must be in [{lo}, {hi}], got {v}", key)
    return v


def _unsupported_responses(d: dict) -> None:
    text = d.get("text")
    rf = text.get("format") if isinstance(text, dict) else None  # the Responses API: text.format
    if isinstance(rf, dict) and rf.get("type") not in (None, "text"):
        raise ApiError(
            400,
            f"text.format {rf.get('type')!r} is not supported yet on /v1/responses; use response_format "
            "on /v1/chat/completions",
            "text",
        )
    if d.get("tools"):
        raise ApiError(
            400, "'tools' is not supported yet on /v1/responses; use /v1/chat/completions", "tools"
        )


def _unsupported(d: dict) -> None:
    for key in ("echo", "suffix"):
        if d.get(key):
            raise ApiError(400, f"'{key}' is not supported yet by pie serve", key)
    if d.get("best_of") not in (None, 1) and d.get("best_of") != d.get("n"):
        raise ApiError(400, "'best_of' is not supported yet by pie serve", "best_of")


def _stop(d: dict) -> list[str]:
    stop = d.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    return [s for s in stop if s]


def _common(d: dict, model: str, prompts: list, chat: bool) -> GenRequest:
    _unsupported(d)
    r = GenRequest(model=model, prompts=prompts, chat=chat)
    r.n = _get(d, "n", int, 1, 1, 16)
    r.temperature = float(_get(d, "temperature", (int, float), 1.0, 0, 2))
    r.top_p = float(_get(d, "top_p", (int, float), 1.0, 0, 1))
    if r.top_p == 0:
        r.temperature = 0.0  # the only token with all the mass: argmax
    r.seed = _get(d, "seed", int, None, 0, 2**63 - 1)
    r.stop = _stop(d)
    r.stream = bool(_get(d, "stream", bool, False))
    r.ignore_eos = bool(_get(d, "ignore_eos", bool, False))
    opts = _get(d, "stream_options", dict, {})
    r.include_usage = bool(opts.get("include_usage"))
    return r


def _valid(text: str, where: str) -> str:
    from pie.models.text import unicode_problem

    if (problem := unicode_problem(text)) is not None:
        raise ApiError(400, f"{where} is not valid text: {problem}; send UTF-8 text", "messages")
    return text


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return _valid(content, where)
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") not in ("text", "input_text", "output_text"):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise ApiError(
                    400, f"{where}: content part {kind!r} is not supported (text only)", "messages"
                )
            parts.append(_valid(_get(p, "text", str, ""), where))
        return "".join(parts)
    if content is None:
        return ""
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", "messages")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _messages(items, where: str) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise ApiError(400, f"{where}[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(
                400,
                f"{where}[{i}].role {role!r} is not supported (system, developer, user, assistant, tool)",
                "messages",
            )
        out.append((ROLES[role], _text_of(m.get("content"), f"{where}[{i}]")))
    if not out:
        raise ApiError(400, f"'{where}' must not be empty", "messages")
    return out


def _raw_messages(items: list, texts: list[tuple[str, str]]) -> list[dict]:
    """The messages for the chat template: role, text, and the tool fields (tool_calls, tool_call_id)."""
    out = []
    for i, (m, (role, text)) in enumerate(zip(items, texts, strict=True)):
        raw: dict = {"role": role, "content": text}
        calls = m.get("tool_calls")
        if calls is not None:
            if (
                role != "assistant"
                or not isinstance(calls, list)
                or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)
            ):
                raise ApiError(
                    400,
                    f"messages[{i}].tool_calls must be a list of {{id, type, function}} on an assistant",
                    "messages",
                )
            raw["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                raw[key] = m[key]
        if role == "tool":  # OpenAI's rule: a tool result answers a call of an earlier assistant message
            ids = {c.get("id") for o in out if o["role"] == "assistant" for c in o.get("tool_calls", [])}
            if not ids or raw.get("tool_call_id") not in ids:
                raise ApiError(
                    400,
                    f"messages[{i}]: a message with role 'tool' must answer a tool call of an earlier "
                    f"assistant message (its tool_call_id {raw.get('tool_call_id')!r} is none of "
                    f"{sorted(i for i in ids if i) or 'no calls'})",
                    "messages",
                )
        out.append(raw)
    return out


def chat_request(d: dict, model: str) -> GenRequest:
    from pie.server.openai_tools import parse_structure

    msgs = d.get("messages")
    if not isinstance(msgs, list):
        raise ApiError(400, "'messages' must be a list of {role, content} objects", "messages")
    texts = _messages(msgs, "messages")
    r = _common(d, model, [texts], chat=True)
    r.messages = _raw_messages(msgs, texts)
    r.structure = parse_structure(d, chat=True)
    r.max_tokens = _get(d, "max_completion_tokens", int, None, 1) or _get(d, "max_tokens", int, None, 1)
    r.logprobs = bool(_get(d, "logprobs", bool, False))
    if _get(d, "top_logprobs", int, 0, 0, 20):
        raise ApiError(
            400,
            "'top_logprobs' > 0 is not supported yet by pie serve (logprobs of the sampled token are)",
            "top_logprobs",
        )
    return r


def completion_request(d: dict, model: str) -> GenRequest:
    p = d.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif (
        isinstance(p, list)
        and p
        and all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in p)
    ):
        prompts = list(p)
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids", "prompt")
    for i, x in enumerate(prompts):
        if isinstance(x, str):
            _valid(x, f"prompt[{i}]")
    from pie.server.openai_tools import parse_structure

    r = _common(d, model, prompts, chat=False)
    r.structure = parse_structure(d, chat=False)
    r.max_tokens = _get(d, "max_tokens", int, 16, 0)
    lp = _get(d, "logprobs", int, None, 0, 5)
    if lp:
        raise ApiError(
            400,
            "'logprobs' > 0 (top alternatives) is not supported yet by pie serve; use 0 for "
            "the sampled tokens' logprobs",
            "logprobs",
        )
    r.logprobs = lp == 0
    return r


def responses_request(d: dict, model: str) -> GenRequest:
    _unsupported_responses(d)
    inp = d.get("input")
    msgs: list[tuple[str, str]] = []
    if instructions := _get(d, "instructions", str, None):
        msgs.append(("system", instructions))
    if isinstance(inp, str):
        msgs.append(("user", _valid(inp, "input")))
    elif isinstance(inp, list):
        items = [m for m in inp if not (isinstance(m, dict) and m.get("type") not in (None, "message"))]
        if any(isinstance(m, dict) and m.get("role") == "tool" for m in items):
            raise ApiError(400, "role 'tool' is not supported on /v1/responses", "input")
        msgs += _messages(items, "input")
    else:
        raise ApiError(400, "'input' must be a string or a list of messages", "input")
    r = _common(d, model, [msgs], chat=True)
    r.max_tokens = _get(d, "max_output_tokens", int, None, 1)
    return r
