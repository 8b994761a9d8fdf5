"""Mistral 3: ministral3 (Ministral 3 text models) and the text tower of the multimodal mistral3 wrapper
(Mistral Small 3.1/3.2, Ministral 3; its text_config is ministral3 or, in older checkpoints, mistral).

ministral3 is the Mistral block with YaRN rope and, where rope_parameters carry `llama_4_scaling_beta`,
queries scaled after RoPE by 1 + beta * log(1 + floor(pos / original_max_position_embeddings)); a set
`sliding_window` windows every layer (as transformers' Ministral3Model does). FP8 checkpoints
(`weight_scale_inv` beside each weight) are dequantized at load (pie.models.weights), or kept as FP8 with
their 128 x 128 block scales where torch's block-scaled GEMM runs (CUDA sm90; pie.layers.quant).
"""

from __future__ import annotations

from dataclasses import replace

from pie.layers.decoder import CausalLM
from pie.models.config import (
    ModelConfig,
    build_layers,
    common_fields,
    parse_rope,
    rope_dicts,
    text_config,
)
from pie.models.llama import dense_config

WRAPPER_PREFIXES = {
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
}


def ministral3_config(d: dict, model_type: str | None = None) -> ModelConfig:
    c = common_fields(d, d["model_type"])
    if model_type is not None:
        c["model_type"] = model_type
    rope = parse_rope(rope_dicts(d, 1_000_000.0)[""], c["max_position_embeddings"], "ministral3 rope")
    window = d.get("sliding_window")
    kinds = ["sliding" if window is not None else "full"] * c["num_layers"]
    return ModelConfig(
        **c,
        rope=rope,
        has_qkv_bias=False,
        has_o_bias=False,
        has_qk_norm=False,
        layers=build_layers(c, kinds, {"": rope}, window=None if window is None else int(window)),
    )


def mistral3_config(d: dict) -> ModelConfig:
    """model_type mistral3: its text tower's config under the wrapper's name."""
    tc = text_config(d, ("ministral3", "mistral"))
    if tc["model_type"] == "mistral":
        return replace(dense_config(tc), model_type=d["model_type"])
    return ministral3_config(tc, model_type=d["model_type"])


class Ministral3ForCausalLM(CausalLM):
    config_from_hf = staticmethod(ministral3_config)


class Mistral3ForConditionalGeneration(CausalLM):
    config_from_hf = staticmethod(mistral3_config)
    checkpoint_prefixes = WRAPPER_PREFIXES
