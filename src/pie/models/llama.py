"""Llama 2 / 3 / 3.1 / 3.2 and Mistral (7B v0.1 with its sliding window on every layer, or v0.2+ without).

Pre-norm decoder: RMSNorm, GQA attention with RoPE (llama3 / linear / yarn scaling when configured), SwiGLU
MLP; `attention_bias` puts a bias on q/k/v/o.
"""

from __future__ import annotations

from pie.layers.decoder import CausalLM
from pie.models.config import (
    ModelConfig,
    MoEConfig,
    RopeSpec,
    build_layers,
    common_fields,
    parse_rope,
    rope_dicts,
)

# families whose `sliding_window`, when set, windows every layer (transformers' Mistral, Mixtral, Phi-3)
_WINDOW_EVERY_LAYER = ("mistral", "mixtral", "phi3")


def dense_config(
    d: dict,
    *,
    qkv_bias: bool | None = None,
    has_qk_norm: bool = False,
    rope: RopeSpec | None = None,
    moe: MoEConfig | None = None,
    sparse_layers: tuple[int, ...] = (),
) -> ModelConfig:
    """The Llama-shaped families' normalization: one rope for all layers (parsed here unless the family
    passes its own); Mistral's, Mixtral's and Phi-3's `sliding_window`, when set, windows every layer (as
    transformers does); `moe` with the indices of its sparse layers for the MoE families."""
    model_type = d["model_type"]
    c = common_fields(d, model_type)
    if rope is None:
        rope = parse_rope(rope_dicts(d)[""], c["max_position_embeddings"], f"{model_type} rope")
    window = d.get("sliding_window") if model_type in _WINDOW_EVERY_LAYER else None
    if window is not None and int(window) >= c["max_position_embeddings"]:
        window = None  # a window no sequence can exceed is full attention
    kinds = ["sliding" if window else "full"] * c["num_layers"]
    attention_bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        **c,
        rope=rope,
        has_qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        has_o_bias=attention_bias if qkv_bias is None else False,
        has_qk_norm=has_qk_norm,
        moe=moe,
        layers=build_layers(
            c, kinds, {"": rope}, window=int(window) if window else None, sparse_layers=sparse_layers
        ),
    )


class LlamaForCausalLM(CausalLM):
    config_from_hf = staticmethod(dense_config)
