"""Gemma 4 (gemma4_text, and the text tower of the multimodal gemma4), as transformers' modeling_gemma4 runs it.

Per layer (Gemma4TextDecoderLayer):
    x = x + post_attn_norm(attn(input_norm(x)))
    h = mlp(pre_ff_norm(x))                                   dense GELU-tanh MLP, 2x wide on shared-KV
                                                              layers when use_double_wide_mlp
    [MoE] h = post_ff_norm_1(h) + post_ff_norm_2(experts(pre_ff_norm_2(x), router(x)))
    x = x + post_ff_norm(h)
    [PLE] x = x + post_ple_norm(ple_proj(gelu(ple_gate(x)) * ple_l))
    x = x * layer_scalar
Norms are plain RMSNorm (weight w, not Gemma 2/3's 1 + w), computed in fp32. Attention: q_norm and k_norm per
head, a scale-free v_norm, softmax scale 1.0, no attention soft-cap (final logit soft-cap when configured).
Sliding layers: head_dim / num_key_value_heads, rope `sliding_attention` (default θ 10k), window
`sliding_window`. Full (global) layers: head_dim `global_head_dim` (default 512) and, with attention_k_eq_v,
num_global_key_value_heads, where V is the raw K projection (v_proj absent) before k_norm and RoPE; rope
`full_attention`, "proportional" by default (only the first partial_rotary_factor of the frequencies rotate).
A per_layer_config table (what transformers 5.24 writes) overrides head_dim / num_key_value_heads per layer.

KV sharing: the last num_kv_shared_layers layers compute no K/V; each reads the cache of the last earlier
non-shared layer of its own attention kind (LayerSpec.kv_source), and the executor allocates it none.

Per-layer embeddings (PLE, hidden_size_per_layer_input P > 0): per token, ple = (norm(W_proj x0 / sqrt(H))
+ E_ple[id] * sqrt(P)) / sqrt(2), one P-vector per layer (x0: the scaled token embedding).

The wrapper (model_type gemma4: text_config nested, weights under model.language_model.*, vision and audio
towers beside them) loads the text tower only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pie.attention.base import append_kv
from pie.errors import ModelError
from pie.layers.attention import ForwardContext, attention_params
from pie.layers.decoder import CausalLM
from pie.layers.embedding import LMHead, ScaledVocabEmbedding
from pie.layers.gemma4_moe import Gemma4Experts, Gemma4Router, rms_normalize
from pie.layers.mlp import ACTIVATIONS, GatedMLP
from pie.layers.norm import RMSNorm
from pie.layers.rotary import RotaryCache
from pie.models.config import (
    LayerSpec,
    ModelConfig,
    common_fields,
    layer_kinds,
    parse_rope,
    text_config,
)
from pie.models.gemma2 import GELU_TANH

__all__ = ["Gemma4Config", "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration", "gemma4_text_config"]

# Gemma4TextConfig's defaults, for keys a config.json may leave out
_DEFAULTS = {
    "vocab_size": 262_144,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 30,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "sliding_window": 512,
    "vocab_size_per_layer_input": 262_144,
    "hidden_size_per_layer_input": 256,
    "bos_token_id": 2,
    "eos_token_id": 1,
}
_DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
_KIND_KEY = {"full": "full_attention", "sliding": "sliding_attention"}
_PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")


@dataclass(frozen=True)
class Gemma4Config(ModelConfig):
    """ModelConfig plus what only Gemma 4 has (per layer where it varies)."""

    ple_dim: int = 0  # hidden_size_per_layer_input (0: no per-layer embeddings)
    ple_vocab: int = 0  # vocab_size_per_layer_input
    attention_k_eq_v: bool = False  # V = raw K projection on full-attention layers
    layer_intermediate: tuple[
        int, ...
    ] = ()  # dense MLP width per layer (2x on shared-KV layers if double-wide)
    num_experts: int = 0  # 0: no MoE block
    top_k_experts: int = 0
    moe_intermediate_size: int = 0


def _num(d: dict, key: str, model_type: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ModelError(f"{model_type}: {key} must be a positive integer, got {v!r}")
    return v


def _per_layer_shapes(d: dict, kinds: list[str], head_dim: int, kv_heads: int) -> list[tuple[int, int]]:
    """(head_dim, num_kv_heads) per layer: per_layer_config when present, else global_head_dim and (with
    attention_k_eq_v) num_global_key_value_heads on full-attention layers, as Gemma4TextConfig derives them."""
    plc = d.get("per_layer_config")
    if plc is not None:
        if not isinstance(plc, dict):
            raise ModelError("gemma4: per_layer_config must be an object of layer index -> overrides")
        shapes = [(head_dim, kv_heads)] * len(kinds)
        for key, over in plc.items():
            try:
                i = int(key)
            except (TypeError, ValueError):
                raise ModelError(f"gemma4: per_layer_config key {key!r} is not a layer index") from None
            if not 0 <= i < len(kinds) or not isinstance(over, dict):
                raise ModelError(
                    f"gemma4: per_layer_config entry {key!r} is not a layer index with an object"
                )
            bad = sorted(set(over) - set(_PER_LAYER_KEYS))
            if bad:
                raise ModelError(
                    f"gemma4: per_layer_config overrides {', '.join(bad)} are not supported "
                    f"(supported: {', '.join(_PER_LAYER_KEYS)})"
                )
            shapes[i] = (int(over.get("head_dim", head_dim)), int(over.get("num_key_value_heads", kv_heads)))
        return shapes
    global_hd = int(d.get("global_head_dim") or 512)
    global_kv = d.get("num_global_key_value_heads") if d.get("attention_k_eq_v") else None
    full = (global_hd, int(global_kv) if global_kv is not None else kv_heads)
    return [full if k == "full" else (head_dim, kv_heads) for k in kinds]


def _kv_sources(kinds: list[str], num_shared: int) -> list[int | None]:
    """Per layer, the layer whose cache it reads (transformers' kv_sharing_modes): the last non-shared layer
    of the same kind before the shared band; None for layers that own their cache."""
    n = len(kinds)
    if not 0 <= num_shared < n:
        raise ModelError(
            f"gemma4: num_kv_shared_layers {num_shared} must be in 0..{n - 1} (num_hidden_layers {n}); with every "
            "layer shared no layer would produce a KV cache"
        )
    first = n - num_shared
    last_of = {k: i for i, k in enumerate(kinds[:first])}
    out: list[int | None] = [None] * n
    for i in range(first, n):
        if kinds[i] not in last_of:
            raise ModelError(
                f"gemma4: shared-KV layer {i} is {_KIND_KEY[kinds[i]]} but no earlier non-shared layer of that "
                "kind produces a cache (check layer_types and num_kv_shared_layers)"
            )
        out[i] = last_of[kinds[i]]
    return out


def gemma4_text_config(d: dict, model_type: str | None = None) -> Gemma4Config:
    mt = d["model_type"]
    d = {**_DEFAULTS, **d}  # defaults for absent keys only: an explicit null (e.g. no PLE) stays null
    bidir = d.get("use_bidirectional_attention")
    if bidir == "all":
        raise ModelError(f"{mt} with use_bidirectional_attention='all' is an encoder, not a causal LM")
    c = common_fields(d, mt, acts=GELU_TANH)
    if model_type is not None:
        c["model_type"] = model_type
    n, hd, kv = c["num_layers"], c["head_dim"], c["num_kv_heads"]
    kinds = layer_kinds(d, n, ["sliding" if (i + 1) % 6 else "full" for i in range(n)])
    kinds[-1] = "full"  # transformers forces the last layer to full attention
    params = d.get("rope_parameters") or _DEFAULT_ROPE
    if not isinstance(params, dict) or not any(k in params for k in _KIND_KEY.values()):
        raise ModelError(
            f"{mt}: rope_parameters must be nested by layer type (full_attention / sliding_attention)"
        )
    ropes = {}
    for kind in set(kinds):
        p = params.get(_KIND_KEY[kind])
        if not isinstance(p, dict):
            raise ModelError(f"{mt}: rope_parameters has no {_KIND_KEY[kind]!r} entry for its {kind} layers")
        ropes[kind] = parse_rope(p, c["max_position_embeddings"], f"{mt} {_KIND_KEY[kind]} rope")
    window = _num(d, "sliding_window", mt) if "sliding" in kinds else None
    shapes = _per_layer_shapes(d, kinds, hd, kv)
    sources = _kv_sources(kinds, int(d.get("num_kv_shared_layers") or 0))
    layers = []
    for i, kind in enumerate(kinds):
        lhd, lkv = shapes[i]
        if c["num_heads"] % lkv:
            raise ModelError(f"{mt}: layer {i} has {lkv} KV heads, not a divisor of {c['num_heads']} heads")
        layers.append(
            LayerSpec(
                attention=kind,
                num_heads=c["num_heads"],
                num_kv_heads=lkv,
                head_dim=lhd,
                rope=ropes[kind],
                sm_scale=1.0,  # q_norm / k_norm replace the 1/sqrt(D) scale
                sliding_window=window if kind == "sliding" else None,
                kv_source=sources[i],
            )
        )
    for i, src in enumerate(sources):  # a shared layer reads its source's cache: shapes must agree
        if src is not None and shapes[i] != shapes[src]:
            raise ModelError(f"{mt}: shared-KV layer {i} differs in KV shape from its source layer {src}")
    double = bool(d.get("use_double_wide_mlp"))
    inter = c["intermediate_size"]
    moe = bool(d.get("enable_moe_block"))
    ple_dim = int(d.get("hidden_size_per_layer_input") or 0)
    ple_vocab = int(d.get("vocab_size_per_layer_input") or 0) if ple_dim else 0
    if ple_dim and ple_vocab < c["vocab_size"]:
        raise ModelError(
            f"{mt}: vocab_size_per_layer_input {ple_vocab} < vocab_size {c['vocab_size']}: tokens past it would "
            "have no per-layer embedding"
        )
    cap = d.get("final_logit_softcapping")
    bias = bool(d.get("attention_bias", False))
    return Gemma4Config(
        **c,
        rope=layers[0].rope,
        has_qkv_bias=bias,
        has_o_bias=bias,
        has_qk_norm=True,
        final_logit_softcap=None if cap is None else float(cap),
        layers=tuple(layers),
        ple_dim=ple_dim,
        ple_vocab=ple_vocab,
        attention_k_eq_v=bool(d.get("attention_k_eq_v")),
        layer_intermediate=tuple(2 * inter if double and s is not None else inter for s in sources),
        num_experts=_num(d, "num_experts", mt) if moe else 0,
        top_k_experts=_num(d, "top_k_experts", mt) if moe else 0,
        moe_intermediate_size=_num(d, "moe_intermediate_size", mt) if moe else 0,
    )


def gemma4_config(d: dict) -> Gemma4Config:
    """model_type gemma4: the text tower's config (text_config) under the wrapper's name."""
    tc = text_config({"tie_word_embeddings": True, **d}, ("gemma4_text",))
    return gemma4_text_config(tc, model_type=d["model_type"])


# ---- modules --------------------------------------------------------------------------------------------


class Gemma4RMSNorm(RMSNorm):
    """transformers' Gemma4RMSNorm: fp32 x * (mean(x^2) + eps)^-0.5 * w, cast back last (plain w, init 1)."""

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return (xf * self.weight.float()).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x: [..., dim] -> [..., dim] (no fused residual add: Gemma 4's blocks add after the norm)."""
        return self._norm(x)


class Gemma4Attention(nn.Module):
    """q/k/v projections kept separate (shared-KV layers have only q; k_eq_v layers have no v)."""

    def __init__(self, config: Gemma4Config, layer_idx: int, rotary: RotaryCache) -> None:
        super().__init__()
        spec = config.layers[layer_idx]
        H, eps, bias = config.hidden_size, config.rms_norm_eps, config.has_qkv_bias
        self.layer_idx, self.kv_source, self.eps = layer_idx, spec.kv_source, eps
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.rotary = rotary.get(spec.head_dim, spec.rope)
        self.params = attention_params(spec)
        self.q_proj = nn.Linear(H, spec.num_heads * spec.head_dim, bias=bias)
        self.q_norm = Gemma4RMSNorm(spec.head_dim, eps)
        self.k_proj = self.v_proj = self.k_norm = None
        if spec.kv_source is None:
            kv_dim = spec.num_kv_heads * spec.head_dim
            self.k_proj = nn.Linear(H, kv_dim, bias=bias)
            k_eq_v = config.attention_k_eq_v and spec.attention == "full"
            self.v_proj = None if k_eq_v else nn.Linear(H, kv_dim, bias=bias)
            self.k_norm = Gemma4RMSNorm(spec.head_dim, eps)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, H, bias=config.has_o_bias)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """positions: [T]; x: [T, H] -> [T, H]."""
        T = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(T, self.num_heads, self.head_dim))
        if self.kv_source is not None:  # shared KV: read the source layer's cache, write nothing
            q, _ = self.rotary(positions, q, q[:, :1])
            kv_cache = ctx.kv_caches[self.kv_source]
        else:
            k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
            v = k if self.v_proj is None else self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
            q, k = self.rotary(positions, q, self.k_norm(k))
            v = rms_normalize(v, self.eps)
            kv_cache = ctx.kv_caches[self.layer_idx]
            append_kv(kv_cache, k, v, ctx.meta, ctx.backend.kv_scale(self.layer_idx))
        o = ctx.backend.run(q, kv_cache, self.layer_idx, self.params)  # [T, Hq, D]
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))


