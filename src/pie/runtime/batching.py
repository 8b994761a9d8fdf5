"""Building one ForwardBatch from the scheduler's chunks, and splitting its result back.

A chunk is the slot range [lo, hi) of one sequence computed in this batch. Its KV length is hi, so
its pages are seq.pages[:ceil(hi / page_size)] and its last page holds hi - (n - 1) * page_size slots.
Its outputs are slots in [lo, hi), each with a SAMPLER_DTYPE row; `feed` >= 0 means its first token
is the one sampled at that output row of the previous batch (a generation step queued before the
previous step returned; see ForwardBatch.prev_token_rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pie.drivers.protocol import ForwardBatch, ForwardResult
from pie.runtime.work import SAMPLER_DTYPE, Work

_RECORD = np.dtype((np.void, SAMPLER_DTYPE.itemsize))


@dataclass(eq=False, slots=True)
class Chunk:
    work: Work
    lo: int
    hi: int
    out_slots: np.ndarray | None  # [k] int64 slots in [lo, hi); None: a generation step (one output, hi - 1)
    samplers: np.ndarray  # [k] SAMPLER_DTYPE (a step: [1])
    feed: int = -1
    is_step: bool = False  # a generation step (its output is the next token)


@dataclass(eq=False, slots=True)
class FedSteps:
    """Generation steps whose token comes from the previous batch, gathered by the scheduler as it plans
    them: rows 0..n-1 of the batch, one token and one output each (the hot path, kept as flat lists)."""

    gens: list = field(default_factory=list)  # Generation per row
    his: list[int] = field(default_factory=list)  # KV length after the step (its slot + 1)
    positions: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)  # the rows' page lists, concatenated
    feeds: list[int] = field(default_factory=list)  # output row of the previous batch holding the token
    records: list[np.ndarray] = field(default_factory=list)  # sampler record per row
    return_logprobs: bool = False  # a row wants the log-probability of its token


def build_batch(
    chunks: list[Chunk], page_size: int, fed: FedSteps | None = None, recurrent: bool = False
) -> ForwardBatch:
    """recurrent: name each row's recurrent-state slot (hybrid models)."""
    n_fed = 0 if fed is None else len(fed.gens)
    R = n_fed + len(chunks)
    # the fed rows' positions, pages and records are extended in place (a FedSteps serves one batch)
    tokens: list[int] = [0] * n_fed  # placeholders: the device feeds them (prev_token_rows)
    positions: list[int] = [] if fed is None else fed.positions
    pages: list[int] = [] if fed is None else fed.pages
    his: list[int] = [] if fed is None else list(fed.his)  # fed.his stays the fed rows' (scheduler._finish)
    los: list[int] = []  # of the chunks; a fed row's is its hi - 1
    records: list[np.ndarray] = [] if fed is None else fed.records
    feeds = None  # (token index, previous row) of chunks fed on the device (rare: fed rows come first)
    all_steps = True
    for c in chunks:
        s = c.work.seq
        lo, hi = c.lo, c.hi
        los.append(lo)
        his.append(hi)
        if hi - lo == 1:  # a decode row: no slicing
            tokens.append(s.tokens[lo])
            positions.append(s.positions[lo])
        else:
            tokens += s.tokens[lo:hi]
            positions += s.positions[lo:hi]
        pages += s.pages[: (hi + page_size - 1) // page_size]
        if c.feed >= 0:
            if feeds is None:
                feeds = []
            feeds.append((len(tokens) - (hi - lo), c.feed))
        if c.out_slots is None and c.samplers is c.work.samplers:  # an unseeded step: its cached record
            rec = c.work.record
            if rec is None:
                rec = c.work.record = c.samplers.view(_RECORD)
            records.append(rec)
        else:
            records.append(c.samplers.view(_RECORD))
            all_steps = all_steps and c.out_slots is None
    hi = np.array(his, dtype=np.int64)
    lo = np.concatenate([hi[:n_fed] - 1, np.array(los, dtype=np.int64)])
    counts = hi - lo
    qo_indptr = np.zeros(R + 1, dtype=np.int32)
    np.cumsum(counts, out=qo_indptr[1:])
    num_pages = (hi + page_size - 1) // page_size
    last_page_len = (hi - (num_pages - 1) * page_size).astype(np.int32)
    page_indptr = np.zeros(R + 1, dtype=np.int32)
    np.cumsum(num_pages, out=page_indptr[1:])
    token_ids = np.array(tokens, dtype=np.int64)
    prev_rows = None
    if n_fed or feeds is not None:
        prev_rows = np.full(token_ids.shape[0], -1, dtype=np.int32)
        prev_rows[:n_fed] = fed.feeds if n_fed else []
        if feeds is not None:
            at, rows = zip(*feeds, strict=True)
            prev_rows[list(at)] = rows
            token_ids[list(at)] = 0  # placeholders (-1) until the device fills them

    if all_steps:  # generation steps: one output each, the chunk's last row
        outs = qo_indptr[1:].astype(np.int64) - 1
    else:
        # fed steps first (one output each, their only row), then each chunk's output slots
        counts_out = [1] * n_fed + [1 if c.out_slots is None else c.out_slots.shape[0] for c in chunks]
        slots = [np.asarray(his[:n_fed], np.int64) - 1]
        slots += [np.array([c.hi - 1]) if c.out_slots is None else c.out_slots for c in chunks]
        outs = np.concatenate(slots).astype(np.int64) + np.repeat(qo_indptr[:-1] - lo, counts_out)
    samplers = np.concatenate(records).view(SAMPLER_DTYPE) if records else np.zeros(0, SAMPLER_DTYPE)

    mask = mask_indptr = None
    if any(c.work.mask is not None for c in chunks):
        blocks = [np.tri(1, h, k=h - 1, dtype=bool).reshape(-1) for h in his[:n_fed]]
        for c in chunks:
            rows = c.work.mask_rows(c.lo, c.hi, c.hi)
            if rows is None:  # causal over slots: row i sees slots 0..lo + i
                rows = np.tri(c.hi - c.lo, c.hi, k=c.lo, dtype=bool)
            blocks.append(rows.reshape(-1))
        mask = np.concatenate(blocks)
        mask_indptr = np.zeros(R + 1, dtype=np.int64)
        np.cumsum(counts * hi, out=mask_indptr[1:])

    return ForwardBatch(
        token_ids=token_ids,
        positions=np.array(positions, dtype=np.int64),
        qo_indptr=qo_indptr,
        kv_page_indices=np.array(pages, dtype=np.int32),
        kv_page_indptr=page_indptr,
        kv_last_page_len=last_page_len,
        output_indices=outs.astype(np.int32),
        # fields of a structured array are strided views; copy() gives each its own dense buffer
        temperature=samplers["temperature"].copy(),
        top_k=samplers["top_k"].copy(),
        top_p=samplers["top_p"].copy(),
        min_p=samplers["min_p"].copy(),
        seed=samplers["seed"].copy(),
        dist_k=samplers["dist_k"].copy(),
        return_logits=samplers["return_logits"].copy(),
        return_logprobs=(fed is not None and fed.return_logprobs)
        or any(c.work.return_logprobs for c in chunks),
        mask=mask,
        mask_indptr=mask_indptr,
        prev_token_rows=prev_rows,
        state_slots=(
            np.array(
                [g.seq.state_slot for g in (fed.gens if fed is not None else [])]
                + [c.work.seq.state_slot for c in chunks],
                dtype=np.int32,
            )
            if recurrent
            else None
        ),
    )


def split_result(
    result: ForwardResult, batch: ForwardBatch, chunks: list[Chunk], n_fed: int = 0
) -> list[ForwardResult]:
    """Each chunk's rows of a batch result (outputs are contiguous per chunk, in chunk order, after the
    n_fed rows of fed generation steps)."""
    out_indptr = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([1 if c.out_slots is None else c.out_slots.shape[0] for c in chunks], out=out_indptr[1:])
    out_indptr += n_fed
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
