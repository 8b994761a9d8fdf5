"""A conversation rendered incrementally through the model's chat template.

The KV cache is append-only, so each chat call must turn into *new* tokens only. We keep
`committed`: the text the context already holds (everything rendered so far, plus generated
replies as decoded with their special tokens). After a message is added, the whole conversation
is rendered again and:

1. if the render starts with `committed`, the delta is the rest (the usual case: ChatML, Llama 3);
2. otherwise the template rewrote history (e.g. Qwen3 drops the reasoning of earlier assistant
   turns, or a generated reply decodes differently from its rendered form): we render the
   conversation before and after the new message fresh and take that difference, so the new
   turn is rendered as the template wants while the history stays as the model first saw it
   (exactly what a streaming chat shows the model; nothing already in the KV is rewritten);
3. if even that is not a pure append, the template cannot be applied incrementally: a clear error.

A template that rejects an intermediate conversation (e.g. "roles must alternate" after a lone
system message) is retried with the next message; the error surfaces only at cue() or flush().

Message content is text, never control tokens: a user who writes "<|im_end|>" must not end their
turn. Each returned delta is a `ChatText` (a str) that marks where message contents lie in it;
`Tokenizer.encode` parses special tokens only in the template's own text and encodes the content
spans with special tokens split into plain text. The spans come from rendering the conversation a
second time with each content replaced by a unique placeholder: the text between placeholders is
the template's, so the contents sit exactly in between (also when the template trims or rewrites
them). A template whose output depends on the content itself in ways that defeat this (it branches
on it) gets no spans, and the delta is parsed as a whole as before.
"""

from __future__ import annotations

import copy
import re

from pie.errors import PieError

# Placeholder for message i's content: private-use characters no template rewrites or trims.
_PH = "\ue000{}\ue001"
_PH_RE = re.compile("\ue000(\\d+)\ue001")


class ChatText(str):
    """Rendered chat text plus `plain`: (start, end) spans of message content, to be tokenized as
    plain text (special-token strings in them are not control tokens). A str everywhere else."""

    plain: tuple[tuple[int, int], ...] = ()

    @classmethod
    def make(cls, text: str, plain: list[tuple[int, int]]) -> ChatText:
        out = cls(text)
        out.plain = tuple(plain)
        return out


def content_spans(rendered: str, placeheld: str, contents: list[str]) -> list[tuple[int, int]] | None:
    """Spans of `rendered` where the placeholders of `placeheld` stand, or None when they cannot be
    aligned (the template's text around them differs between the two renders).

    Exact when the template inserts each content verbatim (the rendered text is the template's
    pieces with the contents in between); otherwise (a template that trims or rewrites contents)
    each content is taken to end where the next piece of template text is first found."""
    pieces = _PH_RE.split(placeheld)  # [template, index, template, index, ..., template]
    template = pieces[0::2]
    order = [int(i) for i in pieces[1::2]]
    if all(i < len(contents) for i in order):
        spans, pos, text = [], len(template[0]), template[0]
        for i, piece in zip(order, template[1:], strict=True):
            spans.append((pos, pos + len(contents[i])))
            pos += len(contents[i]) + len(piece)
            text += contents[i] + piece
        if text == rendered:
            return spans
    if not rendered.startswith(template[0]) or not rendered.endswith(template[-1]):
        return None
    spans = []
    pos = len(template[0])
    end_limit = len(rendered) - len(template[-1])
    for i, piece in enumerate(template[1:], start=1):
        # the content ends where the next template text starts; the last one at the fixed tail
        nxt = end_limit if i == len(template) - 1 else rendered.find(piece, pos)
        if nxt < 0 or nxt > end_limit:
            return None
        spans.append((pos, nxt))
        pos = nxt + len(piece)
    return spans if pos == len(rendered) else None


class ChatTemplateError(PieError):
    """A chat template that cannot render the conversation incrementally."""


class ChatState:
    def __init__(self, template_kwargs: dict | None = None) -> None:
        self.messages: list[dict] = []
        self.rendered: list[dict] = []  # the prefix of `messages` whose text is in `committed`
        self.committed = ""
        self.cued = False  # committed ends with the generation prompt
        self.replied = False  # the last message is the reply generate() recorded
        self.template_kwargs = dict(template_kwargs or {})

    def copy(self) -> ChatState:
        return copy.deepcopy(self)

    def add(self, tok, role: str, content: str) -> str:
        """Add a message; return the text to append to the context ('' when deferred)."""
        if role == "assistant" and self.replied:
            raise PieError(
                "assistant() right after generate(): the generated reply is already the assistant's turn in "
                "the context; call user() (or system()) next. To put a different reply in the history, fork "
                "the context before generating and call assistant() on the fork"
            )
        self.replied = False
        self.messages.append({"role": role, "content": content})
        return self._sync(tok, add_generation_prompt=False, must=False)

    def cue(self, tok) -> str:
        """The text that starts the assistant's reply (pending messages first)."""
        delta = self._sync(tok, add_generation_prompt=True, must=True)
        self.cued = True
        return delta

    @property
    def has_unrendered(self) -> bool:
        return len(self.rendered) != len(self.messages)

    def pending(self, tok) -> str:
        """Text of messages not rendered yet (called before a pass)."""
        if not self.has_unrendered:
            return ""
        return self._sync(tok, add_generation_prompt=False, must=True)

    def record_reply(self, text: str, raw: str) -> None:
        """The assistant's generated reply: `text` for the conversation, `raw` (decoded with special
        tokens) for what the context now holds."""
        self.messages.append({"role": "assistant", "content": text})
        self.rendered = list(self.messages)
        self.committed += raw
        self.cued = False
        self.replied = True  # the last message is a generated reply (assistant() now would duplicate it)

    def _render(self, tok, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        return tok.render_chat(messages, add_generation_prompt=add_generation_prompt, **self.template_kwargs)

    def _plain_spans(self, tok, add_generation_prompt: bool, rendered: str) -> list[tuple[int, int]]:
        """Spans of `rendered` (the render of self.messages) holding message contents ([] if unknown)."""
        held = [
            {**m, "content": _PH.format(i)} if isinstance(m.get("content"), str) else m
            for i, m in enumerate(self.messages)
        ]
        try:
            placeheld = self._render(tok, held, add_generation_prompt)
        except Exception:  # a template that validates contents: no spans, parse as before
            return []
        contents = [m["content"] if isinstance(m.get("content"), str) else "" for m in self.messages]
        return content_spans(rendered, placeheld, contents) or []

    def _sync(self, tok, add_generation_prompt: bool, must: bool) -> str:
        try:
            new = self._render(tok, self.messages, add_generation_prompt)
        except PieError:
            raise
        except Exception as e:  # jinja2 TemplateError, or a template's raise_exception(...)
            if must:
                raise ChatTemplateError(f"the chat template rejected the conversation: {e}") from e
            return ""  # retried with the next message
        if new.startswith(self.committed):
            start = len(self.committed)
        else:
            before = self._render(tok, self.rendered, self.cued)
            if not new.startswith(before):
                raise ChatTemplateError(
                    "the chat template rewrites earlier turns in a way that cannot be appended to the "
                    "context; build the prompt yourself with tokenizer.render_chat(...) and ctx.append(...)"
                )
            start = len(before)
        delta = new[start:]
        # content spans of the whole render, cut to the delta and shifted into its coordinates
        plain = [
            (max(a, start) - start, b - start)
            for a, b in self._plain_spans(tok, add_generation_prompt, new)
            if b > start and b > a
        ]
        self.committed += delta
        self.rendered = list(self.messages)
        return ChatText.make(delta, plain)
