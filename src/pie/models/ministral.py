"""Ministral (model_type ministral, e.g. Ministral-8B-Instruct-2410): the Mistral block with per-layer
sliding / full attention from `layer_types` (older configs: every layer slides when `sliding_window` is
set)."""

from __future__ import annotations

from pie.layers.decoder import CausalLM
from pie.models.config import (
    ModelConfig,
    build_layers,
    common_fields,
    layer_kinds,
    parse_rope,
    rope_dicts,
    window_of,
)


def ministral_config(d: dict) -> ModelConfig:
    model_type = d["model_type"]
    c = common_fields(d, model_type)
    n = c["num_layers"]
    default = ["sliding" if d.get("sliding_window") is not None else "full"] * n
    kinds = layer_kinds(d, n, default)
    rope = parse_rope(rope_dicts(d)[""], c["max_position_embeddings"], f"{model_type} rope")
    return ModelConfig(
        **c,
        rope=rope,
        has_qkv_bias=False,  # transformers' MinistralAttention: never a bias, whatever attention_bias says
        has_o_bias=False,
        has_qk_norm=False,
        layers=build_layers(
            c, kinds, {"": rope}, window=window_of(d, model_type) if "sliding" in kinds else None
        ),
    )


class MinistralForCausalLM(CausalLM):
    config_from_hf = staticmethod(ministral_config)
