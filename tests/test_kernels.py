"""Triton kernels (pie.kernels) against the torch layers they replace, and the layers' dispatch.

Kernel tests are marked gpu and run on CUDA. With triton installed and TRITON_INTERPRET=1 they also run
on the CPU through Triton's interpreter, except bf16: the interpreter truncates fp32 -> bf16 casts where
the GPU rounds to nearest even, so bf16 rounding can only be checked on a GPU.

Tolerances, in units in the last place (ulps) of the reference value in the rounding dtype:
- rms_norm, 16-bit: the fp32 sum of squares differs from torch's only by reduction order (~1e-7 relative),
  which flips the rounding of the normalized value (cast to x's dtype before the weight) in a few
  elements; one flipped ulp times the weight is <= 2 ulps of the output. So: <= 2 ulps everywhere and
  <= 1% of elements not bit-identical. Multiplying by the weight before the cast (non-HF order) would
  differ in far more elements. fp32: rtol 1e-5. The new residual (x + residual) must be bit-identical.
- rope: every step rounds like torch's separate ops, so outputs are expected bit-identical; we require
  <= 1 ulp everywhere and <= 0.1% of elements not identical (single rounding in fp32 would fail that).
"""

from __future__ import annotations

import os

import pytest
import torch

from pie import kernels
from pie.layers.norm import RMSNorm
from pie.layers.rotary import RotaryEmbedding
from pie.models.config import RopeSpec

if kernels.HAS_TRITON:
    from pie.kernels import rmsnorm, rope

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# where the kernels run: CUDA, or the CPU under Triton's interpreter; None: kernel tests skip
KDEV = None if not kernels.HAS_TRITON else "cuda" if HAS_CUDA else "cpu" if INTERPRET else None
needs_kernels = pytest.mark.skipif(KDEV is None, reason="needs CUDA and triton (or TRITON_INTERPRET=1)")
needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")
needs_cuda_triton = pytest.mark.skipif(not (HAS_CUDA and kernels.HAS_TRITON), reason="needs CUDA and triton")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PRECISION = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}  # significand bits


