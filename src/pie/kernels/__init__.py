"""Fused Triton kernels for the eager CUDA path: RMSNorm (+ residual add) and RoPE (with the cos/sin gather).

Why hand-written: the torch versions in pie.layers launch ~8 (RMSNorm) and ~20 (RoPE) small kernels each,
and a batch-1 decode step is bound by launches, not memory. Each kernel here is one launch and reproduces
the torch code's rounding (see rmsnorm.py / rope.py), so outputs match the torch path to a bf16 ulp.

Dispatch (`use_triton`): the layers call a kernel only for CUDA tensors that need no autograd, when triton
imports and PIE_DISABLE_TRITON is not "1"; otherwise their torch code runs unchanged (CPU, parity tests).
The environment variable is read once, at import; tests flip `TRITON_ENABLED` instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

try:  # triton is absent from CPU-only installs; any import failure means "use the torch path"
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:
    HAS_TRITON = False


def enabled_from_env(has_triton: bool, env: Mapping[str, str]) -> bool:
    """True when the Triton kernels may be used: triton imports and PIE_DISABLE_TRITON is not "1"."""
    return has_triton and env.get("PIE_DISABLE_TRITON", "").strip() != "1"


TRITON_ENABLED = enabled_from_env(HAS_TRITON, os.environ)


def use_triton(x: torch.Tensor) -> bool:
    """Whether a layer should run its Triton kernel on `x` (CUDA, no autograd: the kernels are forward-only)."""
    return TRITON_ENABLED and x.is_cuda and not x.requires_grad


def row_layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """View x [..., D] as rows for a row-wise kernel without copying where possible.

    Returns (base, A, B, stride_a, stride_b): row r = a * B + b (a < A, b < B) starts at element
    a * stride_a + b * stride_b of `base` and its D elements are contiguous. Two leading levels cover
    [N, D] and the strided [T, H, D] head views of a fused qkv projection (T and H cannot be merged
    there: the token stride is not H * D). Copies only when the last dim is strided, or for ndim > 3
    when the leading dims do not merge into one.
    """
    if x.ndim == 0:
        raise ValueError("expected a tensor of shape [..., D], got a scalar")
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    if x.ndim == 1:
        return x, 1, 1, 0, 0
    if x.ndim == 2:
        return x, x.shape[0], 1, x.stride(0), 0
    if x.ndim > 3:
        x = x.reshape(-1, x.shape[-2], x.shape[-1])  # a view when the leading dims merge
    return x, x.shape[0], x.shape[1], x.stride(0), x.stride(1)


if HAS_TRITON:
    from pie.kernels.rmsnorm import rms_norm as rms_norm
    from pie.kernels.rope import apply_rope as apply_rope