class Gemma4Layer(nn.Module):
    def __init__(self, config: Gemma4Config, layer_idx: int, rotary: RotaryCache) -> None:
        super().__init__()
        c, H, eps = config, config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma4Attention(c, layer_idx, rotary)
        self.mlp = GatedMLP(H, c.layer_intermediate[layer_idx], c.hidden_act)
        self.input_layernorm = Gemma4RMSNorm(H, eps)
        self.post_attention_layernorm = Gemma4RMSNorm(H, eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(H, eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(H, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1))
        self.moe = c.num_experts > 0
        if self.moe:
            self.router = Gemma4Router(H, c.num_experts, c.top_k_experts, eps)
            self.experts = Gemma4Experts(H, c.moe_intermediate_size, c.num_experts, c.hidden_act)
            self.post_feedforward_layernorm_1 = Gemma4RMSNorm(H, eps)
            self.post_feedforward_layernorm_2 = Gemma4RMSNorm(H, eps)
            self.pre_feedforward_layernorm_2 = Gemma4RMSNorm(H, eps)
        self.ple = c.ple_dim > 0
        if self.ple:
            self.act = ACTIVATIONS[c.hidden_act]
            self.per_layer_input_gate = nn.Linear(H, c.ple_dim, bias=False)
            self.per_layer_projection = nn.Linear(c.ple_dim, H, bias=False)
            self.post_per_layer_input_norm = Gemma4RMSNorm(H, eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, ple: torch.Tensor | None, ctx: ForwardContext
    ) -> torch.Tensor:
        """x: [T, H]; ple: [T, P] this layer's per-layer input (None without PLE) -> [T, H]."""
        x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), ctx))
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:  # the router and experts read the block's input x, not the dense MLP's
            weights, ids = self.router(x)
            e = self.experts(self.pre_feedforward_layernorm_2(x), weights, ids)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(e)
        x = x + self.post_feedforward_layernorm(h)
        if self.ple:
            g = self.act(self.per_layer_input_gate(x)) * ple
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar


