"""One context's forward pass as the scheduler sees it, and the merging of its chunk results.

A pass appends n tokens to a context whose KV length goes from kv_end - n to kv_end;
`pages` are the context's pages covering kv_end (ceil(kv_end / page_size) of them).
Outputs are local token rows (0..n-1), each with a sampler row (SAMPLER_DTYPE).

When the scheduler splits a pass into chunks, each chunk's ForwardResult slice is kept in
`parts` (in chunk order) and `merge_parts` stitches them back in the caller's output order.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from pie.drivers.protocol import BatchError, ForwardResult

# One row per output: what the driver needs to sample it (see ForwardBatch's fields of the same names).
SAMPLER_DTYPE = np.dtype(
    [
        ("temperature", np.float32),
        ("top_k", np.int32),
        ("top_p", np.float32),
        ("min_p", np.float32),
        ("seed", np.int64),
        ("dist_k", np.int32),
        ("return_logits", np.bool_),
    ]
)


def sampler_rows(n: int, **fields) -> np.ndarray:
    """[n] SAMPLER_DTYPE rows: argmax defaults, overridden by scalars or [n] arrays in `fields`."""
    rows = np.zeros(n, dtype=SAMPLER_DTYPE)
    rows["top_p"] = 1.0
    rows["seed"] = -1
    for k, v in fields.items():
        rows[k] = v
    return rows


def _minmax(a: np.ndarray) -> tuple[int, int]:
    """(min, max) of a non-empty array; through Python for small arrays, where numpy's reductions
    cost more than the work (most passes are one-token decode steps)."""
    if a.size <= 64:
        values = a.tolist()
        return min(values), max(values)
    return int(a.min()), int(a.max())


@dataclass(eq=False)
class PassRequest:
    token_ids: np.ndarray  # [n] int64
    positions: np.ndarray  # [n] int64
    pages: np.ndarray  # [ceil(kv_end / page_size)] int32
    kv_end: int  # context KV length after the pass
    outputs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # [o] local rows
    samplers: np.ndarray = field(default_factory=lambda: sampler_rows(0))  # [o] SAMPLER_DTYPE
    mask: np.ndarray | None = None  # [n, kv_end] bool, True = may attend; None = causal
    return_logprobs: bool = False

    # ---- scheduler state (set by Scheduler.submit) ----
    future: asyncio.Future | None = None
    order: np.ndarray | None = None  # stable argsort of outputs (None: already sorted)
    sorted_outputs: np.ndarray | None = None
    scheduled: int = 0  # tokens handed to batches so far
    completed: int = 0  # tokens whose batch has finished
    parts: list[ForwardResult] = field(default_factory=list)
    chunkable: bool = True  # False when a row attends to a later row of the same pass
    dropped: bool = False  # cancelled or failed; its remaining chunks never run

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def kv_start(self) -> int:
        return self.kv_end - self.num_tokens

    def validate(self, page_size: int, vocab_size: int, max_dist_size: int, max_batch_tokens: int) -> None:
        """Raise BatchError naming what is wrong; cheap (vectorized)."""
        n, o = self.num_tokens, int(self.outputs.shape[0])
        if n < 1:
            raise BatchError("a forward pass needs at least one input token")
        if self.token_ids.shape != (n,) or self.positions.shape != (n,):
            raise BatchError(f"token_ids and positions must both have shape ({n},)")
        lo, hi = _minmax(self.token_ids)
        if lo < 0 or hi >= vocab_size:
            raise BatchError(f"token id out of range 0..{vocab_size - 1}")
        if self.kv_start < 0:
            raise BatchError(f"kv_end {self.kv_end} is smaller than the {n} new tokens")
        need = -(-self.kv_end // page_size)
        if self.pages.shape != (need,):
            raise BatchError(f"a KV length of {self.kv_end} needs {need} pages, got {self.pages.shape[0]}")
        if self.samplers.shape != (o,):
            raise BatchError(f"need one sampler per output row ({o}), got {self.samplers.shape[0]}")
        if o:
            lo, hi = _minmax(self.outputs)
            if lo < 0 or hi >= n:
                raise BatchError(f"output rows must be in 0..{n - 1}")
        if o and _minmax(self.samplers["dist_k"])[1] > max_dist_size:
            raise BatchError(f"distribution size above the driver's max_dist_size ({max_dist_size})")
        if self.mask is not None and self.mask.shape != (n, self.kv_end):
            raise BatchError(f"mask must have shape [{n}, {self.kv_end}] (new tokens x KV length)")
        # a row that sees a later row of its own pass needs that row's KV in the same batch
        self.chunkable = self.mask is None or not np.triu(self.mask[:, self.kv_start :], k=1).any()
        if not self.chunkable and n > max_batch_tokens:
            raise BatchError(
                f"a pass whose mask lets tokens see later tokens of the same pass cannot be split; "
                f"it has {n} tokens, above max_batch_tokens ({max_batch_tokens})"
            )

    def prepare(self, future: asyncio.Future) -> None:
        """Sort outputs by row (chunks take contiguous output ranges); usually they already are."""
        self.future = future
        rows = self.outputs.tolist() if self.outputs.size <= 64 else None
        if rows is not None and all(a <= b for a, b in zip(rows, rows[1:], strict=False)):
            self.order = None
            self.sorted_outputs = np.asarray(self.outputs, dtype=np.int32)
        else:
            self.order = np.argsort(self.outputs, kind="stable")
            self.sorted_outputs = np.ascontiguousarray(self.outputs[self.order], dtype=np.int32)
            self.samplers = self.samplers[self.order]


def _cat(parts: list[np.ndarray | None]) -> np.ndarray | None:
    got = [p for p in parts if p is not None]
    return np.concatenate(got) if len(got) == len(parts) and got else None


def _cat_padded(parts: list[ForwardResult], name: str, fill, dtype) -> np.ndarray | None:
    """Concatenate the [o_i, k_i] `name` arrays of the parts, padding k to the widest with `fill`.

    A part from a batch that asked for no distribution has None there: it counts as width 0.
    """
    arrays = [getattr(q, name) for q in parts]
    if all(a is None for a in arrays):
        return None
    arrays = [
        np.zeros((q.tokens.shape[0], 0), dtype) if a is None else a
        for q, a in zip(parts, arrays, strict=True)
    ]
    width = max(a.shape[1] for a in arrays)
    return np.concatenate(
        [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) for a in arrays]
    )


def merge_parts(p: PassRequest) -> ForwardResult:
    """One ForwardResult for the whole pass, rows in the caller's output order."""
    # chunks without any of this pass's outputs may come from batches that returned fewer fields
    parts = [q for q in p.parts if q.tokens.shape[0] > 0] or p.parts[:1]
    if len(parts) == 1 and p.order is None:
        return parts[0]  # the common case: one chunk, outputs in row order
    inv = None if p.order is None else np.argsort(p.order, kind="stable")  # sorted position of each output

    def unsort(a):
        return a if a is None or inv is None else a[inv]

    got = [q.logits for q in parts if q.logits is not None]  # a part without flagged rows has None
    logits = np.concatenate(got) if got else None
    if logits is not None:
        # logits rows exist only for outputs with return_logits: reorder among those rows
        flags = p.samplers["return_logits"]  # sorted order
        if inv is not None:
            rank = np.cumsum(flags) - 1  # row within `logits` for each flagged sorted output
            logits = logits[rank[inv][flags[inv]]]
    return ForwardResult(
        tokens=unsort(_cat([q.tokens for q in parts])),
        logprobs=unsort(_cat([q.logprobs for q in parts])),
        entropies=unsort(_cat([q.entropies for q in parts])),
        logits=logits,
        dist_ids=unsort(_cat_padded(parts, "dist_ids", -1, np.int64)),
        dist_probs=unsort(_cat_padded(parts, "dist_probs", 0.0, np.float32)),
    )
