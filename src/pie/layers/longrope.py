"""LongRoPE (Phi-3, Phi-3.5, Phi-4-mini): the rope type "longrope" of pie.layers.rotary.

- Inverse frequencies 1 / (ext_factor[i] * theta^(2i / rotary_dim)), ext = short_factor or long_factor;
  cos and sin are both multiplied by the attention factor (as transformers does, in fp32).
- The rotary table holds both sets, [2 * max_position, rotary_dim] (cos half | sin half): rows
  [0, max_position) are the short set, rows [max_position, 2 * max_position) the long set. Attention passes
  *table rows* instead of positions (`longrope_rows`).

Short or long, per request of a batch. transformers picks the set by `seq_len = max(position_ids) + 1` of the
forward call: long when seq_len > original_max_position_embeddings, for every token of the call. pie applies
that rule per request: all new tokens of a request use the long set when the request's largest position in
this batch is >= original_max_position_embeddings. Keys already in the KV cache are never recomputed (see
docs/models.md for what that means next to transformers' `generate`).
"""

from __future__ import annotations

import torch

from pie.attention.base import AttentionMetadata


def longrope_inv_freq(rotary_dim: int, theta: float, ext_factors: tuple[float, ...]) -> torch.Tensor:
    """[rotary_dim // 2] fp32 on the CPU (also under a meta-device model build), exactly as transformers."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    return 1.0 / (torch.tensor(ext_factors, dtype=torch.float32, device="cpu") * theta**exponent)


def longrope_rows(
    positions: torch.Tensor, meta: AttentionMetadata, switch: int, long_offset: int
) -> torch.Tensor:
    """Rows of the two-set table for each token: position, plus long_offset for the tokens of requests whose
    largest position in this batch is >= switch. positions: [T] int64 -> [T] int64."""
    if meta.is_decode:  # one token per request (also inside CUDA graphs: no host sync, static shapes)
        return positions + (positions >= switch).long() * long_offset
    T, R = positions.shape[0], meta.num_requests
    tokens = torch.arange(T, device=positions.device, dtype=meta.qo_indptr.dtype)
    request = torch.searchsorted(meta.qo_indptr[1:].contiguous(), tokens, right=True)  # [T] request of token
    largest = torch.full((R,), -1, dtype=positions.dtype, device=positions.device)
    largest.scatter_reduce_(0, request, positions, reduce="amax")
    return positions + (largest[request] >= switch).long() * long_offset