class Gemma4TextModel(nn.Module):
    def __init__(self, config: Gemma4Config) -> None:
        super().__init__()
        c = config
        self.config = c
        self.rotary = RotaryCache(c.max_position_embeddings)
        self.embed_tokens = ScaledVocabEmbedding(c.vocab_size, c.hidden_size, c.hidden_size**0.5)
        self.layers = nn.ModuleList(Gemma4Layer(c, i, self.rotary) for i in range(c.num_layers))
        self.norm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.ple_dim:
            LP = c.num_layers * c.ple_dim
            self.embed_tokens_per_layer = ScaledVocabEmbedding(c.ple_vocab, LP, c.ple_dim**0.5)
            self.per_layer_model_projection = nn.Linear(c.hidden_size, LP, bias=False)
            self.per_layer_projection_norm = Gemma4RMSNorm(c.ple_dim, c.rms_norm_eps)

    def per_layer_inputs(self, input_ids: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """[T] ids, [T, H] scaled embeddings -> [T, L, P] (transformers' get_ + project_per_layer_inputs)."""
        c = self.config
        shape = (x0.shape[0], c.num_layers, c.ple_dim)
        tok = self.embed_tokens_per_layer(input_ids).reshape(shape)
        proj = self.per_layer_model_projection(x0) * c.hidden_size**-0.5
        proj = self.per_layer_projection_norm(proj.reshape(shape))
        return (proj + tok) * 2.0**-0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, H]
        ple = self.per_layer_inputs(input_ids, x) if self.config.ple_dim else None
        for i, layer in enumerate(self.layers):
            x = layer(positions, x, None if ple is None else ple[:, i], ctx)
        return self.norm(x)


class Gemma4ForCausalLM(CausalLM):
    config_from_hf = staticmethod(gemma4_text_config)
    supports_tensor_parallel = False  # its attention, per-layer embeddings and MoE are not split yet
    # q/k/v stay separate (shared-KV layers have q only, k_eq_v layers no v); gate/up are fused
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: ModelConfig) -> None:
        if not isinstance(config, Gemma4Config):
            raise ModelError("Gemma4ForCausalLM needs a config normalized by gemma4_text_config")
        nn.Module.__init__(self)
        self.config = config
        self.model = Gemma4TextModel(config)
        # tied (every Gemma 4 checkpoint): compute_logits reads the embedding matrix
        self.lm_head = None if config.tie_word_embeddings else LMHead(config.hidden_size, config.vocab_size)


class Gemma4ForConditionalGeneration(Gemma4ForCausalLM):
    config_from_hf = staticmethod(gemma4_config)
    checkpoint_prefixes = {"model.language_model.": "model."}
