"""Sparse mixture-of-experts MLP: a top-k router and gated experts stored stacked.

Routers (MoEConfig.router): "softmax_topk" (Mixtral, Qwen3-MoE: softmax over all experts, the top k,
optionally renormalized) and "topk_softmax" (GPT-OSS: the top k logits, then a softmax over those k; the
router has a bias). Experts: SwiGLU, or GPT-OSS's clamped SwiGLU with biases on both projections
(MoEConfig.activation, .bias).

Module and parameter names follow transformers 5 (`mlp.gate.weight`, `mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`), so a checkpoint in that fused layout loads 1:1. Per-expert checkpoints
(`experts.{e}.w1/w2/w3` in Mixtral hub checkpoints, `experts.{e}.gate_proj/up_proj/down_proj` in Qwen's) are
placed into the stacked tensors by `FusedExperts.load_shard`, driven by each family's
`expert_params_mapping` (applied by models/weights.py).

Tensor parallelism: every rank holds every expert, each its slice of the expert intermediate dim
(gate/up rows [r*I/tp, (r+1)*I/tp), the matching down columns), and the partial sums are all-reduced once
after the block, as in the dense MLP. Why not experts split by rank: routing is identical on every rank
(the router is replicated and sees the same all-reduced hidden states), so there is no token dispatch
(all-to-all) and no load imbalance when the router favours a few experts, it works for any expert count
(Mixtral's 8 at tp 4 as well as gpt-oss's 32), and the fused-MoE kernel runs unchanged on the smaller
matrices. The down bias (GPT-OSS) joins rank 0's partial sum only.

Compute: on CUDA with Triton, all experts run as two grouped GEMMs (pie.kernels.moe.fused_moe); elsewhere a
loop over the experts that received tokens (pie.kernels.moe.moe_reference), as transformers' eager path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pie import kernels
from pie.distributed import all_reduce, tp_rank, tp_size
from pie.kernels.moe import Activation, moe_reference, silu_and_mul, swiglu_oai
from pie.layers.parallel import Source, TensorSource, copy_pieces, divide, whole
from pie.models.config import MoEConfig

ROUTERS = ("softmax_topk", "topk_softmax")


def expert_activation(moe: MoEConfig) -> Activation:
    if moe.activation == "silu":
        return silu_and_mul
    if moe.activation == "swiglu_oai":
        return swiglu_oai(moe.swiglu_limit, moe.swiglu_alpha)
    raise ValueError(f"MoE activation {moe.activation!r} is not one of silu, swiglu_oai")


class TopKRouter(nn.Module):
    """logits = x @ W.T (+ b) in fp32. softmax_topk: probabilities softmax(logits); the k largest, optionally
    renormalized. topk_softmax: the k largest logits, softmax over them (sums to 1 by construction).

    The logits are computed in fp32 even for bf16 activations (transformers computes them in the activation
    dtype): the top-k choice is discontinuous, and a bf16-rounded logit flips near-tied experts far more
    often, which moves a token's output by a whole expert. The [T, E] matmul is tiny beside the experts'.
    """

    def __init__(self, hidden: int, moe: MoEConfig) -> None:
        super().__init__()
        if moe.router not in ROUTERS:
            raise ValueError(f"MoE router {moe.router!r} is not one of {ROUTERS}")
        self.top_k, self.renormalize, self.router = moe.top_k, moe.renormalize, moe.router
        self.weights_in_activation_dtype = moe.weights_in_activation_dtype
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden))
        self.bias = nn.Parameter(torch.empty(moe.num_experts)) if moe.bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k] fp32 or x's dtype, expert ids [T, k] int64)."""
        bias = None if self.bias is None else self.bias.float()
        logits = F.linear(x.float(), self.weight.float(), bias)  # [T, E]
        if self.router == "topk_softmax":
            top, ids = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.softmax(top, dim=-1)
        else:
            weights, ids = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
            if self.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_in_activation_dtype:
            weights = weights.to(x.dtype)
        return weights, ids


