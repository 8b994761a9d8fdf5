"""A CPU driver for scheduler and SDK tests: records every batch and computes outputs from a fake KV.

The fake keeps, per KV slot, the token id and position written there, so its output for a row
depends on everything that row may attend to. The sampled token of a row is

    fake_next(tokens, positions) = sum_j ((tok_j + 1) * 31 + pos_j) * (j + 1)  mod P  mod vocab

over the visible slots j (causal: 0..slot; or the mask row). A scheduler that gets pages, chunk
boundaries or last_page_len wrong changes the visible KV and therefore the tokens.

Page ops move those per-slot records: a page's raw bytes are its kv_tok row then its kv_pos row
(int64, so page_nbytes = 2 * page_size * 8), and a fake host swap pool (swap_tok / swap_pos) holds
num_swap_slots pages. Forward passes and page ops take effect one at a time in submission order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from pie.drivers.base import Driver
from pie.drivers.protocol import (
    PROTOCOL_VERSION,
    Capabilities,
    ForwardBatch,
    ForwardResult,
    PageOps,
    PageOpsResult,
)
from pie.errors import DriverError

_P = 1_000_003


def fake_next(tokens, positions, vocab_size: int) -> int:
    """The token the fake driver samples after a causal sequence (for reference loops in tests)."""
    t = np.asarray(tokens, dtype=np.int64)
    p = np.asarray(positions, dtype=np.int64)
    j = np.arange(t.shape[0], dtype=np.int64)
    return int((((t + 1) * 31 + p) * (j + 1)).sum() % _P % vocab_size)


class FakeDriver(Driver):
    def __init__(
        self,
        num_pages: int = 64,
        page_size: int = 4,
        vocab_size: int = 1000,
        max_batch_tokens: int = 64,
        max_batch_size: int = 8,
        max_dist_size: int = 8,
        num_swap_slots: int = 32,
        max_position: int = 1 << 20,
    ) -> None:
        self.caps = Capabilities(
            protocol_version=PROTOCOL_VERSION,
            architecture="fake",
            num_pages=num_pages,
            page_size=page_size,
            vocab_size=vocab_size,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size,
            max_dist_size=max_dist_size,
            device="cpu",
            dtype="float32",
            extra={"max_position_embeddings": max_position},
            num_swap_slots=num_swap_slots,
            page_nbytes=2 * page_size * 8,
            kv_fingerprint=f"fake-{page_size}",
        )
        self.kv_tok = np.full((num_pages, page_size), -1, dtype=np.int64)
        self.kv_pos = np.full((num_pages, page_size), -1, dtype=np.int64)
        self.swap_tok = np.full((num_swap_slots, page_size), -1, dtype=np.int64)
        self.swap_pos = np.full((num_swap_slots, page_size), -1, dtype=np.int64)
        self.batches: list[ForwardBatch] = []
        self.page_op_log: list[PageOps] = []
        self.fail_page_ops_if: Callable[[PageOps], Exception | None] | None = None
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}  # see _order
        self.last_tokens = np.zeros(0, dtype=np.int64)  # sampled by the last batch (prev_token_rows)
        self.gate: asyncio.Event | None = None  # when set to an unset Event, forward waits on it
        self.fail_if: Callable[[ForwardBatch], Exception | None] | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.started = self.stopped = False

    def _order(self) -> asyncio.Lock:
        """FIFO lock (one per event loop, so a driver may serve several asyncio.run calls): forward passes
        and page ops take effect one at a time, in submission order."""
        return self._locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())

    async def start(self) -> Capabilities:
        self.started = True
        self.capabilities = self.caps
        return self.caps

    async def shutdown(self) -> None:
        self.stopped = True

    async def forward(self, batch: ForwardBatch) -> ForwardResult:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            batch.validate(self.caps.page_size, self.caps.num_pages, self.caps.vocab_size)
            self.batches.append(batch)
            async with self._order():
                if self.gate is not None:
                    await self.gate.wait()
                await asyncio.sleep(0)
                err = self.fail_if(batch) if self.fail_if else None
                if err is not None:
                    self.last_tokens = np.zeros(0, dtype=np.int64)  # as the executor: nothing to feed
                    raise err
                return self._run(batch)
        finally:
            self.in_flight -= 1

    async def page_ops(self, ops: PageOps) -> PageOpsResult:
        c = self.caps
        ops.validate(c.num_pages, c.num_swap_slots, c.page_nbytes)
        self.page_op_log.append(ops)
        async with self._order():
            await asyncio.sleep(0)
            err = self.fail_page_ops_if(ops) if self.fail_page_ops_if else None
            if err is not None:
                raise err
            return self._apply(ops)

    def _apply(self, ops: PageOps) -> PageOpsResult:
        # numpy evaluates each right-hand side before assigning: sources are read before destinations change
        pages, slots = ops.swap_out[:, 0], ops.swap_out[:, 1]
        self.swap_tok[slots], self.swap_pos[slots] = self.kv_tok[pages], self.kv_pos[pages]
        src, dst = ops.copy[:, 0], ops.copy[:, 1]
        self.kv_tok[dst], self.kv_pos[dst] = self.kv_tok[src], self.kv_pos[src]
        slots, pages = ops.swap_in[:, 0], ops.swap_in[:, 1]
        self.kv_tok[pages], self.kv_pos[pages] = self.swap_tok[slots], self.swap_pos[slots]
        if len(ops.write):
            rec = (
                np.ascontiguousarray(ops.write_data)
                .view(np.int64)
                .reshape(len(ops.write), 2, self.caps.page_size)
            )
            self.kv_tok[ops.write], self.kv_pos[ops.write] = rec[:, 0], rec[:, 1]
        if not len(ops.read):
            return PageOpsResult(data=None)
        rec = np.stack([self.kv_tok[ops.read], self.kv_pos[ops.read]], axis=1)  # [R, 2, page_size] int64
        return PageOpsResult(data=rec.view(np.uint8).reshape(len(ops.read), self.caps.page_nbytes))

    def _run(self, b: ForwardBatch) -> ForwardResult:
        ps, V = self.caps.page_size, self.caps.vocab_size
        if b.prev_token_rows is not None:  # generation steps queued before the previous batch returned
            rows = b.prev_token_rows
            fed = rows >= 0
            prev = self.last_tokens
            ok = fed & (rows < prev.shape[0])
            b.token_ids = b.token_ids.copy()
            b.token_ids[fed] = 0  # past the previous result (or after a failed batch): token 0
            b.token_ids[ok] = prev[rows[ok]]
        kv_lens, qo_lens = b.kv_lens(ps), b.qo_lens()
        req = np.repeat(np.arange(b.num_requests), qo_lens)
        slot = (kv_lens - qo_lens)[req] + np.arange(b.num_tokens) - b.qo_indptr[req]
        page = b.kv_page_indices[b.kv_page_indptr[req] + slot // ps]
        self.kv_tok[page, slot % ps] = b.token_ids
        self.kv_pos[page, slot % ps] = b.positions
        tokens = []
        for row in b.output_indices.tolist():
            r = int(req[row])
            n = int(kv_lens[r])
            pages = b.kv_page_indices[b.kv_page_indptr[r] : b.kv_page_indptr[r + 1]]
            toks = self.kv_tok[pages].reshape(-1)[:n]
            poss = self.kv_pos[pages].reshape(-1)[:n]
            if b.mask is None:
                visible = np.arange(n) <= slot[row]
            else:
                i = row - int(b.qo_indptr[r])
                block = b.mask[b.mask_indptr[r] : b.mask_indptr[r + 1]].reshape(int(qo_lens[r]), n)
                visible = block[i]
            j = np.nonzero(visible)[0]
            tokens.append(int((((toks[j] + 1) * 31 + poss[j]) * (j + 1)).sum() % _P % V))
        tok = np.array(tokens, dtype=np.int64)
        self.last_tokens = tok
        num_out = b.num_outputs
        kmax = int(b.dist_k.max()) if num_out else 0
        dist_ids = dist_probs = None
        if kmax:
            dist_ids = (tok[:, None] + np.arange(kmax)[None, :]) % V
            dist_ids = np.where(np.arange(kmax)[None, :] < b.dist_k[:, None], dist_ids, -1)
            dist_probs = np.where(dist_ids >= 0, 1.0 / (np.arange(kmax) + 2), 0.0).astype(np.float32)
        logits = None
        if b.return_logits.any():
            logits = np.zeros((int(b.return_logits.sum()), V), dtype=np.float32)
            logits[np.arange(logits.shape[0]), tok[b.return_logits]] = 1.0
        return ForwardResult(
            tokens=tok,
            logprobs=-(tok.astype(np.float32) / V) if b.return_logprobs else None,
            entropies=np.full(num_out, 0.5, dtype=np.float32) if b.return_logprobs else None,
            logits=logits,
            dist_ids=dist_ids,
            dist_probs=dist_probs,
        )


class DeadDriver(FakeDriver):
    """A driver whose every forward fails, as a crashed one does."""

    async def forward(self, batch: ForwardBatch) -> ForwardResult:
        raise DriverError("driver process exited with code 1")
