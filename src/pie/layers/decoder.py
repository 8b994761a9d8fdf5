"""Decoder stacks shared by the families, built from per-layer specs (ModelConfig.layers).

Block shapes (each a DecoderLayer subclass; a family picks one and its flags):
  * PreNormLayer   x -> x + attn(norm(x)) -> x + mlp(norm(x))             Llama, Mistral, Qwen (fused add+norm)
  * SandwichLayer  x -> x + post(attn(pre(x))) -> x + post(mlp(pre(x)))   Gemma 2/3 (four norms per layer)
  * PostNormLayer  x -> x + norm(attn(x)) -> x + norm(mlp(x))             OLMo 2/3
Layers return (x, residual): pre-norm layers keep the residual stream separate so the next norm fuses the
add; the others return residual None (x is the whole stream). Module names mirror HF checkpoints
(model.layers.N.self_attn.*, model.norm, lm_head), except the fused projections listed in
`packed_modules_mapping`.
"""

from __future__ import annotations

import torch
from torch import nn

from pie.layers.attention import Attention, ForwardContext
from pie.layers.mlp import GatedMLP
from pie.layers.moe import SparseMoE
from pie.layers.norm import RMSNorm
from pie.layers.parallel import ParallelLMHead, VocabParallelEmbedding, vocab_parallel_logits
from pie.layers.rotary import RotaryCache
from pie.models.config import ModelConfig


class DecoderLayer(nn.Module):
    """Attention + the layer's MLP (gated dense, or the sparse MoE block where its spec says "sparse");
    subclasses add the norms and the residual wiring."""

    norm_cls: type[RMSNorm] = RMSNorm
    qk_norm: str = "none"
    attention_cls: type[Attention] = Attention

    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryCache) -> None:
        super().__init__()
        c, spec = config, config.layers[layer_idx]
        self.make_mixer(c, layer_idx, rotary)
        self.mlp: nn.Module = (
            SparseMoE(c.hidden_size, c.moe)
            if spec.mlp == "sparse"
            else GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        )

    def make_mixer(self, config: ModelConfig, layer_idx: int, rotary: RotaryCache) -> None:
        """The token mixer: self_attn (attention_cls); a hybrid layer builds another kind where its spec
        says so (Qwen 3.5's Gated DeltaNet)."""
        c, spec = config, config.layers[layer_idx]
        self.self_attn = self.attention_cls(
            layer_idx,
            c.hidden_size,
            spec,
            rotary.get(spec.head_dim, spec.rope),
            has_qkv_bias=c.has_qkv_bias,
            has_o_bias=c.has_o_bias,
            qk_norm=self.qk_norm if c.has_qk_norm else "none",
            norm_cls=self.norm_cls,
            rms_norm_eps=c.rms_norm_eps,
        )

    def mix(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: [T, H] normed -> [T, H], through the mixer make_mixer built."""
        return self.self_attn(positions, x, ctx)

    def norm(self, config: ModelConfig) -> RMSNorm:
        return self.norm_cls(config.hidden_size, config.rms_norm_eps)


class PreNormLayer(DecoderLayer):
    qk_norm = "head"

    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryCache) -> None:
        super().__init__(config, layer_idx, rotary)
        self.input_layernorm = self.norm(config)
        self.post_attention_layernorm = self.norm(config)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] output of the previous block (not yet added to `residual`). Returns (x, residual)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.mix(positions, x, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class SandwichLayer(DecoderLayer):
    qk_norm = "head"

    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryCache) -> None:
        super().__init__(config, layer_idx, rotary)
        self.input_layernorm = self.norm(config)
        self.post_attention_layernorm = self.norm(config)
        self.pre_feedforward_layernorm = self.norm(config)
        self.post_feedforward_layernorm = self.norm(config)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext
    ) -> tuple[torch.Tensor, None]:
        x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), ctx))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, None


class PostNormLayer(DecoderLayer):
    qk_norm = "proj"

    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryCache) -> None:
        super().__init__(config, layer_idx, rotary)
        self.post_attention_layernorm = self.norm(config)
        self.post_feedforward_layernorm = self.norm(config)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext
    ) -> tuple[torch.Tensor, None]:
        x = x + self.post_attention_layernorm(self.self_attn(positions, x, ctx))
        x = x + self.post_feedforward_layernorm(self.mlp(x))
        return x, None


class DecoderModel(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_cls: type[DecoderLayer], embed_scale: float | None = None
    ) -> None:
        super().__init__()
        c = config
        self.rotary = RotaryCache(c.max_position_embeddings)
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, embed_scale)
        self.layers = nn.ModuleList(layer_cls(c, i, self.rotary) for i in range(c.num_layers))
        self.norm = layer_cls.norm_cls(c.hidden_size, c.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        if residual is None:
            return self.norm(x)
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    """Base of every <Family>ForCausalLM: `forward` -> hidden states, `compute_logits` -> fp32 logits.

    A family sets `layer_cls` (block shape), `embed_scale` (a callable of the config, or None) and
    `config_from_hf` (its HF config normalization); wrappers of a text tower set `checkpoint_prefixes`."""

    # checkpoint tensor name part -> (fused module name part, shard id); applied by models/weights.py
    packed_modules_mapping: dict[str, tuple[str, str | int]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # checkpoint name prefix -> module name prefix (multimodal wrappers: "model.language_model." -> "model.")
    checkpoint_prefixes: dict[str, str] = {}
    layer_cls: type[DecoderLayer] = PreNormLayer
    # built from the tensor-parallel shared layers (pie.layers.parallel); a family with its own layers
    # that are not split over ranks says False, and tensor_parallel_size > 1 is refused for it
    supports_tensor_parallel: bool = True

    @staticmethod
    def config_from_hf(d: dict) -> ModelConfig:
        raise NotImplementedError

    def embed_scale(self, config: ModelConfig) -> float | None:
        return None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, self.layer_cls, self.embed_scale(config))
        # Tied: the head reads the embedding matrix directly (no second parameter to keep in sync).
        self.lm_head = (
            None if config.tie_word_embeddings else ParallelLMHead(config.hidden_size, config.vocab_size)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> hidden [T, H] (final norm applied)."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [O, H] -> [O, V] float32 (final soft-cap applied where the family has one). Under
        tensor parallelism every rank gets the whole [O, V] (all-gathered)."""
        if self.lm_head is None:
            logits = vocab_parallel_logits(hidden, self.model.embed_tokens.weight, self.config.vocab_size)
        else:
            logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
