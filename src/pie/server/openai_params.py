"""Request bodies of the OpenAI-compatible API, checked into one GenRequest (400 with the field on error).

Not supported yet (400 that says so): tools / tool_choice (they need the tool-call decoders),
response_format json_object / json_schema (the grammar engine), top_logprobs > 0, echo, suffix, best_of.
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


def _unsupported(d: dict) -> None:
    if d.get("tools"):
        raise ApiError(
            400, "'tools' is not supported yet by pie serve (tool-call decoding is pending)", "tools"
        )
    if d.get("tool_choice") not in (None, "none", "auto"):
        raise ApiError(400, "'tool_choice' is not supported yet by pie serve", "tool_choice")
    rf, text = d.get("response_format"), d.get("text")
    if rf is None and isinstance(text, dict):  # the Responses API puts it under text.format
        rf = text.get("format")
    if isinstance(rf, dict) and rf.get("type") not in (None, "text"):
        raise ApiError(
            400,
            f"response_format {rf.get('type')!r} is not supported yet by pie serve (the grammar engine is pending)",
            "response_format",
        )
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


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(items, where: str) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise ApiError(400, f"{where}[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(
                400,
                f"{where}[{i}].role {role!r} is not supported (system, developer, user, assistant)",
                "messages",
            )
        out.append((ROLES[role], _text_of(m.get("content"), f"{where}[{i}]")))
    if not out:
        raise ApiError(400, f"'{where}' must not be empty", "messages")
    return out


def chat_request(d: dict, model: str) -> GenRequest:
    msgs = d.get("messages")
    if not isinstance(msgs, list):
        raise ApiError(400, "'messages' must be a list of {role, content} objects", "messages")
    r = _common(d, model, [_messages(msgs, "messages")], chat=True)
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
    r = _common(d, model, prompts, chat=False)
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
    inp = d.get("input")
    msgs: list[tuple[str, str]] = []
    if instructions := _get(d, "instructions", str, None):
        msgs.append(("system", instructions))
    if isinstance(inp, str):
        msgs.append(("user", _valid(inp, "input")))
    elif isinstance(inp, list):
        msgs += _messages(
            [m for m in inp if not (isinstance(m, dict) and m.get("type") not in (None, "message"))], "input"
        )
    else:
        raise ApiError(400, "'input' must be a string or a list of messages", "input")
    r = _common(d, model, [msgs], chat=True)
    r.max_tokens = _get(d, "max_output_tokens", int, None, 1)
    return r
