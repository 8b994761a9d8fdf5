"""The decoder stack shared by all families: pre-norm blocks of (GQA attention, SwiGLU MLP).

Families differ only by flags (has_qkv_bias, has_o_bias, has_qk_norm) carried by ModelConfig, so each
family file is a thin subclass of CausalLM. Module names mirror HF checkpoints
(model.layers.N.self_attn.*, model.norm, lm_head), except the fused projections listed in
`packed_modules_mapping`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pie.layers.attention import Attention, ForwardContext
from pie.layers.embedding import LMHead, VocabEmbedding
from pie.layers.mlp import GatedMLP
from pie.layers.moe import SparseMoE
from pie.layers.norm import RMSNorm
from pie.layers.rotary import RotaryEmbedding
from pie.models.config import ModelConfig


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        c = config
        self.self_attn = Attention(
            layer_idx,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            rotary,
            has_qkv_bias=c.has_qkv_bias,
            has_o_bias=c.has_o_bias,
            has_qk_norm=c.has_qk_norm,
            rms_norm_eps=c.rms_norm_eps,
        )
        if c.moe is not None and layer_idx in c.moe.sparse_layers:
            self.mlp = SparseMoE(c.hidden_size, c.moe)
        else:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] output of the previous block (not yet added to `residual`). Returns (x, residual)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        c = config
        # a family with its own rope variant passes its rotary (phi3: partial rotary, LongRoPE)
        self.rotary = rotary or RotaryEmbedding(
            c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling
        )
        self.embed_tokens = VocabEmbedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i, self.rotary) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    """Base of every <Family>ForCausalLM: `forward` -> hidden states, `compute_logits` -> fp32 logits."""

    # checkpoint tensor name part -> (fused module name part, shard id); applied by models/weights.py
    packed_modules_mapping: dict[str, tuple[str, str | int]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    model_cls: type[DecoderModel] = DecoderModel  # a family may subclass the stack (phi3)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_cls(config)
        # Tied: the head reads the embedding matrix directly (no second parameter to keep in sync).
        self.lm_head = None if config.tie_word_embeddings else LMHead(config.hidden_size, config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> hidden [T, H] (final norm applied)."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [O, H] -> [O, V] float32."""
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden)
