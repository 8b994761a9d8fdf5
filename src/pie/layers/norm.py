"""RMSNorm with an optional fused residual add (the residual stream skips a copy per layer), and Gemma's
(1 + w) variant."""

from __future__ import annotations

import torch
from torch import nn

from pie import kernels


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), normalized in fp32 then cast back (as HF does, so
    bf16 results match transformers bit for bit in the common case)."""

    init_value = 1.0  # the weight value that makes the norm a plain normalization (random-weight init)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((dim,), self.init_value))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [..., dim]. With `residual`, returns (norm(x + residual), x + residual).
        On CUDA this is one fused Triton launch (pie.kernels.rms_norm) with the same rounding."""
        if kernels.use_triton(x):
            return kernels.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual


class GemmaRMSNorm(RMSNorm):
    """Gemma's y = (x / rms(x)) * (1 + weight), all in fp32, cast back last (transformers' Gemma2RMSNorm:
    "(x * w).to(dtype)", not llama's "w * x.to(dtype)"). No Triton kernel: its rounding differs."""

    init_value = 0.0

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual
