"""Context: Pie's SDK context over a pie.sdk.Context (one runtime sequence: KV pages, tokens, positions).

The buffer (`buffer()`) holds tokens filled but not run yet: chat fillers, append(), and the last token a
generation step accepted. flush(), forward() and generate() run it. Chat fillers render the whole
conversation incrementally through the model's template (pie.sdk.chat), so only new text is added;
after a generation, the reply becomes the assistant turn of the conversation at the next filler.

Lifecycle names are Pie's: fork, save, snapshot, Context.open / take / delete, truncate, release; all of it
is pie's runtime (copy-on-write page sharing, named snapshots, prefix cache).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from contextlib import contextmanager

from pie.errors import PieError
from pie.runtime.work import sampler_rows
from pie.sdk.context import Context as _PieContext

from . import chat as _chat
from ._errors import unsupported
from .forward import Forward
from .generation import Generator
from .model import Model
from .sample import Sampler

# The conversation (pie.sdk.chat.ChatState) of each snapshot saved in this engine, so a context opened from
# it goes on rendering the chat incrementally. A snapshot restored from disk by another engine has none:
# its contexts render each later message alone (the module-level fillers of inferlet.chat).
_SNAPSHOT_CHATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ModelRuntime -> {name: ChatState}


def _snapshot_chats(model: Model) -> dict:
    return _SNAPSHOT_CHATS.setdefault(model._pie._rt, {})


class Context:
    """A conversation's KV state plus a buffer of tokens to run next: Context(model)."""

    __slots__ = ("_inner", "_model", "_buffer", "_reply")

    def __init__(
        self, model: Model, template_kwargs: dict | None = None, *, _inner: _PieContext | None = None
    ) -> None:
        """template_kwargs (pie's extension) go to the chat template, e.g. {"enable_thinking": False}."""
        if not isinstance(model, Model):
            raise TypeError(f"Context(model) needs an inferlet.Model (Model.load(...)), got {model!r}")
        self._model = model
        self._inner = _inner if _inner is not None else _PieContext(model._pie, template_kwargs)
        self._buffer: list[int] = []
        self._reply: list[int] | None = None  # tokens generated since the last cue (None: none yet)

    # ---- lifecycle --------------------------------------------------------------------------------
    @classmethod
    def open(cls, model: Model, name: str) -> Context | None:
        """A new context forked from the snapshot `name` (which stays); None if there is none."""
        inner = _PieContext.open(model._pie, name)
        if inner is not None and (chat := _snapshot_chats(model).get(name)) is not None:
            inner._chat = chat.copy()
        return None if inner is None else cls(model, _inner=inner)

    @classmethod
    def take(cls, model: Model, name: str) -> Context | None:
        """A new context that takes the snapshot `name` over (it is gone); None if there is none."""
        inner = _PieContext.take(model._pie, name)
        chat = _snapshot_chats(model).pop(name, None)
        if inner is not None and chat is not None:
            inner._chat = chat
        return None if inner is None else cls(model, _inner=inner)

    @staticmethod
    def delete(model: Model, name: str) -> None:
        """Delete the snapshot `name` (an error if there is none)."""
        _PieContext.delete(model._pie, name)
        _snapshot_chats(model).pop(name, None)

    def fork(self) -> Context:
        """A new context with the same KV (pages shared copy-on-write), buffer and conversation."""
        child = Context(self._model, _inner=self._inner.fork())
        child._buffer = list(self._buffer)
        child._reply = None if self._reply is None else list(self._reply)
        return child

    def save(self, name: str) -> None:
        """Keep the KV under `name` (the buffer is not saved: flush() first)."""
        self._inner.save(name)
        self._keep_chat(name)

    def snapshot(self) -> str:
        """An anonymous save; returns the runtime-chosen name."""
        name = self._inner.snapshot()
        self._keep_chat(name)
        return name

    def _keep_chat(self, name: str) -> None:
        self._record_reply()
        _snapshot_chats(self._model)[name] = self._inner._chat.copy()

    def release(self) -> None:
        """Free the context's pages now (idempotent; also done when the inferlet ends)."""
        self._inner.close()

    def truncate(self, n: int) -> None:
        """Drop the last n tokens of the KV (the buffer is untouched)."""
        if n:
            self._inner.truncate(int(n))

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    async def __aenter__(self) -> Context:
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"inferlet.Context(seq_len={self.seq_len}, buffer={len(self._buffer)})"

    # ---- accessors ----------------------------------------------------------------------------
    @property
    def model(self) -> Model:
        return self._model

    @property
    def page_size(self) -> int:
        return self._inner.page_size

    @property
    def seq_len(self) -> int:
        """Tokens in the KV (the buffer is not counted)."""
        return self._inner.seq_len

    def buffer(self) -> list[int]:
        """Tokens filled but not run yet."""
        return list(self._pending_buffer())

    # ---- fillers --------------------------------------------------------------------------------
    def system(self, message: str) -> Context:
        return self._chat_add("system", message)

    def user(self, message: str) -> Context:
        return self._chat_add("user", message)

    def assistant(self, message: str) -> Context:
        """An assistant message (history replay)."""
        return self._chat_add("assistant", message)

    def cue(self) -> Context:
        """The generation prompt: the assistant's turn starts (a second cue() adds nothing)."""
        self._record_reply()
        if self._stateless_chat():
            self._buffer += _chat.cue(self._model)
            return self
        tok = self._model._pie.tokenizer
        return self._append_text(self._inner._chat.cue(tok))

    def seal(self) -> Context:
        """End the current turn: append the chat stop token."""
        stop = _chat.seal(self._model)
        if not stop:
            raise PieError(f"model {self._model.name!r} has no chat stop token to seal a turn with")
        self._record_reply(extra=stop)
        self._buffer += stop
        return self

    def append(self, tokens: Iterable[int]) -> Context:
        """Raw token ids, run with the next pass."""
        self._check_open()
        ids = [int(t) for t in tokens]
        vocab = self._model.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"token ids must be in 0..{vocab - 1}")
        self._buffer += ids
        return self

    # ---- running ------------------------------------------------------------------------------
    async def flush(self) -> None:
        """Run the buffer through the model (filling its KV), sampling nothing."""
        self._check_open()
        self._drain_chat()
        if not self._buffer:
            return
        buffered = self._take_buffer()
        try:
            await self._inner._run(buffered, None, [], sampler_rows(0), None, False)
        except BaseException:
            self._buffer[:0] = buffered
            raise

    def forward(self) -> Forward:
        """A hand-built forward pass over this context."""
        self._check_open()
        return Forward(self)

    def generate(
        self,
        sampler: Sampler,
        *,
        max_tokens: int | None = None,
        stop: Iterable[int] | None = None,
        constrain=None,
        logit_mask: list[int] | None = None,
        speculator=None,
        system_speculation: bool | None = None,
        adapter=None,
        zo_seed: int | None = None,
        horizon: int | None = None,
        rebid_each_step: bool = True,
        auto_flush: bool = True,
    ) -> Generator:
        """A Generator. With auto_flush (default) it appends cue() first and `stop` defaults to the chat
        stop tokens (as Pie's SDK does); stop tokens end the generation and are not kept in the context."""
        self._check_open()
        if auto_flush:
            self.cue()
            if stop is None:
                stop = _chat.stop_tokens(self._model)
        return Generator(
            self,
            sampler,
            max_tokens=max_tokens,
            stop=stop,
            constrain=constrain,
            logit_mask=logit_mask,
            speculator=speculator,
            system_speculation=system_speculation,
            adapter=adapter,
            zo_seed=zo_seed,
            horizon=horizon,
            rebid_each_step=rebid_each_step,
        )

    # ---- scheduling hints -------------------------------------------------------------------------
    def set_bid(self, value: float) -> None:
        """This context's priority under memory pressure (Pie's bid; 0.0, the default, is no bid): when
        pages run out, idle contexts go first, then the lowest bid. Unlike Pie, where the Generator re-bids
        each step, the value stays until changed. See inferlet.scheduling."""
        value = float(value)
        if value != value or value < 0.0:  # NaN or negative
            raise ValueError(f"a bid is a number >= 0 (0.0: no bid), got {value}")
        self._inner._seq.priority = value

    @contextmanager
    def idle(self):
        """While the block runs (e.g. awaiting a tool), this context is the first to give its pages up under
        memory pressure; its bid comes back on exit:

            with ctx.idle():
                result = await call_tool()
        """
        seq = self._inner._seq
        saved = seq.priority
        seq.priority = float("-inf")  # below every bid: the first victim (pie.runtime.scheduler._victim)
        try:
            yield
        finally:
            seq.priority = saved

    def suspend(self) -> int:
        """Give the context's device pages back now (to host swap slots, or dropped to be recomputed); they
        are restored before its next pass. Returns the pages freed (Pie's Rust SDK has suspend)."""
        self._check_open()
        return self._inner._rt.scheduler.suspend(self._inner._seq)

    # ---- media ------------------------------------------------------------------------------------
    async def append_image(self, image) -> None:
        unsupported("images (Context.append_image)")

    async def append_images(self, images) -> None:
        unsupported("images (Context.append_images)")

    async def append_audio(self, audio) -> None:
        unsupported("audio (Context.append_audio)")

    async def append_audios(self, audios) -> None:
        unsupported("audio (Context.append_audios)")

    async def append_video(self, video) -> None:
        unsupported("video (Context.append_video)")

    # ---- internals --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        self._inner._check_open()

    def _chat_add(self, role: str, message: str) -> Context:
        if not isinstance(message, str):
            raise TypeError(f"{role}() takes the message text (str), got {type(message).__name__}")
        self._record_reply()
        if self._stateless_chat():
            self._buffer += getattr(_chat, role)(self._model, message)
            return self
        tok = self._model._pie.tokenizer
        return self._append_text(self._inner._chat.add(tok, role, message))

    def _stateless_chat(self) -> bool:
        """True when the context holds tokens but no conversation (raw appends, a snapshot from disk):
        then each message is rendered alone, as Pie's fillers do."""
        return not self._inner._chat.messages and bool(self.seq_len or self._buffer)

    def _append_text(self, text: str) -> Context:
        self._check_open()
        if text:
            self._buffer += self._model._pie.tokenizer.encode(text)
        return self

    def _drain_chat(self) -> None:
        """Text of chat messages the template deferred (it rejected an intermediate conversation)."""
        chat = self._inner._chat
        if chat.has_unrendered:
            self._append_text(chat.pending(self._model._pie.tokenizer))

    def _record_reply(self, extra: list[int] = ()) -> None:
        """Make the tokens generated since the cue the assistant's turn of the conversation."""
        chat = self._inner._chat
        if self._reply is None or not chat.cued:
            self._reply = None
            return
        tok = self._model._pie.tokenizer
        reply, self._reply = self._reply, None
        chat.record_reply(tok.decode(reply, skip_special_tokens=True), tok.decode([*reply, *extra]))

    def _note_generated(self, tokens: list[int]) -> None:
        self._reply = (self._reply or []) + list(tokens)

    def _pending_buffer(self) -> list[int]:
        return self._buffer

    def _take_buffer(self) -> list[int]:
        out, self._buffer = self._buffer, []
        return out

    def _unrun_last(self) -> None:
        """Move the last KV token back to the front of the buffer (to get its output row again)."""
        inner = self._inner
        if inner.seq_len == 0:
            raise PieError("nothing to generate from: fill the context (user(...), append(...)) first")
        last = inner._seq.tokens[-1]
        inner.truncate(1)
        self._buffer.insert(0, last)
