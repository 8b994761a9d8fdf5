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
"""

from __future__ import annotations

import copy

from pie.errors import PieError


class ChatTemplateError(PieError):
    """A chat template that cannot render the conversation incrementally."""


class ChatState:
    def __init__(self, template_kwargs: dict | None = None) -> None:
        self.messages: list[dict] = []
        self.rendered: list[dict] = []  # the prefix of `messages` whose text is in `committed`
        self.committed = ""
        self.cued = False  # committed ends with the generation prompt
        self.template_kwargs = dict(template_kwargs or {})

    def copy(self) -> ChatState:
        return copy.deepcopy(self)

    def add(self, tok, role: str, content: str) -> str:
        """Add a message; return the text to append to the context ('' when deferred)."""
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

    def _render(self, tok, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        return tok.render_chat(messages, add_generation_prompt=add_generation_prompt, **self.template_kwargs)

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
            delta = new[len(self.committed) :]
        else:
            before = self._render(tok, self.rendered, self.cued)
            if not new.startswith(before):
                raise ChatTemplateError(
                    "the chat template rewrites earlier turns in a way that cannot be appended to the "
                    "context; build the prompt yourself with tokenizer.render_chat(...) and ctx.append(...)"
                )
            delta = new[len(before) :]
        self.committed += delta
        self.rendered = list(self.messages)
        return delta
