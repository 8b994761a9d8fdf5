"""Rotary position embedding (NeoX/HF "rotate_half" layout), per layer: default, linear, llama3, yarn and
longrope frequencies (transformers' modeling_rope_utils semantics), partial rotary (the first
int(head_dim * partial_rotary_factor) dims of each head rotate, the rest pass through), plus Mistral 3's
llama_4 query scaling.

cos/sin are precomputed once in fp32 for every position < max_position (times yarn's attention factor, as
transformers multiplies them) and gathered by the token positions each forward; the inferlet chooses
positions freely, so they are not tied to KV slots. Layers with equal (head_dim, RopeSpec) share one table.
"""

from __future__ import annotations

import math

import torch

from pie import kernels
from pie.attention.base import AttentionMetadata
from pie.layers.longrope import longrope_inv_freq, longrope_rows
from pie.models.config import RopeSpec


def _base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (theta**exponent)


def _llama3(inv_freq: torch.Tensor, s: RopeSpec) -> torch.Tensor:
    # keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
    old_ctx = s.original_max_position_embeddings
    low_freq_wavelen = old_ctx / s.low_freq_factor
    high_freq_wavelen = old_ctx / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(head_dim: int, s: RopeSpec) -> tuple[torch.Tensor, float]:
    """transformers' _compute_yarn_parameters, step for step (fp32, same op order)."""

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = s.factor
    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = float(mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim))
        else:
            attention_factor = mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        orig = s.original_max_position_embeddings
        return (head_dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(s.theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = torch.clamp(
        (torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1
    )
    pos_freqs = s.theta ** (torch.arange(0, head_dim, 2, device="cpu").to(dtype=torch.float) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq, float(attention_factor)


def rope_inv_freq(head_dim: int, spec: RopeSpec) -> tuple[torch.Tensor, float]:
    """([head_dim // 2] fp32 inverse frequencies on the CPU, cos/sin scale), exactly as transformers.
    head_dim here is the rotated width (rotary_dim under partial rotary). longrope: the short set."""
    if spec.rope_type == "longrope":
        return longrope_inv_freq(head_dim, spec.theta, spec.short_factor), float(spec.attention_factor)
    if spec.rope_type == "yarn":
        return _yarn(head_dim, spec)
    inv_freq = _base_inv_freq(head_dim, spec.theta)
    if spec.rope_type == "default":
        return inv_freq, 1.0
    if spec.rope_type == "linear":
        return inv_freq / spec.factor, 1.0
    if spec.rope_type == "llama3":
        return _llama3(inv_freq, spec), 1.0
    if spec.rope_type == "proportional":
        # transformers' _compute_proportional_rope_parameters: the first int(f * D // 2) frequencies of the
        # full head dim rotate; the rest are 0 (cos 1, sin 0: those pairs pass through unrotated)
        rope_angles = int(spec.partial_rotary_factor * head_dim // 2)
        inv_freq = torch.cat([inv_freq[:rope_angles], torch.zeros(head_dim // 2 - rope_angles, device="cpu")])
        return inv_freq / spec.factor, 1.0
    raise ValueError(f"rope type {spec.rope_type!r} is not implemented")  # ModelConfig rejects it first


def llama4_query_scale(positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor | None:
    """[T] fp32 query scale 1 + beta * log(1 + floor(pos / original_max)) (Mistral 3), or None."""
    if spec.llama_4_scaling_beta is None:
        return None
    floor = torch.floor(positions.float() / spec.original_max_position_embeddings)
    return 1 + spec.llama_4_scaling_beta * torch.log(1 + floor)


class RotaryEmbedding:
    """Not an nn.Module on purpose: the cache is derived data, built lazily on the device of first use,
    so meta-device model construction and dtype casts of the model never touch it."""

    def __init__(self, head_dim: int, max_position: int, spec: RopeSpec) -> None:
        self.head_dim = head_dim
        self.rotary_dim = spec.rotary_dim(head_dim)
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= head_dim:
            raise ValueError(f"rotary dim {self.rotary_dim} must be even and in (0, head_dim={head_dim}]")
        self.max_position = max_position
        self.spec = spec
        inv_freq, self.attention_scaling = rope_inv_freq(self.rotary_dim, spec)
        self.inv_freqs = [inv_freq]  # longrope: [short, long]; the table stacks one block per set
        if spec.rope_type == "longrope":
            self.inv_freqs.append(longrope_inv_freq(self.rotary_dim, spec.theta, spec.long_factor))
        # [len(inv_freqs) * max_position, rotary_dim] fp32: cos half | sin half
        self._cos_sin: torch.Tensor | None = None

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.inv_freqs[0]

    def cos_sin(self, device: torch.device) -> torch.Tensor:
        if self._cos_sin is None or self._cos_sin.device != device:
            pos = torch.arange(self.max_position, dtype=torch.float32, device="cpu")
            blocks = []
            for inv_freq in self.inv_freqs:
                freqs = torch.outer(pos, inv_freq)  # [max_position, rotary_dim // 2]
                cs = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
                if self.attention_scaling != 1.0:  # yarn, longrope: transformers scales cos and sin in fp32
                    cs = cs * self.attention_scaling
                blocks.append(cs)
            self._cos_sin = torch.cat(blocks).to(device)
        return self._cos_sin

    def table_rows(self, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """[T] rows of the cos/sin table for the tokens at `positions`: the positions themselves, except
        under longrope (the long set's rows for requests past original_max_position_embeddings)."""
        if len(self.inv_freqs) == 1:
            return positions
        return longrope_rows(positions, meta, self.spec.original_max_position_embeddings, self.max_position)

    def __call__(
        self, rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rows: [T] int64 (table_rows; the positions except under longrope); q: [T, Hq, D]; k: [T, Hkv, D].
        Returns rotated (q, k), new tensors. On CUDA: one Triton launch (pie.kernels.apply_rope) that gathers
        cos/sin itself; under partial rotary it rotates strided views of the first rotary_dim dims."""
        rd = self.rotary_dim
        q_rot, k_rot = (q, k) if rd == self.head_dim else (q[..., :rd], k[..., :rd])
        if kernels.use_triton(q):
            q_rot, k_rot = kernels.apply_rope(q_rot, k_rot, rows, self.cos_sin(q.device))
        else:
            cos, sin = self.cos_sin(q.device)[rows].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, rd/2] each
            q_rot, k_rot = _rotate(q_rot, cos, sin), _rotate(k_rot, cos, sin)
        if rd == self.head_dim:
            return q_rot, k_rot
        return torch.cat([q_rot, q[..., rd:]], dim=-1), torch.cat([k_rot, k[..., rd:]], dim=-1)


class RotaryCache:
    """One RotaryEmbedding per distinct (head_dim, RopeSpec) of a model's layers."""

    def __init__(self, max_position: int) -> None:
        self.max_position = max_position
        self._by_key: dict[tuple[int, RopeSpec], RotaryEmbedding] = {}

    def get(self, head_dim: int, spec: RopeSpec) -> RotaryEmbedding:
        key = (head_dim, spec)
        if key not in self._by_key:
            self._by_key[key] = RotaryEmbedding(head_dim, self.max_position, spec)
        return self._by_key[key]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF: x * cat(cos, cos) + rotate_half(x) * sin, with cos/sin cast to x's dtype first.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
