"""Phi-3 / Phi-3.5 / Phi-4-mini (model_type phi3): the Llama block with

- fused checkpoint tensors: `self_attn.qkv_proj` ([q; k; v] rows) and `mlp.gate_up_proj` ([gate; up]) are
  pie's own fused parameters, so they load 1:1 (kept fused); split q/k/v or gate/up tensors, as some
  conversions write, are packed by the shared `packed_modules_mapping`;
- partial rotary: RoPE on the first int(head_dim * partial_rotary_factor) dims of each head;
- LongRoPE (`longrope`, formerly `su`; Phi-3 also maps `yarn` to it): two sets of per-frequency factors
  and an attention factor sqrt(1 + ln(factor) / ln(original_max_position_embeddings)) on cos and sin,
  factor = max_position_embeddings / original_max_position_embeddings unless given;
- no biases; a sliding window (Phi-3-mini-4k: 2047) is honoured by capping the context at the window, where
  windowed and full attention agree, until pie's attention takes a window.

Short or long factors, per request of a batch. transformers picks them by `seq_len = max(position_ids) + 1`
of the forward call: long when seq_len > original_max_position_embeddings, for every token of the call.
pie applies that rule per request: all new tokens of a request use the long set when the request's
largest position in this batch is >= original_max_position_embeddings. A prefill equals transformers'
forward over the same tokens, and a decode step equals transformers' cached forward of that token. Keys
already in the KV cache are never recomputed: when a request crosses the switch while decoding, its earlier
keys keep the short set (as transformers' model forward with a cache does). `generate` in transformers
instead drops its cache at the crossing and re-encodes everything with the long set; an inferlet that
wants that re-prefills its context once it passes original_max_position_embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pie.attention.base import AttentionMetadata
from pie.errors import ModelError
from pie.layers.attention import ForwardContext
from pie.layers.decoder import CausalLM, DecoderModel
from pie.layers.longrope import PartialLongRope
from pie.models.config import ModelConfig

_LONGROPE_NAMES = ("longrope", "su", "yarn")  # transformers' Phi3Config maps "su" and "yarn" to longrope
_DEFAULT_ORIGINAL_MAX = 4096  # Phi3Config's default, used by transformers when config.json omits it


@dataclass(frozen=True)
class Phi3Rope:
    rotary_dim: int
    short_factor: tuple[float, ...] | None  # None: plain RoPE (no LongRoPE)
    long_factor: tuple[float, ...] | None
    original_max_position_embeddings: int
    attention_factor: float


def _factors(params: dict, key: str, rotary_dim: int) -> tuple[float, ...]:
    vals = params.get(key)
    if not isinstance(vals, list) or len(vals) != rotary_dim // 2:
        raise ModelError(
            f"phi3 longrope needs `{key}`: a list of rotary_dim / 2 = {rotary_dim // 2} numbers, got {vals!r}"
        )
    return tuple(float(v) for v in vals)


def adapt_phi3_config(d: dict) -> tuple[dict, dict]:
    """(the dict for ModelConfig's shared parsing, {"family": Phi3Rope, ...}) from a phi3 config.json."""
    for key in ("hidden_size", "num_attention_heads", "max_position_embeddings"):
        if not isinstance(d.get(key), int):
            raise ModelError(f"config.json (phi3) lacks required integer field {key!r}")
    # Phi3Config: rope_scaling (transformers 4) wins over rope_parameters (5); theta may sit at the top level.
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
    short = long = None
    attention_factor = 1.0
    if rope_type in _LONGROPE_NAMES:
        short, long = (
            _factors(params, "short_factor", rotary_dim),
            _factors(params, "long_factor", rotary_dim),
        )
        factor = params.get("factor") or max_pos / original_max
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
            )
    elif rope_type != "default":
        raise ModelError(f"phi3 rope type {rope_type!r} is not supported (supported: default, longrope/su)")
    out = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_parameters", "rope_theta")}
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}  # the shared parser's view
    out["attention_bias"] = False  # Phi-3 has no biases (its config carries no flag)
    window = d.get("sliding_window")
    if window is not None and int(window) < max_pos:
        # Each query sees the last `window` keys; below `window` positions that is every key, so capping
        # the context keeps results exact.
        out["max_position_embeddings"], out["sliding_window"] = int(window), None
    rope = Phi3Rope(rotary_dim, short, long, original_max, float(attention_factor))
    return out, {"family": rope}


def rope_index(
    positions: torch.Tensor, meta: AttentionMetadata, switch: int, long_offset: int
) -> torch.Tensor:
    """Rows of PartialLongRope's table for each token: position, plus long_offset for the tokens of requests
    whose largest position in this batch is >= switch. positions: [T] int64 -> [T] int64."""
    if meta.is_decode:  # one token per request (also inside CUDA graphs: no host sync, static shapes)
        return positions + (positions >= switch).long() * long_offset
    T, R = positions.shape[0], meta.num_requests
    tokens = torch.arange(T, device=positions.device, dtype=meta.qo_indptr.dtype)
    request = torch.searchsorted(meta.qo_indptr[1:].contiguous(), tokens, right=True)  # [T] request of token
    largest = torch.full((R,), -1, dtype=positions.dtype, device=positions.device)
    largest.scatter_reduce_(0, request, positions, reduce="amax")
    return positions + (largest[request] >= switch).long() * long_offset


class Phi3Model(DecoderModel):
    def __init__(self, config: ModelConfig) -> None:
        r: Phi3Rope = config.family
        rotary = PartialLongRope(
            config.head_dim,
            r.rotary_dim,
            config.max_position_embeddings,
            config.rope_theta,
            r.short_factor,
            r.long_factor,
            r.attention_factor,
        )
        super().__init__(config, rotary)
        self.switch = r.original_max_position_embeddings

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # the layers use positions only for RoPE, so they receive rows of the rotary table instead
        if self.rotary.has_long:
            positions = rope_index(positions, ctx.meta, self.switch, self.rotary.max_position)
        return super().forward(input_ids, positions, ctx)


class Phi3ForCausalLM(CausalLM):
    model_cls = Phi3Model
    # Hub checkpoints are already fused (qkv_proj, gate_up_proj: loaded 1:1); split ones are packed.
    packed_modules_mapping = CausalLM.packed_modules_mapping
    adapt_hf_config = staticmethod(adapt_phi3_config)

    def __init__(self, config: ModelConfig) -> None:
        if not isinstance(config.family, Phi3Rope):
            raise ModelError(
                "Phi3ForCausalLM needs a ModelConfig built by ModelConfig.from_hf (phi3 rope fields)"
            )
        super().__init__(config)
