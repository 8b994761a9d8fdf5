"""Rotary position embedding (NeoX/HF "rotate_half" layout) with optional llama3 frequency scaling.

cos/sin are precomputed once in fp32 for every position < max_position and gathered by the token
positions each forward; the inferlet chooses positions freely, so they are not tied to KV slots.
"""

from __future__ import annotations

import math

import torch

from pie import kernels
from pie.models.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies on the CPU, computed exactly as transformers does."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling is None:
        return inv_freq
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    old_ctx = scaling.original_max_position_embeddings
    low_freq_wavelen = old_ctx / scaling.low_freq_factor
    high_freq_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Not an nn.Module on purpose: the cache is derived data, built lazily on the device of first use,
    so meta-device model construction and dtype casts of the model never touch it."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: RopeScaling | None) -> None:
        self.head_dim = head_dim
        self.max_position = max_position
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self._cos_sin: torch.Tensor | None = None  # [max_position, head_dim] fp32: cos half | sin half

    def cos_sin(self, device: torch.device) -> torch.Tensor:
        if self._cos_sin is None or self._cos_sin.device != device:
            pos = torch.arange(self.max_position, dtype=torch.float32, device="cpu")
            freqs = torch.outer(pos, self.inv_freq)  # [max_position, head_dim // 2]
            self._cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
        return self._cos_sin

    def __call__(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int64; q: [T, Hq, D]; k: [T, Hkv, D]. Returns rotated (q, k), new tensors.
        On CUDA: one Triton launch (pie.kernels.apply_rope) that gathers cos/sin itself."""
        if kernels.use_triton(q):
            return kernels.apply_rope(q, k, positions, self.cos_sin(q.device))
        cos, sin = self.cos_sin(q.device)[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF: x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), with cos/sin cast to x's dtype first.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
