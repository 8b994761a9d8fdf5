"""Pie's tool-calling helpers, in each model's native format (see inferlet._formats for the formats).

    ctx.append(tools.equip_prefix(model, [schema]))    # the template's tool block (before the user turn)
    dec = tools.Decoder(model)
    async for step in ctx.generate(sampler):
        match dec.feed((await step.execute()).tokens):
            case tools.Event.Call(name=n, args=a): ...  # a = the arguments as JSON text
    ctx.append(tools.answer_prefix(model, n, result))  # the template's tool-result turn

equip_prefix and answer_prefix render through the model's own chat template (transformers), passing the
tools as OpenAI-style function entries; they return the turns the template adds for them. A template that
always renders a system turn (Llama 3.x, GPT-OSS) puts the tools in it, so equip_prefix is best the first
thing in a fresh context; Context(model, template_kwargs={"tools": [...]}) (pie's extension) renders them
inside the conversation instead. native_matcher returns None until pie compiles tool grammars (its
documented "no enforceable format" answer); generate freely and parse with the Decoder.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass

from . import _formats as F
from ._textstream import TextStream, held_back, model_format
from .grammar import Matcher
from .model import Model

_PROBE = "\ue000pie-probe\ue001"  # a user message no template rewrites


# ---- templating --------------------------------------------------------------------------------------


def _tool_entries(tools: list[str | dict]) -> list[dict]:
    out = []
    for t in tools:
        if isinstance(t, str):
            try:
                t = _json.loads(t)
            except _json.JSONDecodeError as e:
                raise ValueError(f"a tool schema is not valid JSON ({e}): {t[:80]!r}") from None
        if not isinstance(t, dict):
            raise TypeError(f"a tool is a JSON schema (dict or its JSON text), got {type(t).__name__}")
        if "function" not in t:  # Pie's envelope {name, description, parameters} -> OpenAI's
            if "name" not in t:
                raise ValueError(f"a tool needs a 'name' (and 'description', 'parameters'): {t}")
            t = {"type": "function", "function": t}
        out.append(t)
    return out


_TURN_STARTS = ("<|im_start|>", "<|start|>", "<|start_header_id|>", "<start_of_turn>", "<|turn>", "[INST]",
                "[AVAILABLE_TOOLS]", "[SYSTEM_PROMPT]", "[TOOL_RESULTS]")  # fmt: skip


def _inserted_turns(model: Model, before: list[dict], with_: str, without: str) -> str:
    """The whole turns of `with_` that `without` lacks (both render the same conversation)."""
    n = min(len(with_), len(without))
    s = 0  # the common tail first: an insert right before the shared turns is the usual case
    while s < n and with_[-1 - s] == without[-1 - s]:
        s += 1
    p = 0
    while p < n - s and with_[p] == without[p]:
        p += 1
    a = max((with_.rfind(m, 0, p + 1) for m in _TURN_STARTS), default=-1)
    a = 0 if a < 0 else a
    bos = model._pie.tokenizer.hf.bos_token
    if a == 0 and bos and with_.startswith(bos):
        a = len(bos)  # the context has its own beginning of sequence
    b = len(with_) - s
    starts = [i for m in _TURN_STARTS if (i := with_.find(m, b)) >= 0]
    if not any(with_.startswith(m, b) for m in _TURN_STARTS):
        b = min(starts, default=len(with_))
    return with_[a:b]


def equip_prefix(model: Model, tools: list[str | dict]) -> list[int]:
    """Tokens that register `tools` (JSON schemas, dict or text) the way the model's chat template does;
    append them before your user message."""
    tok = model._pie.tokenizer
    msgs = [{"role": "user", "content": _PROBE}]
    entries = _tool_entries(tools)
    kw = {"tools_in_user_message": False}  # Llama 3.x: tools in the system turn, not inside the user's
    with_ = tok.render_chat(msgs, tools=entries, **kw)
    text = _inserted_turns(model, msgs, with_, tok.render_chat(msgs, **kw))
    if not text.strip():
        text = _fallback_equip(model, entries)
    return tok.encode(text)


def _fallback_equip(model: Model, entries: list[dict]) -> str:
    """Templates without a tool block (Gemma 2 / 3): a system-position turn that lists the tools and asks
    for Google's documented ```tool_code``` calls (written by hand: there is no template text to reuse)."""
    specs = "\n".join(_json.dumps(e["function"], ensure_ascii=False) for e in entries)
    text = (
        "You can call these functions:\n"
        f"{specs}\n"
        "To call one, reply with a Python call in a block: ```tool_code\nname(arg=value)\n```"
    )
    tok = model._pie.tokenizer
    return _strip_bos(model, tok.render_chat([{"role": "user", "content": text}]))


