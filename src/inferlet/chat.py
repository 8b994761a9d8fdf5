"""Chat-template fillers, stop tokens and the chat Decoder of Pie's SDK, on the model's own template.

The module-level fillers render one message alone (for prompts built by hand); Context.system/user/...
render the whole conversation incrementally instead (pie.sdk.chat), which is exact for templates that
depend on earlier turns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pie.sdk.chat import ChatText, content_spans

from .model import Model

# End-of-turn tokens of the common chat formats; a model's stop tokens are its eos ids plus those of
# these that its chat template uses.
_TURN_ENDS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|return|>",
    "<|call|>",
    "</s>",
)
_PROBE = "\ue000pie\ue001"  # a user message no template rewrites
_MARKUP = re.compile(r"<[^<>\s]+>|\[/?[A-Z_]+\]")  # <tool_call>, </think>, <|im_end|>, [TOOL_CALLS]


def _render(model: Model, messages: list[dict], gen: bool) -> str:
    return model._pie.tokenizer.render_chat(messages, add_generation_prompt=gen)


def _encode_delta(
    model: Model, before: list[dict], after: list[dict], gen: bool, content: str | None
) -> list[int]:
    """Tokens of render(after) minus render(before) (message content tokenized as plain text)."""
    a = _render(model, before, False) if before else ""
    b = _render(model, after, gen)
    if not b.startswith(a):
        raise ValueError("the chat template rewrites earlier turns; use Context.system/user/... instead")
    delta = b[len(a) :]
    if content:
        held = [*after[:-1], {**after[-1], "content": "\ue0000\ue001"}]  # pie.sdk.chat's placeholder 0
        spans = content_spans(delta, _render(model, held, gen)[len(a) :], [content]) or []
        delta = ChatText.make(delta, spans)
    return model._pie.tokenizer.encode(delta)


def system(model: Model, message: str) -> list[int]:
    """Tokens of a system message rendered alone."""
    return _encode_delta(model, [], [{"role": "system", "content": message}], False, message)


def user(model: Model, message: str) -> list[int]:
    """Tokens of a user message rendered alone."""
    return _encode_delta(model, [], [{"role": "user", "content": message}], False, message)


def assistant(model: Model, message: str) -> list[int]:
    """Tokens of an assistant message (history replay), as the template renders it after a user turn."""
    u = [{"role": "user", "content": _PROBE}]
    return _encode_delta(model, u, [*u, {"role": "assistant", "content": message}], False, message)


def cue(model: Model) -> list[int]:
    """Tokens of the generation prompt (the start of the assistant's turn)."""
    u = [{"role": "user", "content": _PROBE}]
    return _encode_delta(model, u, u, True, None)


def seal(model: Model) -> list[int]:
    """The token that ends a turn (the first chat stop token)."""
    return stop_tokens(model)[:1]


def stop_tokens(model: Model) -> list[int]:
    """The ids that end the assistant's turn: the model's eos ids and the template's end-of-turn tokens."""
    tok = model._pie.tokenizer
    out = list(tok.eos_token_ids)
    template = str(getattr(tok.hf, "chat_template", "") or "")
    harmony = tok.token_id("<|channel|>") is not None  # GPT-OSS: <|end|> ends a message, not the turn
    for s in _TURN_ENDS:
        if harmony and s == "<|end|>":
            continue
        i = tok.token_id(s)
        if i is not None and s in template and i not in out:
            out.append(i)
    return out


class Event:
    """Chat decoder events: Idle, Delta(text), Done(text), Interrupt(token)."""

    __slots__ = ()

    @dataclass(frozen=True, slots=True)
    class Idle:
        """Nothing visible happened in this batch."""

    @dataclass(frozen=True, slots=True)
    class Delta:
        """New visible text (never empty)."""

        text: str

    @dataclass(frozen=True, slots=True)
    class Done:
        """End of turn: the full text since the last reset()."""

        text: str

    @dataclass(frozen=True, slots=True)
    class Interrupt:
        """A control token that is not a stop token (e.g. a tool-call marker)."""

        token: int


AnyEvent = Event.Idle | Event.Delta | Event.Done | Event.Interrupt


class Decoder:
    """Feed generated token batches in order; one event per feed().

    Visible text only: a thinking span (Qwen's `<think>`, Magistral's `[THINK]`, Gemma 4's `<|channel>`; the
    span the generation prompt opens included) and GPT-OSS harmony's non-final channels (analysis, tool
    calls) are not text of the reply; reasoning.Decoder and tools.Decoder read them. Control tokens of those
    formats are not Interrupts; other control tokens are.
    """

    __slots__ = ("_model", "_stop", "_special", "_detok", "_text", "_think", "_opens", "_inside", "_harmony",
                 "_hmode", "_hhead", "_hvisible")  # fmt: skip

    def __init__(self, model: Model) -> None:
        from ._textstream import model_format  # here: _textstream imports this module's neighbours
        from .reasoning import _cue_opens

        self._model = model
        self._stop = set(stop_tokens(model))
        tok = model._pie.tokenizer
        hf = tok.hf
        # control tokens: special ones, and added markup tokens that tokenizers leave non-special (Qwen's
        # <tool_call>, <think>): text decoding keeps those, but they are not words of the reply
        self._special = {
            int(i) for i, t in hf.added_tokens_decoder.items() if t.special or _MARKUP.fullmatch(t.content)
        } | set(hf.all_special_ids)
        fmt = model_format(model)
        self._harmony: dict[str, int] = {}
        self._think: tuple[int, int] | None = None
        if fmt.name == "harmony":
            names = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>")
            self._harmony = {n: i for n in names if (i := tok.token_id(n)) is not None}
        elif fmt.think is not None:
            ids = (tok.token_id(fmt.think[0]), tok.token_id(fmt.think[1]))
            self._think = ids if None not in ids else None  # type: ignore[assignment]
        self._opens = self._think is not None and _cue_opens(model, fmt.think)  # type: ignore[arg-type]
        self.reset()

    def feed(self, tokens: list[int]) -> AnyEvent:
        visible: list[int] = []
        interrupt: int | None = None
        for t in map(int, tokens):
            if t in self._stop:  # end of turn: the text before it is the last of the reply
                self._text += self._detok.push(visible) + self._detok.flush()
                return Event.Done(self._text)
            if not self._shown(t):
                continue
            if t in self._special:
                interrupt = t if interrupt is None else interrupt
            else:
                visible.append(t)
        new = self._detok.push(visible)
        self._text += new
        if interrupt is not None:  # its batch's text is kept in the running text (Done has it)
            return Event.Interrupt(interrupt)
        return Event.Delta(new) if new else Event.Idle()

    def _shown(self, t: int) -> bool:
        """False for the tokens of a thinking span or a non-final harmony message, and their markers."""
        if self._think is not None:
            if t == self._think[0] or t == self._think[1]:
                self._inside = t == self._think[0]
                return False
            return not self._inside
        if not self._harmony:
            return True
        h = self._harmony
        if t in (h.get("<|start|>"), h.get("<|channel|>"), h.get("<|end|>")):
            self._hmode, self._hvisible = "header", False
            if t != h.get("<|channel|>"):
                self._hhead = []
            return False
        if t == h.get("<|message|>"):
            head = self._model._pie.tokenizer.decode(self._hhead)
            self._hmode, self._hvisible = "body", "final" in head and "to=" not in head
            self._hhead = []
            return False
        if self._hmode == "header":
            self._hhead.append(t)
            return False
        return self._hvisible

    def finish(self) -> str:
        """The text held back at the end (an incomplete character decodes as U+FFFD); pie's extension."""
        rest = self._detok.flush()
        self._text += rest
        return rest

    def reset(self) -> None:
        self._detok = self._model._pie.tokenizer.detokenizer()
        self._text = ""
        self._inside = self._opens
        self._hmode, self._hhead, self._hvisible = "header", [], False
