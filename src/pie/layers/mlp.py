"""Gated MLP (SwiGLU, or GELU-tanh for Gemma) with one fused gate/up matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pie.layers.linear import MergedLinear


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": _gelu_tanh}


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str = "silu") -> None:
        super().__init__()
        self.intermediate = intermediate
        self.act = ACTIVATIONS[act]
        self.gate_up_proj = MergedLinear(hidden, {0: intermediate, 1: intermediate}, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]; down(act(gate(x)) * up(x))."""
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)