class FusedExperts(nn.Module):
    """E gated experts as two stacked tensors:
    gate_up_proj [E, 2I, H] (rows [0, I) gate, [I, 2I) up) and down_proj [E, H, I]; with `bias`,
    gate_up_proj_bias [E, 2I] (same row order) and down_proj_bias [E, H]. Under tensor parallelism I is
    this rank's slice I / tp of the intermediate dim (module doc); `full_intermediate` is the checkpoint's."""

    # which stacked parameter each per-expert checkpoint part goes to, and its row offset in units of I
    PARTS: dict[str, tuple[str, int]] = {
        "gate": ("gate_up_proj", 0),
        "up": ("gate_up_proj", 1),
        "down": ("down_proj", 0),
    }

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        bias: bool = False,
        act: Activation = silu_and_mul,
    ) -> None:
        super().__init__()
        self.full_intermediate = intermediate
        intermediate = divide(intermediate, tp_size(), "the experts' intermediate size")
        self.i_start = tp_rank() * intermediate
        self.num_experts, self.intermediate, self.act = num_experts, intermediate, act
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden)) if bias else None

    def shard_ids(self, param_name: str) -> set[tuple[int, str]]:
        """Every (expert, part) a per-expert checkpoint must supply for `param_name` (for the loader)."""
        parts = [p for p, (name, _) in self.PARTS.items() if name == param_name]
        return {(e, p) for e in range(self.num_experts) for p in parts}

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str]) -> None:
        """Copy one expert's checkpoint matrix (gate/up [I, H], down [H, I]) into its slice of `param`."""
        self.load_param("", param, TensorSource(loaded), shard_id)

    def load_param(
        self, name: str, param: nn.Parameter, src: Source, shard_id: tuple[int, str] | None
    ) -> None:
        """This rank's slice of a checkpoint tensor: one expert's matrix (shard_id (e, part): gate/up
        [I, H], down [H, I]) or a stacked tensor (shard_id None, see the class doc)."""
        n, i0, full = self.intermediate, self.i_start, self.full_intermediate
        if shard_id is None:
            if name == "down_proj_bias":
                whole(src, param.data, name)
            elif name == "down_proj":  # [E, H, I]: columns
                copy_pieces(param.data, src, 2, full, [(0, i0, n)], name)
            else:  # gate_up_proj [E, 2I, H] / its bias [E, 2I]: gate rows, then up rows
                copy_pieces(param.data, src, 1, 2 * full, [(0, i0, n), (n, full + i0, n)], name)
            return
        expert, part = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is out of range: the config has {self.num_experts} experts")
        dst = param.data[expert]
        if part == "down":  # [H, I]
            copy_pieces(dst, src, 1, full, [(0, i0, n)], f"expert {expert} {part}")
        else:  # [I, H] into the gate or the up rows
            dst = dst.narrow(0, self.PARTS[part][1] * n, n)
            copy_pieces(dst, src, 0, full, [(0, i0, n)], f"expert {expert} {part}")

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; weights, ids: [T, k] -> [T, H]."""
        args = (
            x,
            self.gate_up_proj,
            self.down_proj,
            weights,
            ids,
            self.gate_up_proj_bias,
            self.down_proj_bias if tp_rank() == 0 else None,  # once in the all-reduced sum
        )
        if kernels.use_triton(x):
            from pie.kernels.moe import fused_moe

            return fused_moe(*args, act=self.act)
        return moe_reference(*args, act=self.act)


class SparseMoE(nn.Module):
    """The MoE block that replaces the dense MLP: route, then run the chosen experts and sum them weighted."""

    def __init__(self, hidden: int, moe: MoEConfig) -> None:
        super().__init__()
        self.gate = TopKRouter(hidden, moe)
        self.experts = FusedExperts(
            moe.num_experts, hidden, moe.expert_intermediate_size, moe.bias, expert_activation(moe)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H] (this rank's partial sums, all-reduced)."""
        weights, ids = self.gate(x)
        return all_reduce(self.experts(x, weights, ids))
