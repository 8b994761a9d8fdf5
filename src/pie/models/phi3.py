"""Phi-3 / Phi-3.5 / Phi-4-mini (model_type phi3): the Llama block with

- fused checkpoint tensors: `self_attn.qkv_proj` ([q; k; v] rows) and `mlp.gate_up_proj` ([gate; up]) are
  pie's own fused parameters, so they load 1:1 (kept fused); split q/k/v or gate/up tensors, as some
  conversions write, are packed by the shared `packed_modules_mapping`;
- partial rotary: RoPE on the first int(head_dim * partial_rotary_factor) dims of each head
  (RopeSpec.partial_rotary_factor);
- LongRoPE (`longrope`, formerly `su`; Phi-3 also maps `yarn` to it): the rope type "longrope" of
  pie.layers.rotary (short/long factor sets switched per request at original_max_position_embeddings), with
  attention factor sqrt(1 + ln(factor) / ln(original_max_position_embeddings)) on cos and sin,
  factor = max_position_embeddings / original_max_position_embeddings unless given;
- no biases; `sliding_window` (Phi-3-mini-4k: 2047) windows every layer, as transformers' Phi3 does.
"""

from __future__ import annotations

import math

from pie.errors import ModelError
from pie.layers.decoder import CausalLM
from pie.models.config import ModelConfig, RopeSpec
from pie.models.llama import dense_config

_LONGROPE_NAMES = ("longrope", "su", "yarn")  # transformers' Phi3Config maps "su" and "yarn" to longrope
_DEFAULT_ORIGINAL_MAX = 4096  # Phi3Config's default, used by transformers when config.json omits it


def _factors(params: dict, key: str, rotary_dim: int) -> tuple[float, ...]:
    vals = params.get(key)
    if not isinstance(vals, list) or len(vals) != rotary_dim // 2:
        raise ModelError(
            f"phi3 longrope needs `{key}`: a list of rotary_dim / 2 = {rotary_dim // 2} numbers, got {vals!r}"
        )
    return tuple(float(v) for v in vals)


def phi3_rope(d: dict) -> RopeSpec:
    """Phi-3's rope from either layout: rope_scaling (transformers 4) wins over rope_parameters (5); theta and
    partial_rotary_factor may sit at the top level."""
    for key in ("hidden_size", "num_attention_heads", "max_position_embeddings"):
        if not isinstance(d.get(key), int):
            raise ModelError(f"config.json (phi3) lacks required integer field {key!r}")
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ModelError("phi3 rope_scaling / rope_parameters must be a JSON object")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
    head_dim = int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"])
    rotary_dim = int(head_dim * partial)
    if rotary_dim < 2 or rotary_dim % 2:
        raise ModelError(
            f"partial_rotary_factor {partial} gives rotary_dim {rotary_dim}; it must be even and >= 2"
        )
    max_pos = int(d["max_position_embeddings"])
    original_max = int(d.get("original_max_position_embeddings") or _DEFAULT_ORIGINAL_MAX)
    common = dict(theta=theta, partial_rotary_factor=partial, original_max_position_embeddings=original_max)
    if rope_type == "default":
        return RopeSpec(**common)
    if rope_type not in _LONGROPE_NAMES:
        raise ModelError(f"phi3 rope type {rope_type!r} is not supported (supported: default, longrope/su)")
    factor = params.get("factor") or max_pos / original_max
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
    return RopeSpec(
        **common,
        rope_type="longrope",
        factor=float(factor),
        attention_factor=float(attention_factor),
        short_factor=_factors(params, "short_factor", rotary_dim),
        long_factor=_factors(params, "long_factor", rotary_dim),
    )


def phi3_config(d: dict) -> ModelConfig:
    # Phi-3 has no biases (its config carries no flag)
    return dense_config(d, qkv_bias=False, rope=phi3_rope(d))


class Phi3ForCausalLM(CausalLM):
    # Hub checkpoints are already fused (qkv_proj, gate_up_proj: loaded 1:1); split ones are packed.
    config_from_hf = staticmethod(phi3_config)
