"""Gemma 3 (gemma3_text, and the text tower of the multimodal gemma3): Gemma 2's block plus a per-head
(1 + w) RMSNorm on q and k; local (sliding) layers use rope θ `rope_local_base_freq` (default 10k) without
scaling, global layers θ `rope_theta` (default 1M) with the configured scaling; the sliding pattern comes from
`layer_types` or the older `sliding_window_pattern` (every 6th layer global). No attention soft-cap:
transformers' Gemma3Attention does not apply attn_logit_softcapping (hub configs set it null); the final
soft-cap is honoured when set.

The wrapper (model_type gemma3: `text_config` nested, weights under `model.language_model.*` or the older
`language_model.model.*`, a SigLIP vision tower and projector beside them) loads the text tower only.
"""

from __future__ import annotations

from pie.layers.decoder import CausalLM
from pie.models.config import (
    ModelConfig,
    build_layers,
    layer_kinds,
    parse_rope,
    text_config,
    window_of,
)
from pie.models.gemma2 import GemmaLayer, gemma_common

__all__ = ["Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "gemma3_text_config"]


def _ropes(d: dict, max_pos: int) -> dict[str, dict]:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = dict(params.get("full_attention") or {"rope_type": "default"})
        local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    else:  # older layout: rope_theta + rope_scaling (global layers) and rope_local_base_freq
        full = {**(d.get("rope_scaling") or {}), **(params or {})}
        local = {"rope_type": "default"}
        if "rope_local_base_freq" in d:
            local["rope_theta"] = d["rope_local_base_freq"]
    full.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    return {
        "full": parse_rope(full, max_pos, "gemma3 global rope"),
        "sliding": parse_rope(local, max_pos, "gemma3 local rope"),
    }


def gemma3_text_config(d: dict, model_type: str | None = None) -> ModelConfig:
    c = gemma_common(d)
    n = c["num_layers"]
    pattern = int(d.get("sliding_window_pattern") or 6)
    kinds = layer_kinds(d, n, ["sliding" if (i + 1) % pattern else "full" for i in range(n)])
    ropes = _ropes(d, c["max_position_embeddings"])
    final_cap = d.get("final_logit_softcapping")
    if model_type is not None:
        c["model_type"] = model_type
    return ModelConfig(
        **c,
        rope=ropes["full"],
        has_qkv_bias=bool(d.get("attention_bias", False)),
        has_o_bias=bool(d.get("attention_bias", False)),
        has_qk_norm=True,
        final_logit_softcap=None if final_cap is None else float(final_cap),
        layers=build_layers(
            c,
            kinds,
            ropes,
            window=window_of(d, "gemma3") if "sliding" in kinds else None,
            sm_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
        ),
    )


def gemma3_config(d: dict) -> ModelConfig:
    """model_type gemma3: the text tower's config (text_config) under the wrapper's name."""
    tc = text_config({"tie_word_embeddings": True, **d}, ("gemma3_text",))
    return gemma3_text_config(tc, model_type=d["model_type"])


class Gemma3ForCausalLM(CausalLM):
    layer_cls = GemmaLayer
    config_from_hf = staticmethod(gemma3_text_config)

    def embed_scale(self, config: ModelConfig) -> float:
        return config.hidden_size**0.5


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    config_from_hf = staticmethod(gemma3_config)
    checkpoint_prefixes = {
        "model.language_model.": "model.",
        "language_model.model.": "model.",
        "language_model.lm_head.": "lm_head.",
    }
