"""Self-attention over the paged KV cache, and the per-batch context every layer reads.

Data flow per layer: fused qkv_proj -> (qk-norm) -> RoPE at the tokens' positions -> append K/V into
this layer's pages -> backend.run (paged attention, causal over slots or the batch's custom mask) -> o_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pie.attention.base import AttentionBackend, AttentionMetadata, append_kv
from pie.layers.linear import QKVLinear
from pie.layers.norm import RMSNorm
from pie.layers.rotary import RotaryEmbedding


@dataclass
class ForwardContext:
    """Everything a forward pass needs besides token ids and positions; built once per batch.

    kv_caches[layer]: [num_pages, 2, page_size, Hkv, D] (views into one [L, ...] allocation).
    The backend has already been planned with `meta`.
    """

    meta: AttentionMetadata
    backend: AttentionBackend
    kv_caches: list[torch.Tensor]


class Attention(nn.Module):
    def __init__(
        self,
        layer_idx: int,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        *,
        has_qkv_bias: bool,
        has_o_bias: bool,
        has_qk_norm: bool,
        rms_norm_eps: float,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rotary = rotary
        self.qkv_proj = QKVLinear(hidden, num_heads, num_kv_heads, head_dim, bias=has_qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=has_o_bias)
        # Qwen3: RMSNorm over head_dim of each head, shared across heads, applied before RoPE.
        self.q_norm = RMSNorm(head_dim, rms_norm_eps) if has_qk_norm else None
        self.k_norm = RMSNorm(head_dim, rms_norm_eps) if has_qk_norm else None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """positions: [T] int64; x: [T, H] -> [T, H]."""
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.split_sizes, dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        kv_cache = ctx.kv_caches[self.layer_idx]
        append_kv(kv_cache, k, v, ctx.meta)
        o = ctx.backend.run(q, kv_cache, self.layer_idx)  # [T, Hq, D]
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))