def skip_interpreted_bf16(dtype: torch.dtype) -> None:
    if KDEV == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter truncates fp32->bf16 casts; bf16 rounding is checked on CUDA")


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` values at |ref| (float64), the smallest subnormal spacing at 0."""
    _, e = torch.frexp(ref.double().abs())
    fi = torch.finfo(dtype)
    return torch.ldexp(torch.ones_like(ref, dtype=torch.float64), e - PRECISION[dtype]).clamp_min(
        fi.tiny * fi.eps
    )


def assert_ulps(out, ref, dtype: torch.dtype, max_ulps: float, max_frac: float) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert torch.isfinite(out).all()
    out, ref = out.cpu(), ref.cpu()
    ulps = (out.double() - ref.double()).abs() / ulp(ref, dtype)
    frac = (out != ref).double().mean().item()
    assert ulps.max().item() <= max_ulps, f"max {ulps.max().item():.2f} ulps (> {max_ulps})"
    assert frac <= max_frac, f"{frac:.4%} of elements differ (> {max_frac:.2%})"


def torch_path(monkeypatch, fn, *args):
    """fn(*args) with the Triton dispatch switched off: the layers' original torch code."""
    with monkeypatch.context() as m:
        m.setattr(kernels, "TRITON_ENABLED", False)
        return fn(*args)


def make_norm(D: int, dtype: torch.dtype, device, seed: int = 0) -> RMSNorm:
    norm = RMSNorm(D, 1e-6).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    norm.weight.data.copy_(1.0 + 0.3 * torch.randn(D, generator=g))
    return norm.requires_grad_(False)


def randn(*shape, dtype, device, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g) + 0.1).to(device=device, dtype=dtype)


# ---- rms_norm -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("N", [1, 7, 300])
@pytest.mark.parametrize("D", [64, 128, 1024, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_module(monkeypatch, dtype, D, N, with_residual):
    skip_interpreted_bf16(dtype)
    norm = make_norm(D, dtype, KDEV, seed=D)
    x = randn(N, D, dtype=dtype, device=KDEV, seed=N, scale=3.0)
    res = randn(N, D, dtype=dtype, device=KDEV, seed=N + 1) if with_residual else None
    x0, res0 = x.clone(), None if res is None else res.clone()
    out = rmsnorm.rms_norm(x, norm.weight, norm.eps, res)
    ref = torch_path(monkeypatch, norm, x, res)
    if with_residual:
        (out, new_res), (ref, ref_res) = out, ref
        assert new_res.dtype == dtype and torch.equal(new_res, ref_res)
        assert torch.equal(res, res0)
    assert torch.equal(x, x0)  # out of place
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:
        assert_ulps(out, ref, dtype, max_ulps=2, max_frac=0.01)


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_head_views(monkeypatch, dtype):
    """Qwen3 q/k norm: [T, H, D] strided views of a fused qkv output (T and H cannot merge), D = 128."""
    skip_interpreted_bf16(dtype)
    T, Hq, Hkv, D = 5, 6, 2, 128
    qkv = randn(T, (Hq + 2 * Hkv) * D, dtype=dtype, device=KDEV, seed=3)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    norm = make_norm(D, dtype, KDEV, seed=4)
    for x in (q, k):
        out = rmsnorm.rms_norm(x, norm.weight, norm.eps)
        assert out.shape == x.shape and out.is_contiguous()
        ref = torch_path(monkeypatch, norm, x)
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        else:
            assert_ulps(out, ref, dtype, max_ulps=2, max_frac=0.01)


@pytest.mark.gpu
@needs_kernels
def test_rms_norm_fp32_weight_promotes(monkeypatch):
    """fp16 x with an fp32 weight: torch promotes the weight multiply (and the output) to fp32."""
    D = 256
    norm = make_norm(D, torch.float32, KDEV, seed=5)
    x = randn(9, D, dtype=torch.float16, device=KDEV, seed=6)
    out = rmsnorm.rms_norm(x, norm.weight, norm.eps)
    ref = torch_path(monkeypatch, norm, x)
    assert out.dtype == ref.dtype == torch.float32
    assert_ulps(out, ref, torch.float16, max_ulps=2, max_frac=0.01)


@needs_triton
def test_rms_norm_rejects_bad_input():
    x = torch.zeros(3, 64)
    with pytest.raises(ValueError, match="weight has shape"):
        rmsnorm.rms_norm(x, torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm.rms_norm(x, torch.ones(64), 1e-6, torch.zeros(3, 32))
    with pytest.raises(ValueError, match="dtypes"):
        rmsnorm.rms_norm(x.double(), torch.ones(64, dtype=torch.float64), 1e-6)
    y, r = rmsnorm.rms_norm(torch.zeros(0, 64), torch.ones(64), 1e-6, torch.zeros(0, 64))  # no launch
    assert y.shape == r.shape == (0, 64)
    assert rmsnorm.launch_config(64) == (64, 1) and rmsnorm.launch_config(4096) == (4096, 8)
    assert rmsnorm.launch_config(1000) == (1024, 4)


# ---- rope -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads", [(16, 8), (32, 8), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_rotary(monkeypatch, dtype, heads, D, T):
    skip_interpreted_bf16(dtype)
    Hq, Hkv = heads
    max_pos = 40960
    rot = RotaryEmbedding(D, max_pos, RopeSpec(theta=1_000_000.0))
    g = torch.Generator().manual_seed(T * D + Hq)
    positions = torch.randint(0, max_pos, (T,), generator=g)
    positions[-1] = max_pos - 1  # the last cache row; the rest are random, unordered, may repeat
    positions = positions.to(KDEV)
    # q, k as the attention layer makes them: strided head views of one fused qkv output
    qkv = randn(T, (Hq + 2 * Hkv) * D, dtype=dtype, device=KDEV, seed=7, scale=2.0)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
    qkv0 = qkv.clone()
    q_out, k_out = rope.apply_rope(q, k, positions, rot.cos_sin(positions.device))
    q_ref, k_ref = torch_path(monkeypatch, rot, positions, q, k)
    assert torch.equal(qkv, qkv0)  # out of place
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert_ulps(q_out, q_ref, dtype, max_ulps=1, max_frac=1e-3)
    assert_ulps(k_out, k_ref, dtype, max_ulps=1, max_frac=1e-3)


@needs_triton
def test_rope_rejects_bad_input():
    cs = RotaryEmbedding(64, 16, RopeSpec()).cos_sin(torch.device("cpu"))
    q, k, pos = torch.zeros(2, 4, 64), torch.zeros(2, 2, 64), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="must agree on T and D"):
        rope.apply_rope(q, k[:1], pos, cs)
    with pytest.raises(ValueError, match="must be \\[T, H, D\\]"):
        rope.apply_rope(q[0], k, pos, cs)
    with pytest.raises(ValueError, match="match cos_sin"):
        rope.apply_rope(q[..., :32], k[..., :32], pos, cs)
    with pytest.raises(ValueError, match="integer"):
        rope.apply_rope(q, k, pos.float(), cs)
    q_out, k_out = rope.apply_rope(q[:0], k[:0], pos[:0], cs)  # no launch
    assert q_out.shape == (0, 4, 64) and k_out.shape == (0, 2, 64)
    assert rope.launch_config(16, 8, 128) == (16, 64, 4)
    assert rope.launch_config(6, 2, 64) == (8, 32, 1)
    assert rope.launch_config(64, 8, 128) == (16, 64, 4)


# ---- dispatch in the layers -----------------------------------------------------------------------------


def test_enabled_from_env():
    assert kernels.enabled_from_env(True, {})
    assert kernels.enabled_from_env(True, {"PIE_DISABLE_TRITON": "0"})
    assert not kernels.enabled_from_env(True, {"PIE_DISABLE_TRITON": "1"})
    assert not kernels.enabled_from_env(False, {})


def test_cpu_falls_back_to_torch(monkeypatch):
    """Even with the kernels enabled, CPU tensors take the layers' torch code (what the parity tests run)."""

    def boom(*args, **kwargs):
        raise AssertionError("a Triton kernel was called for CPU tensors")

    monkeypatch.setattr(kernels, "TRITON_ENABLED", True)
    monkeypatch.setattr(kernels, "rms_norm", boom, raising=False)
    monkeypatch.setattr(kernels, "apply_rope", boom, raising=False)
    x, res = torch.randn(3, 64), torch.randn(3, 64)
    norm = make_norm(64, torch.float32, "cpu")
    y, new_res = norm(x, res)
    s = x + res
    torch.testing.assert_close(new_res, s, rtol=0, atol=0)
    torch.testing.assert_close(y, norm.weight * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))
    rot = RotaryEmbedding(64, 32, RopeSpec())
    q, k, pos = torch.randn(3, 4, 64), torch.randn(3, 2, 64), torch.tensor([5, 0, 31])
    q_out, _ = rot(pos, q, k)
    cos, sin = rot.cos_sin(q.device)[pos].unsqueeze(1).chunk(2, dim=-1)
    q1, q2 = q.chunk(2, dim=-1)
    torch.testing.assert_close(q_out, torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1))


@pytest.mark.gpu
@needs_cuda_triton
def test_cuda_layers_dispatch_to_kernels(monkeypatch):
    calls: list[str] = []
    real_norm, real_rope = kernels.rms_norm, kernels.apply_rope
    monkeypatch.setattr(kernels, "TRITON_ENABLED", True)
    monkeypatch.setattr(kernels, "rms_norm", lambda *a: calls.append("norm") or real_norm(*a))
    monkeypatch.setattr(kernels, "apply_rope", lambda *a: calls.append("rope") or real_rope(*a))
    norm = make_norm(128, torch.bfloat16, "cuda")
    x = randn(4, 128, dtype=torch.bfloat16, device="cuda", seed=8)
    norm(x), norm(x, x)
    rot = RotaryEmbedding(128, 64, RopeSpec())
    pos = torch.arange(4, device="cuda")
    rot(pos, x.view(4, 1, 128), x.view(4, 1, 128))
    assert calls == ["norm", "norm", "rope"]
    x.requires_grad_(True)  # autograd needs the torch code: the kernels are forward-only
    norm(x)
    assert calls == ["norm", "norm", "rope"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(5, 64),  # [N, D]
        lambda: torch.randn(64),  # [D]
        lambda: torch.randn(3, 40 * 16)[:, 16 : 6 * 16 + 16].view(3, 6, 16),  # strided head view
        lambda: torch.randn(2, 3, 4, 16),  # 4-d, merges into a view
        lambda: torch.randn(2, 5, 4, 16).transpose(0, 1),  # 4-d, leading dims do not merge
        lambda: torch.randn(16, 6).t(),  # strided last dim: copied
        lambda: torch.randn(4, 5, 16)[:, 1:4],  # [T, H, D] with an offset and a token stride of 5 * 16
    ],
)
def test_row_layout_addresses_every_row(make):
    x = make()
    base, A, B, sa, sb = kernels.row_layout(x)
    D = x.shape[-1]
    assert A * B * D == x.numel() and base.stride(-1) == 1
    rows = torch.as_strided(base, (A, B, D), (sa, sb, 1))
    assert torch.equal(rows.reshape(x.shape), x)
    if x.stride(-1) == 1 and x.ndim <= 3:
        assert base.data_ptr() == x.data_ptr()  # no copy for the layouts the layers produce
