"""What runs on a sequence: one forward pass (Work) or an engine-side generation (Generation).

Both are expressed in slots of the sequence. When a pass enters, its tokens are appended to the
sequence (`seq.tokens`), so "what must be computed" is always the slot range [seq.kv_len, seq.num_tokens):
the pass's own tokens, preceded by tokens to recompute after a preemption. Output rows are slots too.

A generation is a chain of passes run by the scheduler without waking the inferlet: the first computes
the pending tokens and samples the last slot; each later one feeds the sampled token back (on the
device when the previous step has not returned yet) and samples again, until a stop condition.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from pie.drivers.protocol import BatchError, ForwardResult
from pie.runtime.sequence import Sequence

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
DECODE_TOKENS = 16  # a pass with at most this many tokens left is scheduled with the decodes


def sampler_rows(n: int, **fields) -> np.ndarray:
    """[n] SAMPLER_DTYPE rows: argmax defaults, overridden by scalars or [n] arrays in `fields`."""
    rows = np.zeros(n, dtype=SAMPLER_DTYPE)
    rows["top_p"] = 1.0
    rows["seed"] = -1
    for k, v in fields.items():
        rows[k] = v
    return rows


def step_seed(seed: int, step: int) -> int:
    """A fresh 63-bit seed per generation step (the driver's noise is a pure function of the seed)."""
    x = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def _minmax(a: np.ndarray) -> tuple[int, int]:
    if a.size <= 64:
        values = a.tolist()
        return min(values), max(values)
    return int(a.min()), int(a.max())


@dataclass(eq=False)
class Work:
    """A forward pass over `seq`: n new tokens appended at slot `base` (= seq.num_tokens on entry)."""

    seq: Sequence
    token_ids: np.ndarray  # [n] int64
    positions: np.ndarray  # [n] int64
    outputs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # [o] rows in 0..n-1
    samplers: np.ndarray = field(default_factory=lambda: sampler_rows(0))  # [o] SAMPLER_DTYPE
    mask: np.ndarray | None = None  # [n, base + n] bool (True = may attend); None = causal
    return_logprobs: bool = False

    # ---- scheduler state ----
    future: asyncio.Future | None = None
    base: int = 0  # slot of the pass's first token
    out_slots: np.ndarray | None = None  # [o] sorted output slots
    order: np.ndarray | None = None  # stable argsort of outputs (None: already sorted)
    sorted_samplers: np.ndarray | None = None
    parts: list[ForwardResult] = field(default_factory=list)
    chunkable: bool = True  # False when a row attends to a later row of the same pass
    inflight: int = 0  # chunks of this work in running batches
    failed: bool = False
    retired: bool = False  # left the scheduler
    arrival: int = 0
    started: bool = False  # its first chunk has been scheduled

    is_generation = False

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def end(self) -> int:
        return self.base + self.num_tokens

    def remaining(self) -> int:
        return self.seq.num_tokens - self.seq.kv_len

    def validate(self, vocab_size: int, max_dist_size: int, max_batch_tokens: int, max_position: int) -> None:
        """Raise BatchError naming what is wrong; cheap (vectorized). Called once, where passes enter."""
        n, o = self.num_tokens, int(self.outputs.shape[0])
        if n < 1:
            raise BatchError("a forward pass needs at least one input token")
        if self.token_ids.shape != (n,) or self.positions.shape != (n,):
            raise BatchError(f"token_ids and positions must both have shape ({n},)")
        lo, hi = _minmax(self.token_ids)
        if lo < 0 or hi >= vocab_size:
            raise BatchError(f"token id out of range 0..{vocab_size - 1}")
        lo, hi = _minmax(self.positions)
        if lo < 0:
            raise BatchError(f"positions must be >= 0, got {lo}")
        if hi >= max_position:
            raise BatchError(
                f"this pass reaches position {hi}, outside the model's window 0..{max_position - 1}: the "
                f"context would hold {hi + 1} positions, the model has {max_position} (max_position_embeddings)"
            )
        if self.samplers.shape != (o,):
            raise BatchError(f"need one sampler per output row ({o}), got {self.samplers.shape[0]}")
        if o:
            lo, hi = _minmax(self.outputs)
            if lo < 0 or hi >= n:
                raise BatchError(f"output rows must be in 0..{n - 1}")
            if _minmax(self.samplers["dist_k"])[1] > max_dist_size:
                raise BatchError(f"distribution size above the driver's max_dist_size ({max_dist_size})")
        kv_end = self.seq.num_tokens + n
        if self.mask is not None:
            if self.mask.shape != (n, kv_end):
                raise BatchError(f"mask must have shape [{n}, {kv_end}] (new tokens x KV length)")
            if not self.mask.any(axis=1).all():
                raise BatchError("every mask row must allow at least one KV slot")
            # a row that sees a later row of its own pass needs that row's KV in the same batch
            self.chunkable = not np.triu(self.mask[:, self.seq.num_tokens :], k=1).any()
            if not self.chunkable and n > max_batch_tokens:
                raise BatchError(
                    f"a pass whose mask lets tokens see later tokens of the same pass cannot be split; "
                    f"it has {n} tokens, above max_batch_tokens ({max_batch_tokens})"
                )

    def enter(self, future: asyncio.Future | None) -> None:
        """Append the pass's tokens to its sequence; outputs become sorted slots."""
        seq = self.seq
        self.future = future
        self.base = seq.num_tokens
        seq.tokens += self.token_ids.tolist()
        seq.positions += self.positions.tolist()
        if self.mask is not None:
            seq.causal_len = min(seq.causal_len, self.base)
        rows = self.outputs.tolist() if self.outputs.size <= 64 else None
        if rows is not None and all(a <= b for a, b in zip(rows, rows[1:], strict=False)):
            self.order = None
            self.out_slots = np.asarray(self.outputs, dtype=np.int64) + self.base
            self.sorted_samplers = self.samplers
        else:
            self.order = np.argsort(self.outputs, kind="stable")
            self.out_slots = self.outputs[self.order].astype(np.int64) + self.base
            self.sorted_samplers = self.samplers[self.order]

    def mask_rows(self, lo: int, hi: int, kv_end: int) -> np.ndarray | None:
        """[hi - lo, kv_end] attention rows of slots lo..hi-1 (None when causal); slots before `base`
        (recomputed after a preemption) are causal."""
        if self.mask is None:
            return None
        rows = np.tri(hi - lo, kv_end, k=lo, dtype=bool)
        a = max(lo, self.base)
        if a < hi:
            rows[a - lo :] = self.mask[a - self.base : hi - self.base, :kv_end]
        return rows


@dataclass(eq=False)
class Generation(Work):
    """An engine-side generation: steps until a stop token or string, max_tokens or the model's window.

    Tokens stream into `tokens`; `wake_at` is how many the consumer waits for (it is woken then, or at
    the end), so collect_text() wakes the inferlet once.
    """

    max_tokens: int = 256
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    detok: object | None = None  # pie.models.tokenizer.Detokenizer, only with stop strings
    seed: int | None = None  # base seed; each step gets its own (sampler.step_seed)
    want_logprobs: bool = False
    max_position: int = 1 << 62

    # ---- state ----
    tokens: list[int] = field(default_factory=list)  # sampled, stop token excluded
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # only maintained with stop strings
    text_cut: int | None = None
    finish_reason: str | None = None
    final_token: int | None = None  # the last sampled token when it is not in the KV
    stop_token: int | None = None  # the stop id that ended it
    error: BaseException | None = None
    steps: int = 0  # steps scheduled
    done_steps: int = 0  # steps whose result has been processed
    last_batch: int = -1  # batch number of its latest step and its output row there
    last_row: int = -1
    wake_at: int = 1 << 62
    record: np.ndarray | None = None  # samplers viewed as raw records (batching.build_batch)
    event: asyncio.Event = field(default_factory=asyncio.Event)

    is_generation = True

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def wants_step(self) -> bool:
        return not self.finished and self.steps < self.max_tokens

    def notify(self) -> None:
        if self.finished or len(self.tokens) >= self.wake_at:
            self.event.set()


def merge_parts(w: Work) -> ForwardResult:
    """One ForwardResult for the whole pass, rows in the caller's output order."""
    parts = [q for q in w.parts if q.tokens.shape[0] > 0] or w.parts[:1]
    if len(parts) == 1 and w.order is None:
        return parts[0]
    inv = None if w.order is None else np.argsort(w.order, kind="stable")

    def unsort(a):
        return a if a is None or inv is None else a[inv]

    got = [q.logits for q in parts if q.logits is not None]
    logits = np.concatenate(got) if got else None
    if logits is not None and inv is not None:
        flags = w.sorted_samplers["return_logits"]
        rank = np.cumsum(flags) - 1
        logits = logits[rank[inv][flags[inv]]]
    return ForwardResult(
        tokens=unsort(_cat([q.tokens for q in parts])),
        logprobs=unsort(_cat([q.logprobs for q in parts])),
        entropies=unsort(_cat([q.entropies for q in parts])),
        logits=logits,
        dist_ids=unsort(_cat_padded(parts, "dist_ids", -1, np.int64)),
        dist_probs=unsort(_cat_padded(parts, "dist_probs", 0.0, np.float32)),
    )


def _cat(parts: list[np.ndarray | None]) -> np.ndarray | None:
    got = [p for p in parts if p is not None]
    return np.concatenate(got) if len(got) == len(parts) and got else None


def _cat_padded(parts: list[ForwardResult], name: str, fill, dtype) -> np.ndarray | None:
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
