"""A context: one sequence's KV cache (a list of pages) plus tokens waiting to be run.

State, with invariants:
    pages       int32 ids; ceil(kv_len / page_size) <= len(pages) (extra pages are kept after a
                failed pass and reused by the next one)
    kv_len      slots filled, or being filled by the pass in flight
    pending     tokens (and their positions) appended but not yet run; they go first in the next pass
    positions   chosen per token (RoPE); by default each token takes next_position, which then grows

Passes of one context run one at a time (a lock), so a failed or cancelled pass can be rolled
back: kv_len, pending and next_position return to what they were. Different contexts, of one
inferlet or many, run concurrently and share batches.

Pages: each context holds one reference on each of its pages; a fork shares the parent's full
pages (never written again: a context only writes slots >= kv_len) and recomputes the partial
last page; close() drops the references, safely even mid-pass (see pie.runtime.scheduler).

Chat calls (system/user/assistant/cue) render the conversation with the model's chat template and
append only the new text; see pie.sdk.chat for templates that rewrite earlier turns.
"""

from __future__ import annotations

import asyncio

import numpy as np

from pie.drivers.protocol import ForwardResult
from pie.errors import PieError
from pie.runtime.passes import PassRequest, sampler_rows
from pie.runtime.scope import current_scope
from pie.sdk.chat import ChatState
from pie.sdk.forward import ForwardPass
from pie.sdk.generation import Generation
from pie.sdk.model import Model
from pie.sdk.sampler import Sampler


class Context:
    def __init__(self, model: Model, template_kwargs: dict | None = None) -> None:
        """template_kwargs go to the chat template (e.g. {"enable_thinking": False} for Qwen3)."""
        self.model = model
        self._rt = model._rt
        self._scope = current_scope()
        self._pages = np.zeros(0, dtype=np.int32)
        self.kv_len = 0
        self.next_position = 0
        self._pending: list[int] = []
        self._pending_pos: list[int] = []
        self._hist_tok: list[int] = []  # tokens in the KV (for fork and rewinds)
        self._hist_pos: list[int] = []
        self._chat = ChatState(template_kwargs)
        self._lock = asyncio.Lock()
        self.closed = False
        self._scope.track(self)

    # ---- inspection --------------------------------------------------------------------------
    @property
    def pending(self) -> tuple[int, ...]:
        return tuple(self._pending)

    @property
    def page_ids(self) -> list[int]:
        return self._pages.tolist()

    @property
    def tokens(self) -> list[int]:
        """Every token of the context: in the KV, then pending."""
        return self._hist_tok + self._pending

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
        """One pass: pending tokens, then `ids`. outputs index `ids` (negative: from the end).

        rewind: with nothing to run, re-run the last KV token to get its output row (generate()
        after flush()).
        """
        self._check_open()
        async with self._lock:
            self._sync_chat()
            if rewind and not self._pending and not ids and self.kv_len:
                self._rewind_last()
            n_pend = len(self._pending)
            saved = (self._pending, self._pending_pos, self.next_position)
            self._pending, self._pending_pos = list(self._pending), list(self._pending_pos)
            self.append(ids, positions)
            n = len(self._pending)
            if n == 0:
                self._pending, self._pending_pos, self.next_position = saved
                raise PieError("nothing to run: the context has no pending tokens and the pass no input")
            run_tok, run_pos = self._pending, self._pending_pos
            tokens, pos = np.array(run_tok, dtype=np.int64), np.array(run_pos, dtype=np.int64)
            rows = np.array([i + n if i < 0 else i + n_pend for i in outputs], dtype=np.int32)
            kv0, kv_end = self.kv_len, self.kv_len + n
            full_mask = None
            if mask is not None:  # pending rows stay causal
                full_mask = np.concatenate([np.tri(n_pend, kv_end, k=kv0, dtype=bool), mask])
            try:
                fut = self._rt.scheduler.submit(
                    PassRequest(
                        tokens, pos, self._reserve(kv_end), kv_end, rows, samplers, full_mask, return_logprobs
                    )
                )
                self.kv_len = kv_end
                self._pending, self._pending_pos = [], []
                result = await fut
            except BaseException:
                self.kv_len = kv0
                self._pending, self._pending_pos, self.next_position = saved
                raise
            self._hist_tok += run_tok
            self._hist_pos += run_pos
            return result

    def _reserve(self, kv_end: int) -> np.ndarray:
        """Pages covering kv_end slots, allocating only the missing ones."""
        ps = self._rt.capabilities.page_size
        need = -(-kv_end // ps)
        if need > len(self._pages):
            self._pages = np.concatenate([self._pages, self._rt.allocator.alloc(need - len(self._pages))])
        return self._pages[:need].copy()

    def _rewind_last(self) -> None:
        """Make the last KV token pending again; its slot is rewritten with the same values.

        If that slot's page is shared with a fork, the page is not written: we drop our reference
        and recompute the page's tokens into a fresh one (copy-on-write by recomputation).
        """
        ps, alloc = self._rt.capabilities.page_size, self._rt.allocator
        start = self.kv_len - 1
        page = start // ps
        if alloc.refcount(int(self._pages[page])) > 1:
            start = page * ps
            alloc.decref(self._pages[page:])
            self._pages = self._pages[:page]
        self._pending = self._hist_tok[start:] + self._pending
        self._pending_pos = self._hist_pos[start:] + self._pending_pos
        self._hist_tok, self._hist_pos = self._hist_tok[:start], self._hist_pos[:start]
        self.kv_len = start

    # ---- lifetime ----------------------------------------------------------------------------
    def fork(self) -> Context:
        """A new context with the same tokens; full pages are shared, the partial one recomputed.

        The recomputed tail (and any pending tokens) runs causally with the next pass, so a tail
        first run under a custom mask is recomputed without it.
        """
        self._check_open()
        if self._lock.locked():
            raise PieError("cannot fork a context while a pass runs on it; await the pass first")
        child = Context(self.model, self._chat.template_kwargs)
        ps = self._rt.capabilities.page_size
        full = self.kv_len // ps
        child._pages = self._pages[:full].copy()
        self._rt.allocator.incref(child._pages)
        child.kv_len = full * ps
        child._hist_tok, child._hist_pos = self._hist_tok[: full * ps], self._hist_pos[: full * ps]
        child._pending = self._hist_tok[full * ps :] + self._pending
        child._pending_pos = self._hist_pos[full * ps :] + self._pending_pos
        child.next_position = self.next_position
        child._chat = self._chat.copy()
        return child

    def close(self) -> None:
        """Free the context's pages (idempotent). Also done when the inferlet ends."""
        if self.closed:
            return
        self.closed = True
        self._rt.allocator.decref(self._pages)
        self._pages = np.zeros(0, dtype=np.int32)
        self._scope.untrack(self)

    async def __aenter__(self) -> Context:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise PieError("this context is closed; create a new Context(model) (or fork before closing)")

    def __repr__(self) -> str:
        return f"Context(kv_len={self.kv_len}, pending={len(self._pending)}, pages={len(self._pages)})"
