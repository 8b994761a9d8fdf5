"""Self-attention over the paged KV cache, and the per-batch context every layer reads.

Data flow per layer: fused qkv_proj -> (q/k norm) -> RoPE at the tokens' positions -> (Mistral 3's
position-dependent query scale) -> append K/V into this layer's pages -> backend.run with this layer's
AttentionParams (scale, sliding window, soft-cap, sinks; causal over slots or the batch's custom mask)
-> o_proj.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pie.attention.base import AttentionBackend, AttentionMetadata, AttentionParams, append_kv
from pie.distributed import all_reduce, tp_rank, tp_size
from pie.layers.norm import RMSNorm
from pie.layers.parallel import (
    QKVParallelLinear,
    RowParallelLinear,
    Source,
    copy_pieces,
    divide,
    kv_heads_per_rank,
    kv_replicas,
)
from pie.layers.rotary import RotaryEmbedding, llama4_query_scale
from pie.models.config import LayerSpec

if TYPE_CHECKING:
    from pie.layers.gated_deltanet import RecurrentBatch

QK_NORMS = ("none", "head", "proj")


@dataclass
class ForwardContext:
    """Everything a forward pass needs besides token ids and positions; built once per batch.

    kv_caches[layer]: [num_pages, 2, page_size, Hkv_l, D_l] (views into one allocation per layer group).
    The backend has already been planned with `meta`. recurrent: the state-pool view of the batch for
    models with recurrent layers (Qwen 3.5's Gated DeltaNet), else None.
    """

    meta: AttentionMetadata
    backend: AttentionBackend
    kv_caches: list[torch.Tensor]
    recurrent: RecurrentBatch | None = None


def attention_params(spec: LayerSpec, tp: int = 1) -> AttentionParams:
    """The backend's view of one layer on one of `tp` tensor-parallel ranks (its query and KV heads; HF
    sliding_window W = the query plus W - 1 earlier slots)."""
    return AttentionParams(
        num_qo_heads=divide(spec.num_heads, tp, "num_attention_heads"),
        num_kv_heads=kv_heads_per_rank(spec.num_kv_heads, tp),
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
        self.rotary = rotary
        self.params = attention_params(spec, tp_size())
        self.qkv_proj = QKVParallelLinear(
            hidden, spec.num_heads, spec.num_kv_heads, spec.head_dim, bias=has_qkv_bias
        )
        # this rank's heads (all of them at tensor_parallel_size 1)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = spec.head_dim
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, hidden, bias=has_o_bias)
        self.qk_norm = qk_norm
        self.q_norm = self.k_norm = None
        if qk_norm == "head":  # shared across heads: every rank holds all of it
            self.q_norm = norm_cls(spec.head_dim, rms_norm_eps)
            self.k_norm = norm_cls(spec.head_dim, rms_norm_eps)
        elif qk_norm == "proj" and tp_size() == 1:
            self.q_norm = norm_cls(spec.num_heads * spec.head_dim, rms_norm_eps)
            self.k_norm = norm_cls(spec.num_kv_heads * spec.head_dim, rms_norm_eps)
        elif qk_norm == "proj":  # over the whole projection, which is split over the ranks
            self.q_norm = ShardedProjNorm(self.qkv_proj, "q", rms_norm_eps, replicas=1)
            self.k_norm = ShardedProjNorm(
                self.qkv_proj, "k", rms_norm_eps, replicas=kv_replicas(spec.num_kv_heads, tp_size())
            )
        # GPT-OSS's sink logits, one per query head (this rank's heads)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if spec.has_sinks else None
        self.num_heads_full = spec.num_heads

    def load_param(self, name: str, param: nn.Parameter, src: Source, shard_id: None) -> None:
        """The sinks: this rank's query heads."""
        n = self.num_heads
        copy_pieces(param.data, src, 0, self.num_heads_full, [(0, tp_rank() * n, n)], name)

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


class ShardedProjNorm(RMSNorm):
    """OLMo's q/k RMSNorm over the whole projection when the projection is split over ranks: each rank
    holds its slice of the weight; the mean of squares is summed over the ranks (a KV head replicated on
    `replicas` ranks is counted once). x: [T, local dim] -> [T, local dim]."""

    def __init__(self, qkv: QKVParallelLinear, part: str, eps: float, replicas: int) -> None:
        self.full, self.start, n = qkv.parts[part]
        super().__init__(n, eps)
        self.replicas = replicas

    def load_param(self, name: str, param: nn.Parameter, src: Source, shard_id: None) -> None:
        copy_pieces(param.data, src, 0, self.full, [(0, self.start, param.shape[0])], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        sq = all_reduce(xf.pow(2).sum(-1, keepdim=True))  # [T, 1]
        xf = xf * torch.rsqrt(sq / (self.full * self.replicas) + self.eps)
        return self.weight * xf.to(dtype)
