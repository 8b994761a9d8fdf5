"""Gated softmax attention (Qwen 3.5's full-attention layers): Attention whose q_proj also emits a per-head
output gate, o = o_proj(attn(q, k, v) * sigmoid(gate)).

The checkpoint's q_proj rows are per head [query (D) | gate (D)], so the fused projection's "q" shard is
2 * Hq * D wide and is viewed [T, Hq, 2D] before the split.
"""

from __future__ import annotations

import torch

from pie.attention.base import append_kv
from pie.layers.attention import Attention, ForwardContext
from pie.layers.linear import MergedLinear


class GatedAttention(Attention):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        hidden = self.qkv_proj.in_features
        q, kv = 2 * self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(hidden, {"q": q, "k": kv, "v": kv}, bias=self.qkv_proj.bias is not None)
        self.split_sizes = [q, kv, kv]

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """positions: [T] int64; x: [T, H] -> [T, H]."""
        T, H, D = x.shape[0], self.num_heads, self.head_dim
        qg, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q, gate = qg.view(T, H, 2 * D).chunk(2, dim=-1)  # [T, H, D] each
        q = self.q_norm(q)
        k = self.k_norm(k.view(T, self.num_kv_heads, D))
        v = v.view(T, self.num_kv_heads, D)
        q, k = self.rotary(self.rotary.table_rows(positions, ctx.meta), q, k)
        kv_cache = ctx.kv_caches[self.layer_idx]
        append_kv(kv_cache, k, v, ctx.meta)
        o = ctx.backend.run(q, kv_cache, self.layer_idx, self.params, None)  # [T, H, D]
        return self.o_proj((o * torch.sigmoid(gate)).reshape(T, H * D))
