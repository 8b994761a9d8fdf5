"""GPT-OSS (model_type gpt_oss, also spelled gptoss): gpt-oss-20b / -120b.

The pre-norm block with:
- attention: bias on q/k/v/o (`attention_bias`, default true); a learned sink logit per query head on every
  layer (`self_attn.sinks`: it joins the softmax denominator and carries no value); sliding (window
  `sliding_window`, default 128) and full layers from `layer_types` (older configs: even layers slide);
  softmax scale head_dim^-1/2;
- rope: YaRN as configured (the hub's: factor 32, original context 4096, beta 32 / 1, `truncate` false), on
  every layer; a config without rope keys gets transformers' GptOssConfig default (that YaRN, θ 150000);
- MoE on every layer: router logits x @ W.T + b, the top `num_experts_per_tok` logits, a softmax over those
  k; experts with biases and the clamped SwiGLU (gate clamped from above at `swiglu_limit`, up to
  [-limit, limit], (up + 1) * gate * sigmoid(`swiglu_alpha` * gate), alpha 1.702);
- checkpoints: transformers' layout (`mlp.router.*`; `mlp.experts.gate_up_proj` [E, H, 2I] with gate and up
  interleaved column by column, `down_proj` [E, I, H], used as x @ W) is converted at load to pie's stacked
  [E, 2I, H] (gate rows, then up rows) and [E, H, I]; MXFP4 expert checkpoints (the hub's:
  `gate_up_proj_blocks` / `_scales`, `down_proj_blocks` / `_scales`) are dequantized at load
  (models/weights.py), so experts take bf16 memory until MXFP4 GEMMs exist.
"""

from __future__ import annotations

import torch

from pie.errors import ModelError
from pie.layers.decoder import CausalLM
from pie.models.config import (
    ModelConfig,
    MoEConfig,
    build_layers,
    common_fields,
    layer_kinds,
    parse_rope,
    rope_dicts,
    window_of,
)
from pie.models.mixtral import check_top_k, int_field

DEFAULT_THETA = 150_000.0
# transformers' GptOssConfig.__post_init__ when config.json has no rope keys
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}  # fmt: skip
DEFAULTS = {"rms_norm_eps": 1e-5, "sliding_window": 128, "attention_bias": True, "head_dim": 64}


def gpt_oss_config(d: dict) -> ModelConfig:
    model_type = d["model_type"]
    quant = d.get("quantization_config") or {}
    if quant and quant.get("quant_method") != "mxfp4":
        raise ModelError(
            f"{model_type} quantization_config {quant.get('quant_method')!r} is not supported (pie reads bf16 "
            "and MXFP4 checkpoints)"
        )
    d = {**DEFAULTS, **d}
    c = common_fields(d, model_type)
    n = c["num_layers"]
    kinds = layer_kinds(d, n, ["sliding" if (i + 1) % 2 else "full" for i in range(n)])
    if d.get("rope_parameters") is None and d.get("rope_scaling") is None:
        d = {**d, "rope_parameters": {**DEFAULT_ROPE, "rope_theta": d.get("rope_theta", DEFAULT_THETA)}}
    rope = parse_rope(rope_dicts(d, DEFAULT_THETA)[""], c["max_position_embeddings"], f"{model_type} rope")
    num_experts = int_field(d, "num_local_experts", "num_experts")
    top_k = int_field(d, "num_experts_per_tok", "experts_per_token")
    check_top_k(top_k, num_experts)
    limit = d.get("swiglu_limit", 7.0)
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_intermediate_size=c["intermediate_size"],
        renormalize=False,  # the softmax over the k chosen logits already sums to 1
        weights_in_activation_dtype=True,  # transformers' softmax keeps the logits' dtype
        router="topk_softmax",
        activation="swiglu_oai",
        bias=True,
        swiglu_limit=None if limit is None else float(limit),
        swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
    )
    bias = bool(d["attention_bias"])
    return ModelConfig(
        **c,
        rope=rope,
        has_qkv_bias=bias,
        has_o_bias=bias,
        has_qk_norm=False,
        moe=moe,
        layers=build_layers(
            c,
            kinds,
            {"": rope},
            window=window_of(d, model_type) if "sliding" in kinds else None,
            sparse_layers=tuple(range(n)),
            has_sinks=True,
        ),
    )


def _gate_up_weight(w: torch.Tensor) -> torch.Tensor:
    """transformers' [E, H, 2I] (columns gate0, up0, gate1, up1, ...) -> pie's [E, 2I, H] (gate rows, up rows)."""
    return torch.cat([w[..., 0::2], w[..., 1::2]], dim=-1).transpose(1, 2).contiguous()


def _gate_up_bias(b: torch.Tensor) -> torch.Tensor:
    """[E, 2I] interleaved -> [E, 2I] gate then up."""
    return torch.cat([b[..., 0::2], b[..., 1::2]], dim=-1)


def _down_weight(w: torch.Tensor) -> torch.Tensor:
    """transformers' [E, I, H] (used as h @ W) -> pie's [E, H, I] (used as h @ W.T)."""
    return w.transpose(1, 2).contiguous()


class GptOssForCausalLM(CausalLM):
    config_from_hf = staticmethod(gpt_oss_config)
    checkpoint_renames = {".mlp.router.": ".mlp.gate."}
    checkpoint_transforms = {
        ".mlp.experts.gate_up_proj": _gate_up_weight,
        ".mlp.experts.gate_up_proj_bias": _gate_up_bias,
        ".mlp.experts.down_proj": _down_weight,
    }
