"""A context: a handle to one runtime sequence (its KV pages, tokens, positions) plus a buffer of
tokens appended but not yet run, and the chat state of the conversation.

    seq_len     tokens in the KV (run, or being run); the buffer is not counted (as in Pie's SDK)
    buffer()    tokens appended but not yet run; they go first in the next pass
    positions   chosen per token (RoPE); by default each token takes next_position, which then grows

Passes of one context run one at a time (a lock); different contexts, of one inferlet or many, run
concurrently and share batches. A failed or cancelled pass is rolled back: its tokens return to the
buffer. Lifecycle (names of Pie's `inferlet` SDK): fork() shares full pages copy-on-write and copies the
partial last page on the device; save(name) / snapshot() keep the KV under a name; Context.open(model,
name) forks a snapshot, Context.take(model, name) takes it over, Context.delete(model, name) drops it;
truncate(n) drops the last n tokens; release() (or close()) frees the pages. All of it lives in the
runtime (pie.runtime.kvcache), which may also preempt an idle context's pages under memory pressure and
restore them (swap or recompute) before its next pass.

Chat calls (system/user/assistant/cue) render the conversation with the model's chat template and
append only the new text; see pie.sdk.chat for templates that rewrite earlier turns.
"""

from __future__ import annotations

import asyncio

import numpy as np

from pie.drivers.protocol import ForwardResult
from pie.errors import PieError
from pie.runtime.kvcache import SnapshotError
from pie.runtime.scope import current_scope
from pie.runtime.sequence import Sequence
from pie.runtime.work import Work, sampler_rows
from pie.sdk.chat import ChatState
from pie.sdk.forward import ForwardPass
from pie.sdk.generation import Generation
from pie.sdk.model import Model
from pie.sdk.sampler import Sampler


