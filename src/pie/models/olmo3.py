"""OLMo 3: post-norm blocks (x + norm(attn(x)), x + norm(mlp(x)); no input norms), RMSNorm on q and k over
the whole projection before the head split (unlike Qwen3/Gemma 3, not per head), SwiGLU MLP, sliding /
full layers from `layer_types` (older configs: every 4th layer full), and the configured rope scaling
(YaRN on the hub's checkpoints) on full-attention layers only; sliding layers use plain rope with the same θ.
"""

from __future__ import annotations

from pie.layers.decoder import CausalLM, PostNormLayer
from pie.models.config import (
    ModelConfig,
    build_layers,
    common_fields,
    layer_kinds,
    parse_rope,
    window_of,
)

DEFAULT_THETA = 500_000.0


def _ropes(d: dict, max_pos: int) -> dict:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = dict(params.get("full_attention") or {"rope_type": "default"})
        local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    else:  # older layout: rope_theta for both kinds, rope_scaling on full layers only
        full = {**(d.get("rope_scaling") or {}), **(params or {})}
        local = {"rope_type": "default"}
    theta = d.get("rope_theta", full.get("rope_theta", DEFAULT_THETA))
    full.setdefault("rope_theta", theta)
    local.setdefault("rope_theta", theta)
    return {
        "full": parse_rope(full, max_pos, "olmo3 full-attention rope"),
        "sliding": parse_rope(local, max_pos, "olmo3 sliding-attention rope"),
    }


def olmo3_config(d: dict) -> ModelConfig:
    c = common_fields({"rms_norm_eps": 1e-5, **d}, d["model_type"])
    n = c["num_layers"]
    kinds = layer_kinds(d, n, ["sliding" if (i + 1) % 4 else "full" for i in range(n)])
    ropes = _ropes(d, c["max_position_embeddings"])
    bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        **c,
        rope=ropes["full"],
        has_qkv_bias=bias,
        has_o_bias=bias,
        has_qk_norm=True,
        layers=build_layers(c, kinds, ropes, window=window_of(d, "olmo3") if "sliding" in kinds else None),
    )


class Olmo3ForCausalLM(CausalLM):
    layer_cls = PostNormLayer
    config_from_hf = staticmethod(olmo3_config)
