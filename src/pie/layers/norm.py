"""RMSNorm with an optional fused residual add (the residual stream skips a copy per layer)."""

from __future__ import annotations

import torch
from torch import nn

from pie import kernels


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), normalized in fp32 then cast back (as HF does, so
    bf16 results match transformers bit for bit in the common case)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

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
