"""RMSNorm with an optional fused residual add, one Triton program per row (one launch per call).

Semantics are those of pie.layers.norm.RMSNorm (HF's), including its rounding:
    s  = x + residual                      rounded to x's dtype (returned as the new residual)
    xf = s.float();  n = (xf * rsqrt(mean(xf^2) + eps)).to(x.dtype)
    y  = weight * n                        in torch's promoted dtype of (weight, x)
Every product of two bf16/fp16 values is exact in fp32, so rounding it once to the output dtype equals
torch's elementwise op; only the fp32 sum of squares differs (reduction order), which moves the
normalized value by ~1e-7 relative and flips its rounding in a small fraction of elements.
"""

import torch
import triton
import triton.language as tl

from pie.kernels import row_layout

MAX_DIM = 65536  # one row is held in registers; wider rows would spill beyond usefulness
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [A, B, D] via strides (x_sa, x_sb, 1)
    r_ptr,  # residual, same layout rules (r_sa, r_sb, 1); unused without HAS_RESIDUAL
    w_ptr,  # weight [D], contiguous
    y_ptr,  # out [A * B, D], contiguous, promoted dtype of (weight, x)
    s_ptr,  # new residual [A * B, D], contiguous, x's dtype; unused without HAS_RESIDUAL
    B,
    x_sa,
    x_sb,
    r_sa,
    r_sb,
    D,
    inv_d,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * D can exceed 2**31 in long prefills
    a = row // B
    b = row % B
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + a * x_sa + b * x_sb + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + a * r_sa + b * r_sb + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # torch: x + residual
        tl.store(s_ptr + row * D + cols, x, mask=mask)
    xf = x.to(tl.float32)
    # torch's mean multiplies the fp32 sum by fp32(1/D); masked lanes are 0 and add nothing
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) * inv_d + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty)  # HF: cast to the input dtype before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)  # exact for 16-bit operands; fp32 when either is fp32
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.ndim == 0:
        raise ValueError("rms_norm: x must have shape [..., D], got a scalar")
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(
            f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({D},) for x {tuple(x.shape)}"
        )
    if not 0 < D <= MAX_DIM:
        raise ValueError(f"rms_norm: last dim {D} is outside 1..{MAX_DIM}; use the torch RMSNorm path")
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"rms_norm: dtypes x={x.dtype}, weight={weight.dtype}; supported: fp32, fp16, bf16")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device}, x on {x.device}")
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device
    ):
        raise ValueError(
            f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} on {residual.device} must match "
            f"x {tuple(x.shape)} {x.dtype} on {x.device}"
        )


def launch_config(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for rows of D elements: the power-of-two block holding a row, ~8 elements
    per thread for wide rows, at most 8 warps."""
    block = triton.next_power_of_2(D)
    return block, max(1, min(8, block // 256))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x: [..., D] (e.g. [N, D], or [T, H, D] head views for Qwen3's q/k norm); weight: [D].

    Returns y [..., D] (contiguous, dtype promote(weight, x)), or with `residual` (same shape/dtype as x)
    the pair (y, x + residual), the new residual in x's dtype. Inputs are not modified.
    """
    _check(x, weight, residual)
    D = x.shape[-1]
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_res = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if x.numel() == 0:
        return y if residual is None else (y, new_res)
    xb, A, B, x_sa, x_sb = row_layout(x)
    if residual is not None:
        rb, _, _, r_sa, r_sb = row_layout(residual)
    else:
        rb, r_sa, r_sb = xb, 0, 0
    block, num_warps = launch_config(D)
    _rms_norm_kernel[(A * B,)](
        xb,
        rb,
        weight.contiguous(),
        y,
        new_res if new_res is not None else y,
        B,
        x_sa,
        x_sb,
        r_sa,
        r_sb,
        D,
        1.0 / D,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK_D=block,
        num_warps=num_warps,
    )
    return y if residual is None else (y, new_res)
