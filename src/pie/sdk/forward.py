"""A hand-built forward pass over one context: inputs, an optional attention mask, sampled rows.

    p = ctx.forward()
    p.input(ids)                       # positions default to the context's next positions
    p.mask(rows)                       # optional: bool [len(ids), p.kv_len], True = may attend
    p.sample([len(ids) - 1], Sampler.dist(5))
    (r,) = await p.execute()           # one SampleResult per sampled index, in call order

Tokens still pending on the context (append(), chat calls, the last generated token) run first
in the same pass; indices count from the first `input` token (negative ones from the end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pie.drivers.protocol import ForwardResult
from pie.runtime.work import SAMPLER_DTYPE
from pie.sdk.sampler import Sampler

if TYPE_CHECKING:
    from pie.sdk.context import Context


@dataclass
class SampleResult:
    token: int
    logprob: float | None = None  # log p(token) at temperature 1 (samplers .with_logprobs())
    entropy: float | None = None  # of the row's temperature-1 distribution, in nats
    dist_ids: np.ndarray | None = None  # [k] top token ids, most likely first (Sampler.dist / with_dist)
    dist_probs: np.ndarray | None = None  # [k] their probabilities
    logits: np.ndarray | None = None  # [vocab] float32 (Sampler.logits / with_logits)

    @property
    def dist(self) -> list[tuple[int, float]]:
        if self.dist_ids is None:
            return []
        return list(zip(self.dist_ids.tolist(), self.dist_probs.tolist(), strict=True))


def to_results(res: ForwardResult, samplers: list[Sampler]) -> list[SampleResult]:
    """Per-row SampleResults; extras only where that row's sampler asked for them."""
    out, logit_row = [], 0
    for i, s in enumerate(samplers):
        r = SampleResult(token=int(res.tokens[i]))
        if s.want_logprobs and res.logprobs is not None:
            r.logprob, r.entropy = float(res.logprobs[i]), float(res.entropies[i])
        if s.dist_k and res.dist_ids is not None:
            r.dist_ids, r.dist_probs = res.dist_ids[i, : s.dist_k], res.dist_probs[i, : s.dist_k]
        if s.want_logits and res.logits is not None:
            r.logits = res.logits[logit_row]
            logit_row += 1
        out.append(r)
    return out


class ForwardPass:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._ids: list[int] = []
        self._pos: list[int] | None = None
        self._mask: np.ndarray | None = None
        self._indices: list[int] = []
        self._samplers: list[Sampler] = []
        self._done = False

    @property
    def kv_len(self) -> int:
        """The context's KV length after this pass (the width of mask rows)."""
        return self._ctx.kv_len + len(self._ctx.pending) + len(self._ids)

    def input(self, ids, positions=None) -> ForwardPass:
        if self._ids:
            raise ValueError("input() was already called on this pass; give all tokens in one call")
        self._ids = [int(i) for i in ids]
        if positions is not None:
            self._pos = [int(p) for p in positions]
            if len(self._pos) != len(self._ids):
                raise ValueError(f"{len(self._pos)} positions for {len(self._ids)} tokens")
        return self

    def mask(self, rows) -> ForwardPass:
        """rows: bool [len(input ids), kv_len]; row i says which KV slots input token i attends to."""
        self._mask = np.asarray(rows, dtype=bool)
        return self

    def sample(self, indices, sampler: Sampler) -> ForwardPass:
        idx = [int(indices)] if np.isscalar(indices) else [int(i) for i in indices]
        self._indices += idx
        self._samplers += [sampler] * len(idx)
        return self

    async def execute(self) -> list[SampleResult]:
        if self._done:
            raise RuntimeError("this forward pass was already executed; build a new one with ctx.forward()")
        self._done = True
        if self._mask is not None and self._mask.shape != (len(self._ids), self.kv_len):
            raise ValueError(
                f"mask must be bool [{len(self._ids)}, {self.kv_len}] (input tokens x KV length after the "
                f"pass), got {list(self._mask.shape)}"
            )
        for i in self._indices:
            if not -len(self._ids) - len(self._ctx.pending) <= i < len(self._ids):
                raise IndexError(f"sample index {i} is outside the {len(self._ids)} input tokens")
        rows = np.array([tuple(s.row().values()) for s in self._samplers], dtype=SAMPLER_DTYPE)
        res = await self._ctx._run(
            self._ids,
            self._pos,
            self._indices,
            rows,
            self._mask,
            any(s.want_logprobs for s in self._samplers),
        )
        return to_results(res, self._samplers)
