"""ModelConfig: an HF config.json normalized once, so model code reads plain fields.

Every HF quirk (missing head_dim, missing kv heads, `rope_theta` vs transformers-5 `rope_parameters`,
`rope_scaling` vs `rope_parameters`, `dtype` vs `torch_dtype`, per-family bias conventions) is absorbed
here; model code never calls getattr(config, ..., default).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pie.errors import ModelError

# Rope types we implement; anything else (yarn, dynamic, longrope, ...) is rejected rather than silently
# computed wrong.
_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (Llama 3.1/3.2): long wavelengths divided by `factor`."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class MoEConfig:
    """Sparse mixture-of-experts MLPs (Mixtral, Qwen3-MoE): a softmax router picks `top_k` of `num_experts`
    SwiGLU experts per token. Layers not in `sparse_layers` keep the dense MLP (`intermediate_size`)."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    renormalize: bool  # divide the top-k probabilities by their sum (Mixtral always; Qwen3 `norm_topk_prob`)
    # True: routing weights are cast to the activation dtype before scaling the experts' outputs (Qwen);
    # False: they stay fp32 (Mixtral). Only matters below fp32.
    weights_in_activation_dtype: bool
    sparse_layers: tuple[int, ...]


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    has_qkv_bias: bool  # bias on q/k/v projections
    has_o_bias: bool  # bias on the output projection (llama/qwen3 `attention_bias`; never in qwen2)
    has_qk_norm: bool  # per-head RMSNorm on q and k before RoPE (qwen3)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str | None = None  # checkpoint dtype as named in config.json, e.g. "bfloat16"
    moe: MoEConfig | None = None  # None: every layer has the dense MLP
    family: Any = None  # fields only one family reads (a frozen dataclass of its file, e.g. phi3's rope)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """Normalize an HF config.json dict; raise ModelError for missing fields or unsupported features."""
        model_type = d.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise ModelError("config.json has no model_type; is this a Hugging Face causal LM checkpoint?")
        from pie.models.registry import get_model_class

        model_cls = get_model_class(model_type)  # an unsupported type fails here, listing the supported ones
        # A family whose config.json departs from the llama layout adapts it in its own file: it returns
        # the dict the shared parsing below reads and the ModelConfig fields it sets itself.
        adapt = getattr(model_cls, "adapt_hf_config", None)
        original, (d, family_fields) = d, adapt(d) if adapt is not None else (d, {})
        if "text_config" in d and "hidden_size" not in d:
            raise ModelError(
                f"model_type {model_type!r} is multimodal (text_config); only text LMs are supported"
            )

        def req(key: str):
            if key not in d or d[key] is None:
                raise ModelError(f"config.json ({model_type}) lacks required field {key!r}")
            return d[key]

        hidden = int(req("hidden_size"))
        num_heads = int(req("num_attention_heads"))
        num_kv_heads = int(d.get("num_key_value_heads") or num_heads)
        head_dim = int(d.get("head_dim") or hidden // num_heads)
        if num_heads % num_kv_heads:
            raise ModelError(
                f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelError(f"hidden_act {act!r} is not supported (only silu)")
        if d.get("mlp_bias"):
            raise ModelError("mlp_bias=True is not supported")
        max_pos = int(req("max_position_embeddings"))
        _check_sliding_window(d, model_type, max_pos)
        theta, scaling = _parse_rope(d)

        attention_bias = bool(d.get("attention_bias", False))
        if model_type == "qwen2":
            # Qwen2 hard-codes bias on q/k/v (none on o_proj); config.json carries no flag for it.
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = attention_bias

        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else tuple(int(x) for x in (eos if isinstance(eos, list) else [eos]))
        bos = d.get("bos_token_id")
        cfg = cls(
            model_type=model_type,
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")),
            num_layers=int(req("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=max_pos,
            has_qkv_bias=qkv_bias,
            has_o_bias=o_bias,
            has_qk_norm=model_type == "qwen3",
            eos_token_ids=eos_ids,
            bos_token_id=None if bos is None else int(bos),
            torch_dtype=d.get("dtype") or d.get("torch_dtype"),
            raw=dict(original),
        )
        return dataclasses.replace(cfg, **family_fields) if family_fields else cfg


def _parse_rope(d: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers-4 (`rope_theta` + `rope_scaling`) or -5 (`rope_parameters`)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ModelError("rope_parameters / rope_scaling must be JSON objects")
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ModelError(f"rope type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    try:
        return theta, RopeScaling(
            factor=float(merged["factor"]),
            low_freq_factor=float(merged["low_freq_factor"]),
            high_freq_factor=float(merged["high_freq_factor"]),
            original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ModelError(f"llama3 rope scaling lacks {e.args[0]!r}") from None


def _check_sliding_window(d: dict, model_type: str, max_pos: int) -> None:
    """Reject checkpoints whose attention is windowed: we only run full attention."""
    window = d.get("sliding_window")
    # Qwen2/Qwen3 carry a sliding_window value but only use it when use_sliding_window is true.
    if "use_sliding_window" in d and not d["use_sliding_window"]:
        return
    if window is not None and int(window) < max_pos:
        raise ModelError(
            f"{model_type} checkpoint uses sliding-window attention (sliding_window={window} < "
            f"max_position_embeddings={max_pos}), which pie does not implement; use a full-attention "
            "variant (e.g. Mistral v0.2+ has sliding_window null)"
        )


def read_model_config(model_path: str | Path) -> ModelConfig:
    path = Path(model_path) / "config.json"
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ModelError(f"no config.json in {model_path}; is it a Hugging Face model directory?") from None
    except ValueError as e:
        raise ModelError(f"{path} is not valid JSON ({e})") from None
