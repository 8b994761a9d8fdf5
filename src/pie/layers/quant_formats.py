"""Weight formats as pure tensor functions: quantizers (full-precision rows -> codes and scales, fp32 math)
and the dequantizers every kernel is checked against. The layer that stores and runs them is
pie.layers.quant.QuantLinear; layouts are described there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
INT4_GROUP = 128
FP8_BLOCK = 128
TINY = 1e-12  # floor of every scale: an all-zero row must not divide by zero


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] -> (q int8 [O, I], s fp32 [O]) with w ~= q * s[:, None]."""
    w = w.float()
    s = (w.abs().amax(dim=1) / 127.0).clamp(min=TINY)
    return (w / s[:, None]).round().clamp(-127, 127).to(torch.int8), s


def quantize_int4(
    w: torch.Tensor, group: int = INT4_GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [O, I] (I % group == 0) -> (codes uint8 [O, I // 2], s fp32 [O, G], z fp32 [O, G]).

    Per group of `group` inputs the 16 levels span [min, max]: w ~= (q - 8) * s + z with z = min + 8 s.
    Two codes per byte, the even column in the high nibble (the byte layout torch's CUDA int4 packer takes).
    """
    n_out, n_in = w.shape
    wg = w.float().view(n_out, n_in // group, group)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    s = ((hi - lo) / 15.0).clamp(min=TINY)
    q = ((wg - lo[..., None]) / s[..., None]).round().clamp(0, 15).to(torch.uint8).view(n_out, n_in)
    return (q[:, 0::2] << 4) | q[:, 1::2], s, lo + 8.0 * s


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [O, I // 2] (two codes a byte, even column high) -> int32 [O, I] codes in 0..15."""
    return torch.stack([codes >> 4, codes & 0x0F], dim=-1).flatten(-2).to(torch.int32)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] -> (q e4m3 [O, I], s fp32 [O]) with w ~= q * s[:, None]."""
    w = w.float()
    s = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=TINY)
    return (w / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] -> (e4m3 [M, K], fp32 scale [M, 1]): one scale per token, computed on device."""
    s = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=TINY)
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def quantize_fp8_groups(x: torch.Tensor, group: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] -> (e4m3 [M, K], fp32 scale [M, K // group]): one scale per token and group."""
    M, K = x.shape
    xg = x.float().view(M, K // group, group)
    s = (xg.abs().amax(dim=-1) / FP8_MAX).clamp(min=TINY)
    return (xg / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(M, K), s


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 W * s for an FP8 weight [O, I] and its scale: a scalar, [O] / [O, 1] per row, or [ceil(O / bo),
    ceil(I / bi)] per block (block size inferred from the shapes, as DeepSeek/Mistral FP8 checkpoints ship
    128 x 128 blocks)."""
    w, s = weight.float(), scale.float()
    if s.numel() == 1:
        return w * s.reshape(())
    rows, cols = w.shape
    if s.dim() == 1 or s.shape[-1] == 1:
        return w * s.reshape(rows, 1)
    bo, bi = -(-rows // s.shape[0]), -(-cols // s.shape[1])
    full = s.repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols]
    return w * full


def quantize_fp8_blocks(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] -> (q e4m3 [O, I], s fp32 [ceil(O / block), ceil(I / block)]): one scale per block."""
    n_out, n_in = w.shape
    wp = F.pad(w.float(), (0, -n_in % block, 0, -n_out % block))
    blocks = wp.view(wp.shape[0] // block, block, wp.shape[1] // block, block)
    s = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=TINY)
    full = s.repeat_interleave(block, 0)[:n_out].repeat_interleave(block, 1)[:, :n_in]
    return (w.float() / full).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def dequantized_input(loaded: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A checkpoint tensor in full precision: FP8 ones (with their scale) dequantized, others as they are."""
    if loaded.dtype in (FP8, torch.float8_e5m2):
        if scale is None:
            raise ValueError("an FP8 checkpoint weight came without its scale")
        return dequantize_fp8(loaded, scale)
    return loaded


def dequantize_fp8_blocks(q: torch.Tensor, s: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """e4m3 [O, I] with scales [ceil(O / block), ceil(I / block)] -> fp32 [O, I]."""
    n_out, n_in = q.shape
    full = s.float().repeat_interleave(block, 0)[:n_out].repeat_interleave(block, 1)[:, :n_in]
    return q.float() * full
