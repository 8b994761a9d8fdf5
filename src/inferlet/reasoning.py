"""Pie's reasoning decoder: the model's thinking spans, in its native format (inferlet._formats).

    think = reasoning.Decoder(model)
    match think.feed(out.tokens):
        case reasoning.Event.Start(): ...
        case reasoning.Event.Delta(text=t): ...      # reasoning text, streamed
        case reasoning.Event.End(text=full): ...     # the whole span
        case _: ...                                  # Idle

Spans: Qwen 3 / 3.5 and R1-style `<think>...</think>` (a chat template whose generation prompt already
opens `<think>`, as Qwen 3.5's does, starts inside the span), GPT-OSS harmony's analysis channel
(`<|channel|>analysis<|message|>...<|end|>`), Magistral's `[THINK]...[/THINK]`, Gemma 4's
`<|channel>...<channel|>`. A model without a thinking format only ever gives Idle. Feed the same batches
to chat.Decoder for the visible text; the two are independent, as in Pie. One event per feed: when a batch
crosses a boundary and has text too, the text comes with the next feed (and always in End).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import chat as _chat
from ._textstream import TextStream, held_back, model_format
from .model import Model


class Event:
    """Reasoning-decoder events: Idle, Start, Delta(text), End(text)."""

    __slots__ = ()

    @dataclass(frozen=True, slots=True)
    class Idle:
        """No reasoning boundary crossed and no reasoning text in this batch."""

    @dataclass(frozen=True, slots=True)
    class Start:
        """The model entered a reasoning block."""

    @dataclass(frozen=True, slots=True)
    class Delta:
        """Streamed reasoning text (never empty)."""

        text: str

    @dataclass(frozen=True, slots=True)
    class End:
        """The block closed: the full reasoning text from Start to End."""

        text: str


AnyEvent = Event.Idle | Event.Start | Event.Delta | Event.End


class Decoder:
    """Stateful reasoning decoder: feed token batches in order; one event per call."""

    __slots__ = ("_model", "_markers", "_opens_inside", "_stream", "_buf", "_inside", "_span", "_unsent")

    def __init__(self, model: Model) -> None:
        self._model = model
        self._markers = model_format(model).think
        self._opens_inside = self._markers is not None and _cue_opens(model, self._markers)
        self._stream = TextStream(model)
        self.reset()

    def feed(self, tokens: list[int]) -> AnyEvent:
        if self._markers is None:
            return Event.Idle()
        self._buf += self._stream.push(tokens)
        opener, closer = self._markers
        events: list[AnyEvent] = []
        while True:
            if not self._inside:
                i = self._buf.find(opener)
                if i < 0:
                    keep = held_back(self._buf, (opener,))
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                self._buf, self._inside, self._span = self._buf[i + len(opener) :], True, ""
                events.append(Event.Start())
                continue
            j = self._buf.find(closer)
            if j < 0:
                keep = held_back(self._buf, (closer,))
                text = self._buf[: len(self._buf) - keep]
                self._buf = self._buf[len(text) :]
                self._span += text
                self._unsent += text
                break
            self._span += self._buf[:j]
            self._buf, self._inside, self._unsent = self._buf[j + len(closer) :], False, ""
            events.append(Event.End(self._span))
        for e in events:  # a closed span matters most, then an opened one
            if isinstance(e, Event.End):
                return e
        if events:
            return events[-1]
        if self._unsent:
            text, self._unsent = self._unsent, ""
            return Event.Delta(text)
        return Event.Idle()

    def reset(self) -> None:
        """Back to the start of a reply (inside the span if the generation prompt opens one)."""
        self._stream.reset()
        self._buf, self._span, self._unsent = "", "", ""
        self._inside = self._opens_inside


def _cue_opens(model: Model, markers: tuple[str, str]) -> bool:
    """The chat template's generation prompt leaves a thinking span open (e.g. Qwen 3.5's `<think>\\n`)."""
    try:
        cue = model._pie.tokenizer.decode(_chat.cue(model))
    except Exception:  # no chat template: nothing is opened for the model
        return False
    return cue.rfind(markers[0]) > cue.rfind(markers[1])
