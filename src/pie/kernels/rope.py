"""NeoX ("rotate_half") RoPE on q and k in one Triton launch, gathering cos/sin by position in-kernel.

Out of place: returns new contiguous q, k (as the torch path does) and leaves the inputs untouched, so
callers may pass views of a fused qkv projection. Rounding follows pie.layers.rotary._rotate exactly:
cos/sin are cast to x's dtype, then x1*cos, x2*sin, x2*cos, x1*sin and the final sum/difference are
each rounded to x's dtype, as torch's separate elementwise ops do. A product of two bf16/fp16 values
is exact in fp32 and fp32 -> 16-bit casts round to nearest even, so every step matches torch bit for
bit; FMA contraction is disabled at launch so fp32 inputs do not fuse the products either.
"""

import torch
import triton
import triton.language as tl

MAX_HEADS_PER_PROGRAM = 16  # each program rotates up to this many heads of one token


@triton.jit
def _rotate_heads(
    x_ptr,  # [T, H, 2 * HALF] via strides (s_t, s_h, 1)
    o_ptr,  # [T, H, 2 * HALF], contiguous, x's dtype
    t,
    h0,
    H,
    s_t,
    s_h,
    cos,  # [BLOCK_HALF] fp32
    sin,  # [BLOCK_HALF] fp32
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    dt = x_ptr.dtype.element_ty
    heads = h0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < H) & (cols[None, :] < HALF)
    src = x_ptr + t * s_t + heads[:, None].to(tl.int64) * s_h + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    c = cos.to(dt).to(tl.float32)[None, :]
    s = sin.to(dt).to(tl.float32)[None, :]
    out1 = (x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)
    out2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    dst = o_ptr + (t * H + heads[:, None].to(tl.int64)) * (2 * HALF) + cols[None, :]
    tl.store(dst, out1.to(dt), mask=mask)
    tl.store(dst + HALF, out2.to(dt), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    pos_ptr,  # [T] integer positions
    cs_ptr,  # [max_pos, 2 * HALF] fp32, contiguous: cos half | sin half
    Hq,
    Hkv,
    q_st,
    q_sh,
    k_st,
    k_sh,
    max_pos,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # grid: (T, q head blocks + k head blocks); axis 1 picks the tensor and its block of heads
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    # callers validate positions (the executor does, on the host); this only keeps reads in bounds
    pos = tl.where((pos >= 0) & (pos < max_pos), pos, 0)
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < HALF
    cos = tl.load(cs_ptr + pos * (2 * HALF) + cols, mask=cmask, other=0.0)
    sin = tl.load(cs_ptr + pos * (2 * HALF) + HALF + cols, mask=cmask, other=0.0)
    n_qb = tl.cdiv(Hq, BLOCK_H)
    if hb < n_qb:
        _rotate_heads(q_ptr, qo_ptr, t, hb * BLOCK_H, Hq, q_st, q_sh, cos, sin, HALF, BLOCK_H, BLOCK_HALF)
    else:
        _rotate_heads(
            k_ptr, ko_ptr, t, (hb - n_qb) * BLOCK_H, Hkv, k_st, k_sh, cos, sin, HALF, BLOCK_H, BLOCK_HALF
        )


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    if q.ndim != 3 or k.ndim != 3:
        raise ValueError(f"apply_rope: q and k must be [T, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    T, _, D = q.shape
    if k.shape[0] != T or k.shape[2] != D or positions.shape != (T,):
        raise ValueError(
            f"apply_rope: q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)} "
            "must agree on T and D"
        )
    if D % 2 or cos_sin.ndim != 2 or cos_sin.shape[1] != D:
        raise ValueError(f"apply_rope: head dim {D} must be even and match cos_sin {tuple(cos_sin.shape)}")
    if cos_sin.dtype != torch.float32:
        raise ValueError(f"apply_rope: cos_sin must be float32, got {cos_sin.dtype}")
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise ValueError(f"apply_rope: positions must be an integer tensor, got {positions.dtype}")
    devices = {t.device for t in (q, k, positions, cos_sin)}
    if len(devices) != 1:
        raise ValueError(f"apply_rope: q, k, positions and cos_sin must share one device, got {devices}")


def launch_config(Hq: int, Hkv: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps): heads per program, the power-of-two half-dim block, warps."""
    block_h = min(MAX_HEADS_PER_PROGRAM, triton.next_power_of_2(max(Hq, Hkv, 1)))
    block_half = triton.next_power_of_2(D // 2)
    return block_h, block_half, max(1, min(8, block_h * block_half // 256))


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D] (any strides; the last dim is made contiguous if it is not);
    positions: [T] integers in [0, max_pos); cos_sin: [max_pos, D] fp32 (RotaryEmbedding.cos_sin).

    Returns new contiguous (q_rot, k_rot) in the inputs' dtypes. Out-of-range positions are not
    detected here (they read position 0); validate them before the forward pass.
    """
    _check(q, k, positions, cos_sin)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if positions.stride(0) != 1:
        positions = positions.contiguous()
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T == 0 or D == 0 or Hq + Hkv == 0:
        return q_out, k_out
    block_h, block_half, num_warps = launch_config(Hq, Hkv, D)
    grid = (T, triton.cdiv(Hq, block_h) + triton.cdiv(Hkv, block_h))
    _rope_kernel[grid](
        q,
        k,
        q_out,
        k_out,
        positions,
        cos_sin.contiguous(),
        Hq,
        Hkv,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin.shape[0],
        HALF=D // 2,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return q_out, k_out
