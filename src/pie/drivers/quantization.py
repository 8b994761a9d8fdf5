"""Which quantized formats an executor uses: weights (ExecutorSpec.weight_dtype and the checkpoint) and the
KV cache (ExecutorSpec.kv_cache_dtype). Pure decisions; the layers that implement them are
pie.layers.quant (weights) and pie.attention.base / the backends (FP8 KV pages).

Weights:
  weight_dtype int8 / int4 / float8  -> that format, quantized at load (layers/quant.py)
  an FP8 checkpoint with 128 x 128 block scales (config.json quantization_config: quant_method "fp8",
  weight_block_size [128, 128]), weight_dtype auto / the activation dtype / float8, on CUDA where
  torch's block-scaled FP8 GEMM runs (sm90)  -> "fp8_block": its FP8 weights and scales kept as shipped
  anything else                      -> None (full precision; an FP8 checkpoint is dequantized at load)

KV cache:
  kv_cache_dtype "auto"     -> pages in the activation dtype
  kv_cache_dtype "fp8_e4m3" -> pages in float8_e4m3fn, one byte per element (twice the pages of bf16),
                               with a per-layer (k_scale, v_scale) (KV_SCALE, see below)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pie.errors import DriverError
from pie.layers.quant import FORMATS, kernel_for, split_problem

KV_CACHE_DTYPES = ("auto", "fp8_e4m3")


def checkpoint_fp8_blocks(model_path: str | Path) -> bool:
    """True when config.json declares FP8 weights with 128 x 128 block scales (Mistral 3, Ministral,
    DeepSeek-style checkpoints)."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return False  # the executor reports an unreadable config.json itself
    q = cfg.get("quantization_config") or cfg.get("text_config", {}).get("quantization_config") or {}
    return q.get("quant_method") == "fp8" and list(q.get("weight_block_size") or []) == [128, 128]


def weight_format(
    weight_dtype: str, model_path: str | Path, device: torch.device, act: torch.dtype
) -> str | None:
    """The QuantLinear format of this executor's projections (None: full precision). See the module doc."""
    requested = weight_dtype if weight_dtype in FORMATS else None
    if requested in (None, "float8") and device.type == "cuda" and checkpoint_fp8_blocks(model_path):
        if kernel_for("fp8_block", device, act) == "block_scaled_mm":
            return "fp8_block"
    return requested


def tensor_parallel_quant_problem(model_cls: type, cfg, tp: int, weight_dtype: str) -> str | None:
    """Why `weight_dtype` cannot quantize the shards of tp ranks (None when it can): built on the meta device
    as rank 0 of tp (nothing allocated), before any driver process starts (see layers/quant.split_problem)."""
    if tp == 1 or weight_dtype not in FORMATS:
        return None
    from pie.distributed import simulated_rank

    with simulated_rank(0, tp), torch.device("meta"):
        model = model_cls(cfg)
    for name, module in model.named_modules():
        problem = split_problem(name, module, weight_dtype)
        if problem is not None:
            return problem
    return None


def kv_cache_torch_dtype(kv_cache_dtype: str, act: torch.dtype) -> torch.dtype:
    """The element dtype of the KV pages."""
    if kv_cache_dtype == "auto":
        return act
    if kv_cache_dtype == "fp8_e4m3":
        return torch.float8_e4m3fn
    raise DriverError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")


# The FP8 KV cache stores K / k_scale and V / v_scale per layer. 1.0 (vLLM's default too): K and V after the
# projections (and q/k norms, RoPE) are O(1..10), inside e4m3's normal range [2^-6, 448], where its relative
# precision (3 mantissa bits) does not depend on the scale. Scales calibrated from the fixed text's per-layer
# amax (amax / 448, with 1x to 4x headroom) measured no better on the default model (mean KL 7.0e-3 against
# 5.7e-3 with 1.0), so there is no calibration pass; values beyond +-448 * scale saturate.
KV_SCALE = 1.0


def kv_scales(num_layers: int) -> list[tuple[float, float]]:
    """Per-layer (k_scale, v_scale) of an FP8 KV cache (the backends fold them in; see KV_SCALE)."""
    return [(KV_SCALE, KV_SCALE)] * num_layers
