"""Self-attention over the paged KV cache, and the per-batch context every layer reads.

Data flow per layer: fused qkv_proj -> (q/k norm) -> RoPE at the tokens' positions -> (Mistral 3's
position-dependent query scale) -> append K/V into this layer's pages -> backend.run with this layer's
AttentionParams (scale, sliding window, soft-cap, sinks; causal over slots or the batch's custom mask)
-> o_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pie.attention.base import AttentionBackend, AttentionMetadata, AttentionParams, append_kv
from pie.layers.linear import QKVLinear
from pie.layers.norm import RMSNorm
from pie.layers.rotary import RotaryEmbedding, llama4_query_scale
from pie.models.config import LayerSpec

QK_NORMS = ("none", "head", "proj")


@dataclass
class ForwardContext:
    """Everything a forward pass needs besides token ids and positions; built once per batch.

    kv_caches[layer]: [num_pages, 2, page_size, Hkv_l, D_l] (views into one allocation per layer group).
    The backend has already been planned with `meta`.
    """

    meta: AttentionMetadata
    backend: AttentionBackend
    kv_caches: list[torch.Tensor]


def attention_params(spec: LayerSpec) -> AttentionParams:
    """The backend's view of one layer (HF sliding_window W = the query plus W - 1 earlier slots)."""
    return AttentionParams(
        num_qo_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        sm_scale=spec.sm_scale,
        window_left=spec.sliding_window - 1 if spec.sliding_window is not None else -1,
        logits_soft_cap=spec.logit_softcap or 0.0,
        has_sinks=spec.has_sinks,
    )


class Attention(nn.Module):
    """qk_norm: "none"; "head" (RMSNorm over head_dim of each head, shared across heads: Qwen3, Gemma 3);
    "proj" (RMSNorm over the whole q / k projection before the head split: OLMo 2/3)."""

    def __init__(
        self,
        layer_idx: int,
        hidden: int,
        spec: LayerSpec,
        rotary: RotaryEmbedding,
        *,
        has_qkv_bias: bool,
        has_o_bias: bool,
        qk_norm: str = "none",
        norm_cls: type[RMSNorm] = RMSNorm,
        rms_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm {qk_norm!r} is not one of {QK_NORMS}")
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.rotary = rotary
        self.params = attention_params(spec)
        self.qkv_proj = QKVLinear(hidden, spec.num_heads, spec.num_kv_heads, spec.head_dim, bias=has_qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, hidden, bias=has_o_bias)
        self.qk_norm = qk_norm
        q_dim, k_dim = (
            (spec.head_dim, spec.head_dim)
            if qk_norm == "head"
            else (spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim)
        )
        self.q_norm = norm_cls(q_dim, rms_norm_eps) if qk_norm != "none" else None
        self.k_norm = norm_cls(k_dim, rms_norm_eps) if qk_norm != "none" else None
        # GPT-OSS's sink logits, one per query head
        self.sinks = nn.Parameter(torch.zeros(spec.num_heads)) if spec.has_sinks else None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """positions: [T] int64; x: [T, H] -> [T, H]."""
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.split_sizes, dim=-1)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(self.rotary.table_rows(positions, ctx.meta), q, k)
        scale = llama4_query_scale(positions, self.rotary.spec)  # [T] or None
        if scale is not None:
            q = q * scale.to(q.dtype)[:, None, None]
        kv_cache = ctx.kv_caches[self.layer_idx]
        append_kv(kv_cache, k, v, ctx.meta, ctx.backend.kv_scale(self.layer_idx))
        o = ctx.backend.run(q, kv_cache, self.layer_idx, self.params, self.sinks)  # [T, Hq, D]
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))
