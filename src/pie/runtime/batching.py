"""Choosing the next batch from the queue (FIFO, within caps, chunked prefill) and building it.

A chunk is tokens [start, start + count) of one pass. Its KV length is the pass's truncated
to the chunk's end: kv_start + start + count, so its page list, last-page fill and mask
(rows start..start+count, columns 0..kv_len) are recomputed here. Its outputs are the pass's
(sorted) output rows that fall inside the chunk.

Arrays are built per request with numpy slicing and one concatenate per field (no per-token loop).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from pie.drivers.protocol import ForwardBatch, ForwardResult
from pie.runtime.passes import SAMPLER_DTYPE, PassRequest

_RECORD = np.dtype((np.void, SAMPLER_DTYPE.itemsize))


@dataclass(eq=False)
class Chunk:
    p: PassRequest
    start: int  # first token of the pass in this chunk
    count: int  # tokens in this chunk
    out_lo: int  # the chunk's outputs are p.sorted_outputs[out_lo:out_hi]
    out_hi: int

    @property
    def is_last(self) -> bool:
        return self.start + self.count == self.p.num_tokens


def select(queue: deque[PassRequest], max_tokens: int, max_requests: int) -> list[Chunk]:
    """The next batch: a FIFO prefix of the queue (dropped passes skipped), within both caps.

    The first pass that does not fit in the token budget is split: its first chunk fills the
    budget, and it stays at the head of the queue for the next step (a pass that cannot be split,
    see PassRequest.chunkable, waits for the next step instead). Pure: the queue is unchanged.
    """
    chunks: list[Chunk] = []
    budget = max_tokens
    for p in queue:
        if p.dropped:
            continue
        if len(chunks) == max_requests or budget == 0:
            break
        count = min(p.num_tokens - p.scheduled, budget)
        if count < p.num_tokens - p.scheduled and not p.chunkable:
            break
        if p.scheduled == 0 and count == p.num_tokens:  # the whole pass: every output
            lo, hi = 0, p.sorted_outputs.shape[0]
        else:
            lo, hi = np.searchsorted(p.sorted_outputs, [p.scheduled, p.scheduled + count]).tolist()
        chunks.append(Chunk(p, p.scheduled, count, lo, hi))
        budget -= count
    return chunks


def build_batch(chunks: list[Chunk], page_size: int) -> ForwardBatch:
    counts = np.array([c.count for c in chunks], dtype=np.int64)
    starts = np.array([c.start for c in chunks], dtype=np.int64)
    qo_indptr = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(counts, out=qo_indptr[1:])

    # KV length of each chunk's request once the chunk is appended
    kv_len = np.array([c.p.kv_start for c in chunks], dtype=np.int64) + starts + counts
    num_pages = (kv_len + page_size - 1) // page_size
    last_page_len = kv_len - (num_pages - 1) * page_size
    page_indptr = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(num_pages, out=page_indptr[1:])

    # outputs: local sorted rows - chunk start + the chunk's first global row
    out_counts = np.array([c.out_hi - c.out_lo for c in chunks], dtype=np.int64)
    local = np.concatenate([c.p.sorted_outputs[c.out_lo : c.out_hi] for c in chunks])
    outputs = local + np.repeat(qo_indptr[:-1] - starts, out_counts)
    # concatenated as raw records: numpy's structured concatenate promotes fields pairwise (~6 us a part)
    raw = np.concatenate([c.p.samplers[c.out_lo : c.out_hi].view(_RECORD) for c in chunks])
    samplers = raw.view(SAMPLER_DTYPE)
    # fields of a structured array are strided views; copy() gives each its own dense buffer
    # (ascontiguousarray would keep a 1-element view with the record's stride)

    mask = mask_indptr = None
    if any(c.p.mask is not None for c in chunks):
        blocks = []
        for c, kv in zip(chunks, kv_len.tolist(), strict=True):
            if c.p.mask is None:  # causal over slots: row i sees slots 0..kv - count + i
                blocks.append(np.tri(c.count, kv, k=kv - c.count, dtype=bool).reshape(-1))
            else:
                blocks.append(c.p.mask[c.start : c.start + c.count, :kv].reshape(-1))
        mask = np.concatenate(blocks)
        mask_indptr = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(counts * kv_len, out=mask_indptr[1:])

    return ForwardBatch(
        token_ids=np.concatenate([c.p.token_ids[c.start : c.start + c.count] for c in chunks]),
        positions=np.concatenate([c.p.positions[c.start : c.start + c.count] for c in chunks]),
        qo_indptr=qo_indptr.astype(np.int32),
        kv_page_indices=np.concatenate(
            [c.p.pages[:n] for c, n in zip(chunks, num_pages.tolist(), strict=True)]
        ),
        kv_page_indptr=page_indptr.astype(np.int32),
        kv_last_page_len=last_page_len.astype(np.int32),
        output_indices=outputs.astype(np.int32),
        temperature=samplers["temperature"].copy(),
        top_k=samplers["top_k"].copy(),
        top_p=samplers["top_p"].copy(),
        min_p=samplers["min_p"].copy(),
        seed=samplers["seed"].copy(),
        dist_k=samplers["dist_k"].copy(),
        return_logits=samplers["return_logits"].copy(),
        return_logprobs=any(c.p.return_logprobs for c in chunks),
        mask=mask,
        mask_indptr=mask_indptr,
    )


def split_result(result: ForwardResult, batch: ForwardBatch, chunks: list[Chunk]) -> list[ForwardResult]:
    """Each chunk's rows of a batch result (outputs are contiguous per chunk, in chunk order)."""
    out_indptr = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([c.out_hi - c.out_lo for c in chunks], out=out_indptr[1:])
    # logits rows exist only for outputs with return_logits
    logit_indptr = np.concatenate([[0], np.cumsum(batch.return_logits)])[out_indptr]

    def rows(a, lo, hi):
        return None if a is None else a[lo:hi]

    parts = []
    for i in range(len(chunks)):
        lo, hi = int(out_indptr[i]), int(out_indptr[i + 1])
        parts.append(
            ForwardResult(
                tokens=result.tokens[lo:hi],
                logprobs=rows(result.logprobs, lo, hi),
                entropies=rows(result.entropies, lo, hi),
                logits=rows(result.logits, int(logit_indptr[i]), int(logit_indptr[i + 1])),
                dist_ids=rows(result.dist_ids, lo, hi),
                dist_probs=rows(result.dist_probs, lo, hi),
            )
        )
    return parts


def check_result(result: ForwardResult, batch: ForwardBatch) -> str | None:
    """What is wrong with a driver's result for `batch` (None if nothing)."""
    if not isinstance(result, ForwardResult):
        return f"driver returned {type(result).__name__}, expected ForwardResult"
    if result.tokens.shape != (batch.num_outputs,):
        return f"driver returned {result.tokens.shape[0]} tokens for {batch.num_outputs} output rows"
    num_logits = int(batch.return_logits.sum())
    if num_logits and (result.logits is None or result.logits.shape[0] != num_logits):
        return f"driver returned no or wrong logits rows (expected {num_logits})"
    return None
