"""Partial rotary embedding with LongRoPE's two frequency sets (Phi-3, Phi-3.5, Phi-4-mini).

- Partial: only the first `rotary_dim` = int(head_dim * partial_rotary_factor) dims of each head rotate
  (NeoX rotate_half over those dims); the rest pass through.
- LongRoPE: inverse frequencies 1 / (ext_factor[i] * theta^(2i / rotary_dim)) with ext = short_factor
  for short contexts and long_factor for long ones; cos and sin are both multiplied by the attention factor.

The fp32 table holds both sets, [2 * max_position, rotary_dim] (cos half | sin half): rows [0, max_position)
are the short set, rows [max_position, 2 * max_position) the long set. Callers pass *table indices*, which
the family computes per batch (`rope_index`, see models/phi3.py for the rule); without long factors the
table has only the short half and indices are positions.
"""

from __future__ import annotations

import torch

from pie import kernels
from pie.layers.rotary import _rotate


def longrope_inv_freq(rotary_dim: int, theta: float, ext_factors: tuple[float, ...] | None) -> torch.Tensor:
    """[rotary_dim // 2] fp32 on the CPU (also under a meta-device model build), exactly as transformers
    computes it (default and longrope)."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    if ext_factors is None:
        return 1.0 / (theta**exponent)
    return 1.0 / (torch.tensor(ext_factors, dtype=torch.float32, device="cpu") * theta**exponent)


class PartialLongRope:
    """Same call contract as RotaryEmbedding, (table_index [T], q [T, Hq, D], k [T, Hkv, D]) -> (q, k)."""

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_position: int,
        theta: float,
        short_factor: tuple[float, ...] | None = None,
        long_factor: tuple[float, ...] | None = None,
        attention_factor: float = 1.0,
    ) -> None:
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and in (0, head_dim={head_dim}]")
        self.head_dim, self.rotary_dim, self.max_position = head_dim, rotary_dim, max_position
        self.attention_factor = attention_factor
        self.inv_freqs = [longrope_inv_freq(rotary_dim, theta, short_factor)]
        if long_factor is not None:
            self.inv_freqs.append(longrope_inv_freq(rotary_dim, theta, long_factor))
        self._cos_sin: torch.Tensor | None = None  # [len(inv_freqs) * max_position, rotary_dim] fp32

    @property
    def has_long(self) -> bool:
        return len(self.inv_freqs) == 2

    def cos_sin(self, device: torch.device) -> torch.Tensor:
        if self._cos_sin is None or self._cos_sin.device != device:
            pos = torch.arange(self.max_position, dtype=torch.float32, device="cpu")
            halves = []
            for inv_freq in self.inv_freqs:
                freqs = torch.outer(pos, inv_freq)  # [max_position, rotary_dim // 2]
                # HF: cos = emb.cos() * attention_scaling in fp32, cast to the activation dtype later
                halves.append(torch.cat([freqs.cos(), freqs.sin()], dim=-1) * self.attention_factor)
            self._cos_sin = torch.cat(halves).to(device)
        return self._cos_sin

    def __call__(
        self, table_index: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rd = self.rotary_dim
        table = self.cos_sin(q.device)
        q_rot, k_rot = q[..., :rd], k[..., :rd]
        if kernels.use_triton(q):  # one launch on the rotated dims (strided views are fine)
            q_rot, k_rot = kernels.apply_rope(q_rot, k_rot, table_index, table)
        else:
            cos, sin = table[table_index].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, rd / 2] each
            q_rot, k_rot = _rotate(q_rot, cos, sin), _rotate(k_rot, cos, sin)
        if rd == self.head_dim:
            return q_rot, k_rot
        return torch.cat([q_rot, q[..., rd:]], dim=-1), torch.cat([k_rot, k[..., rd:]], dim=-1)
