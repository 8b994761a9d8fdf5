"""Gemma 4's MoE block (gemma-4-26B-A4B): a softmax router with top-k renormalization and a learned
per-expert scale, and experts stored as stacked 3-D tensors, run beside the dense MLP of the same layer.

Kept Gemma-4-specific on purpose (a separate branch adds the shared MoE layer, pie.layers.moe); the lead
folds this router/expert pair into it after both merge. Module and parameter names mirror transformers'
Gemma4TextRouter / Gemma4TextExperts, so checkpoint tensors load by name:
    router.proj.weight [E, H], router.scale [H], router.per_expert_scale [E]
    experts.gate_up_proj [E, 2 * I, H], experts.down_proj [E, H, I]

Compute, two paths with the same math:
  * grouped (CUDA): the T*k (token, expert) pairs sorted by expert, then one torch._grouped_mm for all
    experts' gate_up and one for down, offsets from a histogram on the device: no host sync, so decode can
    be captured in a CUDA graph (transformers' grouped_mm experts path does the same).
  * loop (CPU): over the experts that received tokens, transformers' eager path step for step, so fp32
    results match it exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pie.layers.mlp import ACTIVATIONS


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale-free RMSNorm as Gemma 4 computes it: fp32, x * (mean(x^2) + eps)^-0.5, cast back."""
    xf = x.float()
    return (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)).to(x.dtype)


class Gemma4Router(nn.Module):
    """[T, H] -> (weights [T, k] fp32, expert ids [T, k] int64)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float) -> None:
        super().__init__()
        self.top_k, self.eps, self.root = top_k, eps, hidden**-0.5
        self.proj = nn.Linear(hidden, num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = rms_normalize(x, self.eps) * self.scale * self.root
        probs = F.softmax(self.proj(h), dim=-1, dtype=torch.float32)  # [T, E]
        weights, ids = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


class Gemma4Experts(nn.Module):
    """sum_k w[t, k] * down_e(act(gate_e(x)) * up_e(x)) for e = ids[t, k]."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, act: str) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.act = ACTIVATIONS[act]
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; weights [T, k] fp32; ids [T, k] -> [T, H] in x's dtype."""
        if x.is_cuda and hasattr(torch, "_grouped_mm"):
            return self.grouped(x, weights, ids)
        return self.loop(x, weights, ids)

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        k = ids.shape[1]
        flat_ids, order = torch.sort(ids.reshape(-1), stable=True)  # [T*k] pairs grouped by expert
        tok = order // k
        counts = torch.histc(
            flat_ids.float() if x.device.type == "cpu" else flat_ids.int(),
            bins=self.num_experts,
            min=0,
            max=self.num_experts - 1,
        )
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E] end row of each expert's group
        gate, up = torch._grouped_mm(x[tok], self.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(self.act(gate) * up, self.down_proj.transpose(1, 2), offs=offs)  # [T*k, H]
        y = y * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, tok, y.to(x.dtype))

    def loop(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        # [E, k, T] one-hot; only experts that received a token run (one host sync per layer)
        mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        for e in torch.nonzero(mask.sum(dim=(1, 2))).flatten().tolist():
            slot, tok = torch.where(mask[e])
            gate, up = F.linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.down_proj[e]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out
