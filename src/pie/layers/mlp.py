"""Gated MLP (SwiGLU, or GELU-tanh for Gemma) with one fused gate/up matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pie.layers.parallel import GateUpParallelLinear, RowParallelLinear


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": _gelu_tanh}


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str = "silu") -> None:
        super().__init__()
        self.act = ACTIVATIONS[act]
        # column-parallel gate/up, row-parallel down (its all-reduce is the MLP's one collective)
        self.gate_up_proj = GateUpParallelLinear(hidden, intermediate)
        self.intermediate = self.gate_up_proj.local_intermediate  # this rank's
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=False, what="intermediate_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]; down(act(gate(x)) * up(x)) (gate, up: [T, I / tp])."""
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)