class Context:
    def __init__(
        self, model: Model, template_kwargs: dict | None = None, *, _seq: Sequence | None = None
    ) -> None:
        """template_kwargs go to the chat template (e.g. {"enable_thinking": False} for Qwen3)."""
        self.model = model
        self._rt = model._rt
        self._scope = current_scope()
        rt = self._rt
        self._seq = rt.scheduler.add_sequence(_seq if _seq is not None else rt.kv.new_sequence())
        self.next_position = self._seq.positions[-1] + 1 if self._seq.positions else 0
        self._pending: list[int] = []
        self._pending_pos: list[int] = []
        self._chat = ChatState(template_kwargs)
        self._lock = asyncio.Lock()
        self.closed = False
        self._scope.track(self)

    # ---- inspection --------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        """Tokens in the KV cache (run or being run); buffered tokens are not counted."""
        return self._seq.num_tokens

    kv_len = seq_len

    @property
    def page_size(self) -> int:
        return self._rt.capabilities.page_size

    def buffer(self) -> list[int]:
        """Tokens appended but not yet run."""
        return list(self._pending)

    @property
    def pending(self) -> tuple[int, ...]:
        return tuple(self._pending)

    @property
    def page_ids(self) -> list[int]:
        return list(self._seq.pages)

    @property
    def tokens(self) -> list[int]:
        """Every token of the context: in the KV, then buffered."""
        return self._seq.tokens + self._pending

    # ---- adding tokens -----------------------------------------------------------------------
    def append(self, ids, positions=None) -> Context:
        """Queue tokens for the next pass (positions default to the next ones)."""
        self._check_open()
        ids = [int(i) for i in ids]
        vocab = self._rt.capabilities.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"token ids must be in 0..{vocab - 1}")
        if positions is None:
            positions = range(self.next_position, self.next_position + len(ids))
        positions = [int(p) for p in positions]
        if len(positions) != len(ids):
            raise ValueError(f"{len(positions)} positions for {len(ids)} tokens")
        self._pending += ids
        self._pending_pos += positions
        if positions:
            self.next_position = positions[-1] + 1
        return self

    def append_text(self, text: str) -> Context:
        return self.append(self.model.tokenizer.encode(text))

    def system(self, text: str) -> Context:
        return self._chat_text(self._chat.add(self.model.tokenizer, "system", text))

    def user(self, text: str) -> Context:
        return self._chat_text(self._chat.add(self.model.tokenizer, "user", text))

    def assistant(self, text: str) -> Context:
        return self._chat_text(self._chat.add(self.model.tokenizer, "assistant", text))

    def cue(self) -> Context:
        """Start the assistant's turn (the template's generation prompt); then generate()."""
        return self._chat_text(self._chat.cue(self.model.tokenizer))

    def _sync_chat(self) -> None:
        """Append the text of chat messages a template deferred (see chat.py)."""
        if self._chat.has_unrendered:
            self._chat_text(self._chat.pending(self.model.tokenizer))

    def _chat_text(self, delta: str) -> Context:
        self._check_open()
        return self.append(self.model.tokenizer.encode(delta)) if delta else self

    # ---- running passes ----------------------------------------------------------------------
    async def flush(self) -> None:
        """Run the pending tokens (filling their KV) without sampling anything."""
        self._check_open()
        self._sync_chat()
        if self._pending:
            await self._run([], None, [], sampler_rows(0), None, False)

    def forward(self) -> ForwardPass:
        self._check_open()
        return ForwardPass(self)

    def generate(
        self,
        sampler: Sampler | None = None,
        max_tokens: int = 256,
        stop: list[str | int] | str | int | None = None,
        ignore_eos: bool = False,
    ) -> Generation:
        """Sample up to max_tokens tokens, each fed back; see Generation for stop rules."""
        self._check_open()
        return Generation(self, sampler or Sampler.argmax(), max_tokens, stop, ignore_eos)

    async def _run(
        self, ids, positions, outputs, samplers, mask, return_logprobs: bool, rewind: bool = False
    ) -> ForwardResult:
        """One pass: buffered tokens, then `ids`. outputs index `ids` (negative: from the end).

        rewind: with nothing to run, re-run the last KV token to get its output row (generate()
        after flush()).
        """
        self._check_open()
        async with self._lock:
            self._sync_chat()
            if rewind and not self._pending and not ids:
                self._rewind_last()
            n_pend = len(self._pending)
            saved = (self._pending, self._pending_pos, self.next_position)
            self._pending, self._pending_pos = list(self._pending), list(self._pending_pos)
            self.append(ids, positions)
            n = len(self._pending)
            if n == 0:
                self._pending, self._pending_pos, self.next_position = saved
                raise PieError("nothing to run: the context has no buffered tokens and the pass no input")
            tokens = np.array(self._pending, dtype=np.int64)
            pos = np.array(self._pending_pos, dtype=np.int64)
            rows = np.array([i + n if i < 0 else i + n_pend for i in outputs], dtype=np.int32)
            kv0 = self._seq.num_tokens
            full_mask = None
            if mask is not None:  # buffered rows stay causal
                full_mask = np.concatenate([np.tri(n_pend, kv0 + n, k=kv0, dtype=bool), mask])
            try:
                fut = self._rt.scheduler.submit(
                    Work(self._seq, tokens, pos, rows, samplers, full_mask, return_logprobs)
                )
                self._pending, self._pending_pos = [], []
                return await fut
            except BaseException:
                self._pending, self._pending_pos, self.next_position = saved
                raise

    def _rewind_last(self) -> None:
        """Make the last KV token buffered again, to get its output row; the runtime copies its page
        first if it is shared (a fork's or a snapshot's), so nothing shared is written."""
        seq = self._seq
        if not seq.num_tokens:
            return
        t, p = seq.tokens[-1], seq.positions[-1]
        self._rt.kv.truncate(seq, 1, recompute=True)  # hybrid models recompute (their state cannot rewind)
        self._pending.insert(0, t)
        self._pending_pos.insert(0, p)

    # ---- lifecycle (Pie's names) ---------------------------------------------------------------
    def fork(self) -> Context:
        """A new context with the same tokens and buffer; full pages shared, the partial one copied."""
        self._check_idle("fork")
        child = Context(self.model, self._chat.template_kwargs, _seq=self._rt.kv.fork(self._seq))
        child._pending, child._pending_pos = list(self._pending), list(self._pending_pos)
        child.next_position = self.next_position
        child._chat = self._chat.copy()
        return child

    def save(self, name: str) -> None:
        """Keep this context's KV under `name` (buffered tokens are not saved: flush() first)."""
        self._check_idle("save")
        if not isinstance(name, str) or not name:
            raise ValueError("a snapshot name must be a non-empty string")
        self._rt.snapshots.save(self._seq, name)

    def snapshot(self) -> str:
        """An anonymous save; returns the runtime-chosen name."""
        self._check_idle("snapshot")
        return self._rt.snapshots.save(self._seq, None)

    @classmethod
    def open(cls, model: Model, name: str) -> Context | None:
        """A new context forked from the snapshot `name` (which stays); None if there is none."""
        seq = model._rt.snapshots.open(name)
        return None if seq is None else cls(model, _seq=seq)

    @classmethod
    def take(cls, model: Model, name: str) -> Context | None:
        """A new context that takes the snapshot `name` over (the snapshot is gone); None if none."""
        seq = model._rt.snapshots.take(name)
        return None if seq is None else cls(model, _seq=seq)

    @staticmethod
    def delete(model: Model, name: str) -> None:
        """Delete the snapshot `name` (SnapshotError if there is none)."""
        if not model._rt.snapshots.delete(name):
            raise SnapshotError(f"no snapshot named {name!r}")

    def truncate(self, n: int) -> None:
        """Drop the last n tokens of the KV (e.g. rejected speculative drafts); flush() the buffer first."""
        self._check_idle("truncate")
        if self._pending:
            raise PieError("truncate() works on the KV; the context has buffered tokens: flush() them first")
        self._rt.kv.truncate(self._seq, int(n))
        self.next_position = self._seq.positions[-1] + 1 if self._seq.positions else 0

    def release(self) -> None:
        """Free the context's pages now (idempotent; also done when the inferlet ends)."""
        self.close()

    # ---- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context's pages (idempotent). Safe while a pass is queued or running: the pass is
        dropped, and pages it uses stay pinned until its batch ends."""
        if self.closed:
            return
        self.closed = True
        self._rt.scheduler.release(self._seq)
        self._scope.untrack(self)

    async def __aenter__(self) -> Context:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def _check_idle(self, what: str) -> None:
        self._check_open()
        if self._lock.locked():
            raise PieError(f"cannot {what} a context while a pass runs on it; await the pass first")

    def _check_open(self) -> None:
        if self.closed:
            raise PieError("this context is closed; create a new Context(model) (or fork before closing)")

    def __repr__(self) -> str:
        return f"Context(seq_len={self.seq_len}, buffer={len(self._pending)}, pages={len(self._seq.pages)})"
