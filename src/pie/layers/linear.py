"""Linear layers whose weight is several HF tensors stacked along the output dim (fused qkv, gate_up).

Which checkpoint tensor goes into which shard is declared as data by each model
(`packed_modules_mapping`, e.g. {"q_proj": ("qkv_proj", "q")}); the loader (models/weights.py) calls
`load_shard` with the shard id.
"""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """y = x @ W.T (+ b) where W = cat([W_s for s in shards], dim=0).

    shards: ordered {shard_id: output_size}; weight is [sum(sizes), in_features].
    """

    def __init__(self, in_features: int, shards: dict[str | int, int], bias: bool) -> None:
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shard_slices: dict[str | int, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shards.items():
            self.shard_slices[shard_id] = (offset, size)
            offset += size

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int) -> None:
        """Copy one checkpoint tensor (weight [size, in] or bias [size]) into its rows of `param`."""
        offset, size = self.shard_slices[shard_id]
        dst = param.data.narrow(0, offset, size)
        if dst.shape != loaded.shape:
            raise ValueError(
                f"shard {shard_id!r}: expected shape {tuple(dst.shape)}, got {tuple(loaded.shape)}"
            )
        dst.copy_(loaded)


class QKVLinear(MergedLinear):
    """Fused q/k/v projection: output [T, (Hq + 2 * Hkv) * D], split by the attention layer."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool) -> None:
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden, {"q": q, "k": kv, "v": kv}, bias=bias)
        self.split_sizes = [q, kv, kv]