def _strip_bos(model: Model, text: str) -> str:
    bos = model._pie.tokenizer.hf.bos_token
    return text[len(bos) :] if bos and text.startswith(bos) else text


def answer_prefix(model: Model, name: str, value: str | dict | list) -> list[int]:
    """Tokens of the turn that gives the model a tool's result (`value`; dict/list are JSON-encoded), as
    its chat template renders it after a call to `name`."""
    tok = model._pie.tokenizer
    content = value if isinstance(value, str) else _json.dumps(value, ensure_ascii=False)
    call = {"type": "function", "function": {"name": name, "arguments": {}}, "id": "call0"}
    base = [{"role": "user", "content": _PROBE}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    result = {"role": "tool", "name": name, "content": content, "tool_call_id": "call0"}
    try:
        without = tok.render_chat(base)
        with_ = tok.render_chat([*base, result])
    except Exception:  # a template that knows no tool turns (Gemma 2 / 3): the result as a user turn
        return tok.encode(_strip_bos(model, tok.render_chat([{"role": "user", "content": content}])))
    if with_.startswith(without):
        return tok.encode(with_[len(without) :])
    return tok.encode(_inserted_turns(model, base, with_, without))


def native_matcher(model: Model, tools: list[str | dict]) -> Matcher | None:
    """A grammar Matcher for the model's native tool-call format, or None when there is none to enforce.
    pie does not compile tool-call grammars yet: this returns None (Pie's answer for "generate freely and
    parse"), after checking the tools."""
    _tool_entries(tools)
    return None


# ---- events and the decoder ------------------------------------------------------------------------------


class Event:
    """Tool-decoder events; one per feed(): Start (a call is being assembled, or nothing happened) or
    Call(name, args) with args the JSON text of the arguments."""

    __slots__ = ()

    @dataclass(frozen=True, slots=True)
    class Start:
        """A tool call is in progress (or nothing to report): keep feeding."""

    @dataclass(frozen=True, slots=True)
    class Call:
        """A complete tool call; `args` is JSON-encoded."""

        name: str
        args: str


AnyEvent = Event.Start | Event.Call


class Decoder:
    """Stateful tool-call decoder: feed each step's tokens; Call fires once per complete call. Several
    calls completed by one batch come one per feed (feed([]) drains them); finish() (pie's extension)
    returns every call still pending, parsing what a format ends only with the turn."""

    __slots__ = ("_fmt", "_stream", "_buf", "_queue", "_in_call", "_seen_text")

    def __init__(self, model: Model) -> None:
        self._fmt = model_format(model)
        self._stream = TextStream(model)
        self.reset()

    def feed(self, tokens: list[int]) -> AnyEvent:
        self._buf += self._stream.push(tokens)
        self._scan(final=False)
        if self._queue:
            c = self._queue.pop(0)
            return Event.Call(c.name, c.args)
        return Event.Start()

    def finish(self) -> list[Event.Call]:
        """Every call not yet returned, the end of the text counting as the end of the turn."""
        self._scan(final=True)
        out, self._queue = [Event.Call(c.name, c.args) for c in self._queue], []
        return out

    def reset(self) -> None:
        self._stream.reset()
        self._buf = ""
        self._queue: list[F.Call] = []
        self._in_call = False
        self._seen_text = False  # visible text before any call (Llama's bare-JSON calls are whole replies)

    # ---- per format -----------------------------------------------------------------------------------
    def _scan(self, final: bool) -> None:
        scan = {
            "qwen": self._scan_tagged,
            "gemma": self._scan_gemma,
            "mistral": self._scan_mistral,
            "llama3": self._scan_llama,
            "harmony": self._scan_harmony,
        }.get(self._fmt.name, self._scan_tagged)
        scan(final)

    def _end_of_turn(self, text: str, start: int) -> int:
        ends = [i for m in self._fmt.turn_end if (i := text.find(m, start)) >= 0]
        return min(ends, default=-1)

    def _pair(self, final: bool, opener: str, closer: str, parse) -> None:
        """Calls between `opener` and `closer` (or the end of the turn)."""
        while True:
            i = self._buf.find(opener)
            if i < 0:
                keep = held_back(self._buf, (opener,))
                self._buf = self._buf[len(self._buf) - keep :]
                self._in_call = False
                return
            j = self._buf.find(closer, i + len(opener))
            stop = j if j >= 0 else self._end_of_turn(self._buf, i + len(opener))
            if stop < 0 and final:
                stop = len(self._buf)
            if stop < 0:
                self._in_call = True
                self._buf = self._buf[i:]
                return
            calls = parse(self._buf[i + len(opener) : stop])
            self._queue += calls or []
            self._buf = self._buf[stop + (len(closer) if stop == j else 0) :]

    def _scan_tagged(self, final: bool) -> None:
        def parse(body: str) -> list[F.Call]:
            c = F.parse_hermes_body(body)
            return [c] if c else []

        self._pair(final, "<tool_call>", "</tool_call>", parse)

    def _scan_gemma(self, final: bool) -> None:
        if "<|tool_call>" in self._buf or held_back(self._buf, ("<|tool_call>",)):

            def parse4(body: str) -> list[F.Call]:  # call:NAME{...}
                body = body.strip()
                name, brace, rest = body.removeprefix("call:").partition("{")
                args = F.parse_gemma4_args(brace + rest) if brace else "{}"
                return [F.Call(name.strip(), args)] if name.strip() and args is not None else []

            self._pair(final, "<|tool_call>", "<tool_call|>", parse4)
            return
        self._pair(final, "```tool_code", "```", lambda body: F.parse_pythonic(body) or [])

    def _scan_mistral(self, final: bool) -> None:
        tag = "[TOOL_CALLS]"
        while True:
            i = self._buf.find(tag)
            if i < 0:
                keep = held_back(self._buf, (tag,))
                self._buf = self._buf[len(self._buf) - keep :]
                self._in_call = False
                return
            self._in_call = True
            k = i + len(tag)
            rest = self._buf[k:].lstrip()
            if rest.startswith("["):  # v3: a JSON list of calls
                got = F._json_at(self._buf, k)
                if got is None:
                    self._buf = self._buf[i:]
                    return
                self._queue += [c for o in got[0] if (c := F._call_of(o))] if isinstance(got[0], list) else []
                self._buf = self._buf[got[1] :]
                continue
            a = self._buf.find("[ARGS]", k)
            if a < 0:
                self._buf = self._buf[i:]
                return
            name = self._buf[k:a].split("[CALL_ID]")[0].strip()
            got = F._json_at(self._buf, a + len("[ARGS]"))
            if got is None:
                self._buf = self._buf[i:]
                return
            self._queue.append(F.Call(name, F._args_json(got[0])))
            self._buf = self._buf[got[1] :]

    def _scan_llama(self, final: bool) -> None:
        tag = "<|python_tag|>"
        i = self._buf.find(tag)
        if i >= 0:
            self._in_call = True
            body_at = i + len(tag)
            got = F._json_at(self._buf, body_at)
            if got is not None and (c := F._call_of(got[0])):
                self._queue.append(c)
                self._buf = self._buf[got[1] :]
                return
            stop = self._end_of_turn(self._buf, body_at)
            if stop < 0 and final:
                stop = len(self._buf)
            if stop >= 0:
                self._queue += F.parse_pythonic(self._buf[body_at:stop]) or []
                self._buf, self._in_call = self._buf[stop:], False
            return
        head = self._buf.lstrip()
        if self._seen_text or not head:
            return
        if head[0] == "{":  # a JSON call is the whole reply
            got = F._json_at(head, 0)
            if got is not None:
                c = F._call_of(got[0])
                self._queue += [c] if c else []
                self._buf, self._seen_text = head[got[1] :], c is None
            return
        if head[0] == "[":  # Llama 3.2's pythonic list
            stop = self._end_of_turn(head, 0)
            if stop < 0 and final:
                stop = len(head)
            if stop >= 0:
                self._queue += F.parse_pythonic(head[:stop]) or []
                self._buf, self._seen_text = head[stop:], True
            return
        if not held_back(head, (tag,)):
            self._seen_text = True

    def _scan_harmony(self, final: bool) -> None:
        while True:
            m = self._buf.find("<|message|>")
            if m < 0:
                return
            header = self._buf[:m].rsplit("<|start|>", 1)[-1]
            name = F.parse_harmony_header(header)
            body_at = m + len("<|message|>")
            ends = [
                i for e in ("<|call|>", "<|end|>", "<|return|>") if (i := self._buf.find(e, body_at)) >= 0
            ]
            stop = min(ends, default=-1)
            if name is None:  # analysis / final text: skip the message
                if stop < 0:
                    return
                self._buf = self._buf[stop:].split(">", 1)[-1]
                continue
            self._in_call = True
            got = F._json_at(self._buf, body_at)
            if got is None and stop < 0 and not final:
                return
            args = (
                F._args_json(got[0]) if got else _json.dumps(self._buf[body_at : stop if stop >= 0 else None])
            )
            self._queue.append(F.Call(name, args))
            end = stop if stop >= 0 else (got[1] if got else len(self._buf))
            self._buf = self._buf[end:]
            nxt = self._buf.find(">")
            self._buf = self._buf[nxt + 1 :] if self._buf.startswith("<|") and nxt >= 0 else self._buf
            self._in_call = False
