"""Gemma 2: the sandwich block (four (1 + w) RMSNorms per layer), GELU-tanh gated MLP, embeddings scaled by
sqrt(hidden), softmax scale query_pre_attn_scalar**-0.5, attention logit soft-cap on every layer, final
logit soft-cap, and a sliding window on alternating layers (even layers slide unless `layer_types` says
otherwise). Tied embeddings.
"""

from __future__ import annotations

from pie.errors import ModelError
from pie.layers.decoder import CausalLM, SandwichLayer
from pie.layers.norm import GemmaRMSNorm
from pie.models.config import (
    ModelConfig,
    build_layers,
    common_fields,
    layer_kinds,
    parse_rope,
    rope_dicts,
    window_of,
)

GELU_TANH = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu_tanh"}


def gemma_common(d: dict) -> dict:
    """Fields Gemma 2 and 3 share. Gemma's `hidden_activation` gelu_pytorch_tanh (older configs: `hidden_act`
    "gelu", which transformers also runs as the tanh approximation)."""
    model_type = d["model_type"]
    if d.get("use_bidirectional_attention"):
        raise ModelError(f"{model_type} with use_bidirectional_attention is an encoder, not a causal LM")
    d = {"tie_word_embeddings": True, **d}  # Gemma's default
    if not d.get("hidden_activation") and not d.get("hidden_act"):
        d["hidden_activation"] = "gelu_pytorch_tanh"
    return common_fields(d, model_type, acts=GELU_TANH)


def gemma2_config(d: dict) -> ModelConfig:
    c = gemma_common(d)
    n = c["num_layers"]
    kinds = layer_kinds(d, n, ["sliding" if (i + 1) % 2 else "full" for i in range(n)])
    rope = parse_rope(rope_dicts(d)[""], c["max_position_embeddings"], "gemma2 rope")
    softcap = d.get("attn_logit_softcapping", 50.0)
    final_cap = d.get("final_logit_softcapping", 30.0)
    return ModelConfig(
        **c,
        rope=rope,
        has_qkv_bias=bool(d.get("attention_bias", False)),
        has_o_bias=bool(d.get("attention_bias", False)),
        has_qk_norm=False,
        final_logit_softcap=None if final_cap is None else float(final_cap),
        layers=build_layers(
            c,
            kinds,
            {"": rope},
            window=window_of(d, "gemma2") if "sliding" in kinds else None,
            sm_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
            logit_softcap=None if softcap is None else float(softcap),
        ),
    )


class GemmaLayer(SandwichLayer):
    norm_cls = GemmaRMSNorm


class Gemma2ForCausalLM(CausalLM):
    layer_cls = GemmaLayer
    config_from_hf = staticmethod(gemma2_config)

    def embed_scale(self, config: ModelConfig) -> float:
        return config.hidden_size**0.5
