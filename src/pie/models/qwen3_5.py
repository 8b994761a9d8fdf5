"""Qwen 3.5 (qwen3_5_text, and the text tower of the multimodal qwen3_5): a hybrid decoder.

Layers are Gated DeltaNet (`linear_attention`: causal conv + gated delta rule, per-sequence recurrent state in
the executor's state pool, no KV pages) or gated full attention (`full_attention`, every
`full_attention_interval`-th layer by default: q/k per-head (1 + w) RMSNorm, partial rotary, an output gate
from q_proj). Pre-norm blocks with (1 + w) RMSNorms (transformers' Qwen3_5RMSNorm, zero-centered weights),
SwiGLU MLP.

Rope: transformers computes 3-D mrope (temporal, height, width sections interleaved). For text-only input
every section gets the same position, so it is exactly 1-D rope over the rotary dims
(head_dim * partial_rotary_factor); pie passes text positions only.

The wrapper (model_type qwen3_5: `text_config` nested, weights under `model.language_model.*`, a vision tower
under `model.visual.*` and multi-token-prediction weights `mtp.*` beside them) loads the text tower only.
"""

from __future__ import annotations

import torch

from pie.errors import ModelError
from pie.layers.attention import ForwardContext
from pie.layers.decoder import CausalLM, PreNormLayer
from pie.layers.gated_attention import GatedAttention
from pie.layers.gated_deltanet import GatedDeltaNet
from pie.layers.norm import GemmaRMSNorm
from pie.layers.rotary import RotaryCache
from pie.models.config import (
    GatedDeltaNetConfig,
    LayerSpec,
    ModelConfig,
    RopeSpec,
    common_fields,
    layer_kinds,
    req,
    text_config,
)

__all__ = ["Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration", "qwen3_5_text_config"]

_LAYER_TYPES = {"linear_attention": "gated_deltanet", "full_attention": "attention"}


def _rope(d: dict, model_type: str) -> RopeSpec:
    """Default rope with partial rotary (both layouts: rope_parameters, or rope_theta / rope_scaling /
    partial_rotary_factor at the top level)."""
    p = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ModelError(f"{model_type}: rope type {rope_type!r} is not supported (supported: default)")
    theta = float(p.get("rope_theta", d.get("rope_theta", 10_000_000.0)))
    factor = float(p.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25)))
    return RopeSpec(theta=theta, partial_rotary_factor=factor)


def _mixers(d: dict, n: int, model_type: str) -> list[str]:
    interval = int(d.get("full_attention_interval", 4))
    default = ["attention" if (i + 1) % interval == 0 else "gated_deltanet" for i in range(n)]
    return layer_kinds(d, n, default, _LAYER_TYPES, model_type)


def qwen3_5_text_config(d: dict, model_type: str | None = None) -> ModelConfig:
    mt = d["model_type"]
    c = common_fields(d, mt)
    if model_type is not None:
        c["model_type"] = model_type
    rope = _rope(d, mt)
    gdn = GatedDeltaNetConfig(
        num_k_heads=int(d.get("linear_num_key_heads", 16)),
        num_v_heads=int(d.get("linear_num_value_heads", 32)),
        head_k_dim=int(d.get("linear_key_head_dim", 128)),
        head_v_dim=int(d.get("linear_value_head_dim", 128)),
        conv_kernel=int(d.get("linear_conv_kernel_dim", 4)),
    )
    if gdn.num_v_heads % gdn.num_k_heads:
        raise ModelError(
            f"{mt}: linear_num_value_heads {gdn.num_v_heads} is not a multiple of linear_num_key_heads "
            f"{gdn.num_k_heads}"
        )
    if gdn.conv_kernel < 2:
        raise ModelError(f"{mt}: linear_conv_kernel_dim must be >= 2, got {gdn.conv_kernel}")
    req(d, "head_dim", mt)
    layers = tuple(
        LayerSpec(
            attention="full",
            num_heads=c["num_heads"],
            num_kv_heads=c["num_kv_heads"],
            head_dim=c["head_dim"],
            rope=rope,
            sm_scale=c["head_dim"] ** -0.5,
            mixer=mixer,
        )
        for mixer in _mixers(d, c["num_layers"], mt)
    )
    bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        **c,
        rope=rope,
        has_qkv_bias=bias,
        has_o_bias=bias,
        has_qk_norm=True,
        layers=layers,
        gated_deltanet=gdn,
    )


def qwen3_5_config(d: dict) -> ModelConfig:
    """model_type qwen3_5: the text tower's config (text_config) under the wrapper's name."""
    tc = text_config(d, ("qwen3_5_text",))
    return qwen3_5_text_config(tc, model_type=d["model_type"])


class Qwen3_5Layer(PreNormLayer):
    """x -> x + mixer(norm(x)) -> x + mlp(norm(x)), the mixer being linear_attn (Gated DeltaNet) or
    self_attn (gated attention) as the layer's spec says. Returns (x, residual) like PreNormLayer."""

    norm_cls = GemmaRMSNorm
    attention_cls = GatedAttention

    def make_mixer(self, config: ModelConfig, layer_idx: int, rotary: RotaryCache) -> None:
        self.is_recurrent = config.layers[layer_idx].mixer == "gated_deltanet"
        if not self.is_recurrent:
            super().make_mixer(config, layer_idx, rotary)
            return
        assert config.gated_deltanet is not None
        state_index = config.recurrent_layers.index(layer_idx)
        self.linear_attn = GatedDeltaNet(
            config.hidden_size, config.gated_deltanet, state_index, config.rms_norm_eps
        )

    def mix(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if not self.is_recurrent:
            return self.self_attn(positions, x, ctx)
        if ctx.recurrent is None:
            raise ModelError("Gated DeltaNet layers need the executor's state pool (ctx.recurrent)")
        return self.linear_attn(x, ctx.recurrent)


class Qwen3_5ForCausalLM(CausalLM):
    supports_tensor_parallel = False  # Gated DeltaNet and gated attention are not split across ranks yet
    layer_cls = Qwen3_5Layer  # type: ignore[assignment]
    config_from_hf = staticmethod(qwen3_5_text_config)
    packed_modules_mapping = {
        **CausalLM.packed_modules_mapping,
        "in_proj_qkv": ("in_proj", "qkv"),
        "in_proj_z": ("in_proj", "z"),
        "in_proj_b": ("in_proj", "b"),
        "in_proj_a": ("in_proj", "a"),
    }


class Qwen3_5ForConditionalGeneration(Qwen3_5ForCausalLM):
    config_from_hf = staticmethod(qwen3_5_config)
    checkpoint_prefixes = {"model.language_model.": "model."}
