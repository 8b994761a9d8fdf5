"""ModelConfig: an HF config.json normalized once, so model code reads plain fields.

The common fields (sizes, vocab, eps, ids) are parsed here; what varies by family is parsed by the family's
own file (pie.models.<family>.config_from_hf), which calls the helpers below. What varies per layer (attention
kind, window, head dims, KV heads, rope, soft-cap, scale, sinks) lives in `ModelConfig.layers`, one LayerSpec
per layer, so model code never calls getattr(config, ..., default).

Both config layouts hub checkpoints carry are accepted: transformers-5 `rope_parameters` (flat, or nested by
layer type) / `layer_types`, and the older `rope_theta` / `rope_scaling` / `sliding_window_pattern` keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pie.errors import ModelError

# Rope types parse_rope accepts (pie.layers.rotary); anything else (dynamic, longrope, ...) is rejected by name
# rather than silently computed wrong. LongRoPE is a rope type too (RopeSpec.rope_type "longrope"), parsed by
# the one family that ships it (models/phi3.py), whose config layout and defaults are its own.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")
MLP_KINDS = ("dense", "sparse")
# token mixers: softmax attention over the paged KV cache, or Gated DeltaNet (a recurrent layer whose
# per-sequence state lives in the executor's state pool instead of KV pages: Qwen 3.5)
MIXERS = ("attention", "gated_deltanet")
ATTENTION_KINDS = ("full", "sliding")
# HF layer_types spellings -> pie attention kinds
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


@dataclass(frozen=True)
class RopeSpec:
    """One layer's rotary parameters, as transformers' modeling_rope_utils reads them.

    default: inv_freq = theta^(-2i/D). linear: inv_freq / factor. llama3: long wavelengths divided by
    `factor`, smooth band between low/high_freq_factor. yarn: NTK-by-parts blend of interpolated and
    extrapolated frequencies (beta_fast/beta_slow, `truncate`), cos/sin scaled by the attention factor
    (explicit, or from mscale / mscale_all_dim). llama_4_scaling_beta (Mistral 3): queries are scaled by
    1 + beta * log(1 + floor(pos / original_max_position_embeddings)) after RoPE.

    longrope (Phi-3): inv_freq = 1 / (ext[i] * theta^(2i/d)) with ext = short_factor, or long_factor for the
    tokens of a request whose largest position in the batch is >= original_max_position_embeddings; cos/sin
    scaled by attention_factor. partial_rotary_factor: only the first int(head_dim * factor) dims rotate.
    proportional (Gemma 4 global layers): only the first int(partial_rotary_factor * D / 2) frequencies
    rotate, with exponents over the whole head_dim D (theta^(-2i/D)); the remaining pairs get frequency 0
    (pass through), all / factor. Unlike longrope's partial rotary, every dim is in the rotation.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    llama_4_scaling_beta: float | None = None
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None  # longrope
    partial_rotary_factor: float = 1.0

    def rotary_dim(self, head_dim: int) -> int:
        if self.rope_type == "proportional":  # the factor zeroes frequencies instead (see above)
            return head_dim
        return int(head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class MoEConfig:
    """Sparse mixture-of-experts MLPs (Mixtral, Qwen3-MoE, GPT-OSS): a router picks `top_k` of `num_experts`
    gated experts per token. Which layers are sparse is per layer (LayerSpec.mlp); this holds what every
    sparse layer of the model shares.

    router: "softmax_topk" (softmax over all experts in fp32, then the top k, optionally renormalized) or
    "topk_softmax" (GPT-OSS: the top k logits, then a softmax over those k).
    activation: "silu" (SwiGLU: silu(gate) * up) or "swiglu_oai" (GPT-OSS: gate, up clamped to
    `swiglu_limit`, gate * sigmoid(alpha * gate) * (up + 1)). bias: router and experts carry biases."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    renormalize: bool  # divide the top-k probabilities by their sum (Mixtral always; Qwen3 `norm_topk_prob`)
    # True: routing weights are cast to the activation dtype before scaling the experts' outputs (Qwen);
    # False: they stay fp32 (Mixtral). Only matters below fp32.
    weights_in_activation_dtype: bool
    router: str = "softmax_topk"
    activation: str = "silu"
    bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer's attention, normalized."""

    attention: str  # "full" | "sliding"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec
    sm_scale: float  # softmax scale of q.k (head_dim**-0.5, or Gemma's query_pre_attn_scalar**-0.5)
    sliding_window: int | None = None  # tokens a query sees, itself included (HF: q - kv < window)
    logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax
    has_sinks: bool = False  # a learned per-head sink logit joins the softmax (GPT-OSS)
    mlp: str = "dense"  # "dense" (GatedMLP of intermediate_size) | "sparse" (ModelConfig.moe's experts)
    # Shared KV (Gemma 4): the earlier layer whose KV cache this layer reads; it computes and writes no K/V
    # of its own, and the executor allocates it no KV memory. None: the layer owns its cache.
    kv_source: int | None = None
    mixer: str = (
        "attention"  # one of MIXERS; a "gated_deltanet" layer has no KV (its attention fields unused)
    )

    @property
    def owns_kv(self) -> bool:
        """The layer has KV pages of its own (not shared from another layer, not recurrent)."""
        return self.kv_source is None and self.mixer == "attention"


@dataclass(frozen=True)
class GatedDeltaNetConfig:
    """The shapes every Gated DeltaNet layer of a model shares (Qwen 3.5's linear_* keys).

    Per sequence and layer the state pool keeps the causal conv's last conv_kernel - 1 inputs
    [conv_dim, conv_kernel - 1] and the delta-rule state [num_v_heads, head_k_dim, head_v_dim]."""

    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:  # the conv runs over q, k and v concatenated
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # as config.json names it (a multimodal wrapper keeps its own name)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # of layer 0; per-layer values are in `layers`
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec  # of layer 0 (full-attention layers where kinds differ)
    tie_word_embeddings: bool
    max_position_embeddings: int
    has_qkv_bias: bool  # bias on q/k/v projections
    has_o_bias: bool  # bias on the output projection (llama/qwen3 `attention_bias`; never in qwen2)
    has_qk_norm: bool  # RMSNorm on q and k before RoPE (per head: qwen3, gemma3; whole projection: olmo3)
    layers: tuple[LayerSpec, ...] = ()
    hidden_act: str = "silu"  # "silu" or "gelu_tanh" (of the gated MLP)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    moe: MoEConfig | None = None  # set when any layer's mlp is "sparse"
    gated_deltanet: GatedDeltaNetConfig | None = None  # set when any layer's mixer is "gated_deltanet"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str | None = None  # checkpoint dtype as named in config.json, e.g. "bfloat16"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """Normalize an HF config.json dict through its family; ModelError for unsupported input."""
        model_type = d.get("model_type") if isinstance(d, dict) else None
        if not isinstance(model_type, str) or not model_type:
            raise ModelError("config.json has no model_type; is this a Hugging Face causal LM checkpoint?")
        from pie.models.registry import get_model_class

        return get_model_class(model_type).config_from_hf(d)

    def __post_init__(self) -> None:
        sparse = self.sparse_layers
        if sparse and self.moe is None:
            raise ModelError(f"{self.model_type}: layers {list(sparse)} are sparse but the config has no MoE")
        if self.moe is not None and not sparse:
            raise ModelError(f"{self.model_type}: an MoE config without sparse layers")

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        return tuple(k for k in ATTENTION_KINDS if any(layer.attention == k for layer in self.layers))

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        """Indices of the layers that keep per-sequence recurrent state (Gated DeltaNet)."""
        return tuple(i for i, layer in enumerate(self.layers) if layer.mixer == "gated_deltanet")

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        """Indices of the layers whose MLP is the MoE block."""
        return tuple(i for i, layer in enumerate(self.layers) if layer.mlp == "sparse")


# ---- helpers the family files build their configs from ---------------------------------------------------


def req(d: dict, key: str, model_type: str):
    if key not in d or d[key] is None:
        raise ModelError(f"config.json ({model_type}) lacks required field {key!r}")
    return d[key]


def text_config(d: dict, text_types: tuple[str, ...]) -> dict:
    """The text tower's config of a multimodal wrapper (`text_config`), checked to be one of text_types.

    Token ids may sit at the wrapper's top level; the text config inherits them where it lacks them. The
    wrapper's `tie_word_embeddings`, when present, wins (transformers 5 ties by the wrapper's config)."""
    model_type = d["model_type"]
    tc = d.get("text_config")
    if not isinstance(tc, dict):
        raise ModelError(f"{model_type} config.json has no text_config object; cannot find its text tower")
    tc = dict(tc)
    tc.setdefault("model_type", text_types[0])
    if tc["model_type"] not in text_types:
        raise ModelError(
            f"{model_type} text_config has model_type {tc['model_type']!r}; supported: {', '.join(text_types)}"
        )
    for key in ("eos_token_id", "bos_token_id", "torch_dtype", "dtype"):
        if key in d and key not in tc:
            tc[key] = d[key]
    if "tie_word_embeddings" in d:
        tc["tie_word_embeddings"] = d["tie_word_embeddings"]
    return tc


def common_fields(d: dict, model_type: str, *, acts: dict[str, str] | None = None) -> dict:
    """ModelConfig keyword arguments every family shares (everything but layers, rope, flags).

    acts: accepted HF activation names -> pie's name (default: silu only). The activation key is
    `hidden_activation` (Gemma) or `hidden_act`."""
    acts = acts or {"silu": "silu", "swish": "silu"}
    hidden = int(req(d, "hidden_size", model_type))
    num_heads = int(req(d, "num_attention_heads", model_type))
    num_kv_heads = int(d.get("num_key_value_heads") or num_heads)
    head_dim = int(d.get("head_dim") or hidden // num_heads)
    if num_heads % num_kv_heads:
        raise ModelError(
            f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
        )
    act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
    if act not in acts:
        raise ModelError(f"{model_type}: hidden_act {act!r} is not supported (supported: {', '.join(acts)})")
    if d.get("mlp_bias"):
        raise ModelError("mlp_bias=True is not supported")
    eos = d.get("eos_token_id")
    eos_ids = () if eos is None else tuple(int(x) for x in (eos if isinstance(eos, list) else [eos]))
    bos = d.get("bos_token_id")
    return dict(
        model_type=model_type,
        vocab_size=int(req(d, "vocab_size", model_type)),
        hidden_size=hidden,
        intermediate_size=int(req(d, "intermediate_size", model_type)),
        num_layers=int(req(d, "num_hidden_layers", model_type)),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(req(d, "max_position_embeddings", model_type)),
        hidden_act=acts[act],
        eos_token_ids=eos_ids,
        bos_token_id=None if bos is None else int(bos),
        torch_dtype=d.get("dtype") or d.get("torch_dtype"),
        raw=dict(d),
    )


def parse_rope(p: dict, max_position: int, where: str) -> RopeSpec:
    """A RopeSpec from one flat rope dict (transformers' standardized `rope_parameters` entry): rope_type
    (or `type`), rope_theta and the type's parameters. `where` names the dict in error messages."""
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelError(
            f"{where}: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    theta = float(p.get("rope_theta", 10000.0))
    orig = int(p.get("original_max_position_embeddings") or max_position)
    beta = p.get("llama_4_scaling_beta")
    common = dict(theta=theta, rope_type=rope_type, original_max_position_embeddings=orig)
    common["llama_4_scaling_beta"] = None if beta is None else float(beta)
    try:
        if rope_type == "default":
            return RopeSpec(**common)
        if rope_type == "linear":
            return RopeSpec(**common, factor=float(p["factor"]))
        if rope_type == "proportional":
            return RopeSpec(
                **common,
                factor=float(p.get("factor", 1.0)),
                partial_rotary_factor=float(p.get("partial_rotary_factor", 1.0)),
            )
        if rope_type == "llama3":
            return RopeSpec(
                **common,
                factor=float(p["factor"]),
                low_freq_factor=float(p["low_freq_factor"]),
                high_freq_factor=float(p["high_freq_factor"]),
            )
    except KeyError as e:
        raise ModelError(f"{where}: {rope_type} rope scaling lacks {e.args[0]!r}") from None
    # yarn (transformers' _compute_yarn_parameters): factor defaults to max_position / original
    factor = p.get("factor")
    factor = float(factor) if factor is not None else max_position / orig
    opt = {
        k: (None if p.get(k) is None else float(p[k]))
        for k in ("mscale", "mscale_all_dim", "attention_factor")
    }
    return RopeSpec(
        **common,
        factor=factor,
        beta_fast=float(p.get("beta_fast") or 32.0),
        beta_slow=float(p.get("beta_slow") or 1.0),
        truncate=bool(p.get("truncate", True)),
        **opt,
    )


def rope_dicts(d: dict, default_theta: float = 10000.0) -> dict[str, dict]:
    """{"": flat} or {"full": ..., "sliding": ...}: the rope dict(s) of a config in either layout.

    transformers 5 writes `rope_parameters` (flat, or nested by layer type); older configs carry
    `rope_theta` + `rope_scaling` (+ a top-level `original_max_position_embeddings` that overrides the
    dict's, as transformers' standardize_rope_params does). Families with per-kind rope (Gemma 3, OLMo 3)
    translate their older keys themselves before calling parse_rope."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ModelError("rope_parameters / rope_scaling must be JSON objects")
    nested = {k: v for k, v in params.items() if k in _LAYER_TYPES}
    if nested:
        out = {}
        for key, p in nested.items():
            p = dict(p or {})
            p.setdefault("rope_theta", d.get("rope_theta", default_theta))
            out[_LAYER_TYPES[key]] = p
        return out
    merged = {**scaling, **params}
    merged.setdefault("rope_theta", d.get("rope_theta", default_theta))
    if d.get("original_max_position_embeddings") and merged.get("rope_type", merged.get("type")) in (
        "llama3",
        "yarn",
    ):
        merged["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    return {"": merged}


def layer_kinds(
    d: dict,
    num_layers: int,
    default: list[str],
    mapping: dict[str, str] = _LAYER_TYPES,
    model_type: str | None = None,
) -> list[str]:
    """Per-layer kinds from `layer_types` (current layout) through `mapping` (HF layer type -> pie kind;
    attention kinds unless a family gives its own), else `default` (the family's rule for older configs).
    Unknown layer types fail, naming them (and model_type where given)."""
    types = d.get("layer_types")
    if types is None:
        return default
    where = f"{model_type}: " if model_type else ""
    if not isinstance(types, list) or len(types) != num_layers:
        raise ModelError(f"{where}layer_types must be a list of {num_layers} entries (num_hidden_layers)")
    bad = sorted({t for t in types if t not in mapping})
    if bad:
        raise ModelError(
            f"{where}layer_types {', '.join(map(repr, bad))} are not supported (supported: {', '.join(mapping)})"
        )
    return [mapping[t] for t in types]


def window_of(d: dict, model_type: str) -> int:
    w = d.get("sliding_window")
    if w is None or int(w) < 1:
        raise ModelError(f"{model_type} has sliding-attention layers but no positive sliding_window")
    return int(w)


def build_layers(
    common: dict,
    kinds: list[str],
    ropes: dict[str, RopeSpec],
    *,
    window: int | None = None,
    sm_scale: float | None = None,
    logit_softcap: float | None = None,
    sparse_layers: tuple[int, ...] = (),
    has_sinks: bool = False,
) -> tuple[LayerSpec, ...]:
    """LayerSpecs from common_fields() output: layer i has attention kinds[i], rope ropes[kinds[i]] (or
    ropes[""] for all), the sliding `window` on sliding layers, the same heads everywhere, and the MoE
    block where i is in sparse_layers."""
    heads, kv, hd = common["num_heads"], common["num_kv_heads"], common["head_dim"]
    return tuple(
        LayerSpec(
            attention=kind,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=hd,
            rope=ropes.get(kind) or ropes[""],
            sm_scale=sm_scale if sm_scale is not None else hd**-0.5,
            sliding_window=window if kind == "sliding" else None,
            logit_softcap=logit_softcap,
            has_sinks=has_sinks,
            mlp="sparse" if i in sparse_layers else "dense",
        )
        for i, kind in enumerate(kinds)
    )


def read_model_config(model_path: str | Path) -> ModelConfig:
    path = Path(model_path) / "config.json"
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ModelError(f"no config.json in {model_path}; is it a Hugging Face model directory?") from None
    except ValueError as e:
        raise ModelError(f"{path} is not valid JSON ({e})") from None
