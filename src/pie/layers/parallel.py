"""Tensor-parallel building blocks: how a layer's weights split over the ranks, and the linears, embedding
and LM head that hold one rank's shard. At tensor_parallel_size 1 each is the plain layer (same shapes,
same math, no collectives).

Splits (rank r of tp):
  * fused QKV (column-parallel, by heads): query heads [r*Hq/tp, (r+1)*Hq/tp); KV heads likewise when
    Hkv >= tp, else replicated: rank r holds KV head r * Hkv // tp (each KV head on tp / Hkv ranks, beside
    the query heads that read it);
  * gate_up (column-parallel): rows [r*I/tp, (r+1)*I/tp) of gate and of up;
  * o_proj / down_proj (row-parallel): the matching input columns; partial sums are all-reduced (one
    all-reduce after attention, one after the MLP), the bias added once (rank 0, before the sum);
  * embedding and LM head (vocab-parallel): rows [r*Vp, (r+1)*Vp), Vp = ceil(V / tp), zero-padded; the
    embedding all-reduces (each token's row lives on one rank), the head all-gathers the logits.

Loading: the weight loader (models/weights.py) hands a module with `load_param` a *source* for each
checkpoint tensor: an object with `.shape`, `.narrow(dim, start, size) -> Tensor` (reads only that slice
from safetensors) and `.full() -> Tensor`. `copy_pieces` copies a rank's slices out of it.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pie.distributed import all_gather, all_reduce, tp_rank, tp_size
from pie.layers.linear import MergedLinear


class Source(Protocol):
    """One checkpoint tensor, read lazily (see module doc)."""

    shape: tuple[int, ...]

    def narrow(self, dim: int, start: int, size: int) -> torch.Tensor: ...

    def full(self) -> torch.Tensor: ...


def divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(
            f"{what} = {n} is not divisible by tensor_parallel_size {tp}; choose a tensor_parallel_size that "
            f"divides it"
        )
    return n // tp


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    """KV heads each rank holds: Hkv / tp, or 1 (replicated) when there are fewer KV heads than ranks."""
    if num_kv_heads >= tp:
        return divide(num_kv_heads, tp, "num_key_value_heads")
    if tp % num_kv_heads:
        raise ValueError(
            f"num_key_value_heads = {num_kv_heads} and tensor_parallel_size {tp}: with fewer KV heads than "
            "ranks, tensor_parallel_size must be a multiple of the KV head count"
        )
    return 1


def kv_head_start(num_kv_heads: int, tp: int, rank: int) -> int:
    """The first KV head rank `rank` holds."""
    if num_kv_heads >= tp:
        return rank * (num_kv_heads // tp)
    return rank * num_kv_heads // tp


def kv_replicas(num_kv_heads: int, tp: int) -> int:
    """On how many ranks each KV head lives (1 unless replicated)."""
    return 1 if num_kv_heads >= tp else tp // num_kv_heads


def copy_pieces(
    dst: torch.Tensor, src: Source, dim: int, full_size: int, pieces: list[tuple[int, int, int]], what: str
) -> None:
    """dst.narrow(dim, d, n) <- src.narrow(dim, s, n) for each (d, s, n); src must have full_size along dim
    and dst's size on every other dim (ValueError saying which shape was expected otherwise)."""
    want = list(dst.shape)
    want[dim] = full_size
    if list(src.shape) != want:
        raise ValueError(f"{what}: expected shape {tuple(want)}, got {tuple(src.shape)}")
    for d, s, n in pieces:
        dst.narrow(dim, d, n).copy_(src.narrow(dim, s, n))


def column_pieces(
    parts: dict[str | int, tuple[int, int, int]],
    shard_slices: dict[str | int, tuple[int, int]],
    shard_id: str | int | None,
) -> tuple[int, list[tuple[int, int, int]]]:
    """(full size along dim 0, [(dst row, src row, rows)]) of a column-parallel layer (`parts`: {shard_id:
    (full rows, first row of this rank, rows on this rank)}, `shard_slices`: where each part sits in the local
    weight) for one part, or for the whole fused tensor when the checkpoint stores it fused (shard_id None:
    Phi-3's qkv_proj, gate_up_proj). Shared by ColumnParallelMerged and its quantized twin (layers/quant.py)."""
    if shard_id is not None:
        full, start, n = parts[shard_id]
        return full, [(shard_slices[shard_id][0], start, n)]
    out, base = [], 0
    for k, (full, start, n) in parts.items():
        out.append((shard_slices[k][0], base + start, n))
        base += full
    return base, out


def whole(src: Source, dst: torch.Tensor, what: str) -> None:
    """A replicated tensor: the whole checkpoint tensor into dst."""
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"{what}: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}")
    dst.copy_(src.full())


class ColumnParallelMerged(MergedLinear):
    """A fused column-parallel linear of several checkpoint tensors (gate/up, q/k/v): each rank holds a slice
    of every part. parts: ordered {shard_id: (full rows, first row of this rank, rows on this rank)}.

    Output [T, sum(local rows)] stays sharded (no collective): the row-parallel layer after it reduces."""

    def __init__(self, in_features: int, parts: dict[str | int, tuple[int, int, int]], bias: bool) -> None:
        super().__init__(in_features, {k: n for k, (_, _, n) in parts.items()}, bias=bias)
        self.parts = parts

    def pieces(self, shard_id: str | int | None) -> tuple[int, list[tuple[int, int, int]]]:
        """(full size along dim 0, [(dst row, src row, rows)]) for one part (see `column_pieces`)."""
        return column_pieces(self.parts, self.shard_slices, shard_id)

    def load_param(self, name: str, param: nn.Parameter, src: Source, shard_id: str | int | None) -> None:
        full, pieces = self.pieces(shard_id)
        copy_pieces(param.data, src, 0, full, pieces, f"{name} shard {shard_id!r}")

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int) -> None:
        self.load_param("weight", param, TensorSource(loaded), shard_id)


class QKVParallelLinear(ColumnParallelMerged):
    """Fused q/k/v: output [T, (Hq_r + 2 * Hkv_r) * D] (this rank's heads, see the module doc)."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool) -> None:
        tp, r = tp_size(), tp_rank()
        hq = divide(num_heads, tp, "num_attention_heads")
        hkv = kv_heads_per_rank(num_kv_heads, tp)
        kv0 = kv_head_start(num_kv_heads, tp, r)
        q_full, kv_full = num_heads * head_dim, num_kv_heads * head_dim
        parts = {
            "q": (q_full, r * hq * head_dim, hq * head_dim),
            "k": (kv_full, kv0 * head_dim, hkv * head_dim),
            "v": (kv_full, kv0 * head_dim, hkv * head_dim),
        }
        super().__init__(hidden, parts, bias=bias)
        self.num_heads, self.num_kv_heads = hq, hkv  # this rank's
        self.split_sizes = [hq * head_dim, hkv * head_dim, hkv * head_dim]


class GateUpParallelLinear(ColumnParallelMerged):
    """Fused gate/up: output [T, 2 * I / tp] (this rank's gate rows, then its up rows)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        n = divide(intermediate, tp_size(), "intermediate_size")
        start = tp_rank() * n
        super().__init__(hidden, {0: (intermediate, start, n), 1: (intermediate, start, n)}, bias=bias)
        self.local_intermediate = n


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_r @ W_r.T) + b: input features split over the ranks ([T, in / tp] in), the full
    output [T, out] on every rank. The bias joins rank 0's partial sum, so the sum has it once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, what: str = "in_features") -> None:
        self.full_in = in_features
        n = divide(in_features, tp_size(), what)
        super().__init__(n, out_features, bias=bias)
        self.in_start = tp_rank() * n

    def load_param(self, name: str, param: nn.Parameter, src: Source, shard_id: None) -> None:
        if name == "bias":
            whole(src, param.data, name)
            return
        copy_pieces(param.data, src, 1, self.full_in, [(0, self.in_start, self.in_features)], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return super().forward(x)
        bias = self.bias if tp_rank() == 0 else None
        return all_reduce(F.linear(x, self.weight, bias))


def vocab_rows(vocab: int) -> tuple[int, int, int]:
    """(rows per rank Vp = ceil(V / tp), this rank's first row, its rows that are real: the rest pad)."""
    tp = tp_size()
    per = -(-vocab // tp)
    start = tp_rank() * per
    return per, start, max(0, min(vocab, start + per) - start)


class VocabParallelEmbedding(nn.Embedding):
    """[T] int64 token ids -> [T, H]: this rank's rows of the table; the other ranks' tokens read zeros
    and the all-reduce fills them in. `scale` (Gemma: sqrt(hidden)) multiplies the result, rounded to
    the weight dtype first (as transformers' Gemma2TextScaledWordEmbedding multiplies by a tensor cast to
    the weight dtype)."""

    def __init__(self, vocab: int, hidden: int, scale: float | None = None) -> None:
        per, start, real = vocab_rows(vocab)
        super().__init__(per, hidden)
        self.vocab, self.start, self.real, self.scale = vocab, start, real, scale

    def load_param(self, name: str, param: nn.Parameter, src: Source, shard_id: None) -> None:
        param.data.zero_()  # padding rows (last rank) stay zero: their logits are dropped
        dst = param.data.narrow(0, 0, self.real)
        copy_pieces(dst, src, 0, self.vocab, [(0, self.start, self.real)], name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            x = super().forward(input_ids)
        else:
            local = input_ids - self.start
            outside = (local < 0) | (local >= self.real)  # [T]: rows another rank holds
            x = F.embedding(local.masked_fill(outside, 0), self.weight)
            x = all_reduce(x.masked_fill(outside[:, None], 0))
        if self.scale is not None:
            x = x * torch.tensor(self.scale, dtype=self.weight.dtype, device="cpu").item()
        return x


def vocab_parallel_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab: int) -> torch.Tensor:
    """hidden [O, H] @ this rank's rows [Vp, H].T, gathered over the ranks -> [O, V] fp32 (computed in the
    weight dtype, as HF does, then upcast)."""
    logits = F.linear(hidden, weight)  # [O, Vp]
    if tp_size() > 1:
        logits = all_gather(logits, dim=-1)[:, :vocab]  # [O, tp * Vp] -> [O, V]
    return logits.float()


class ParallelLMHead(nn.Module):
    """[O, H] -> [O, V] fp32 logits (vocab-parallel, gathered on every rank)."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        per, self.start, self.real = vocab_rows(vocab)
        self.vocab = vocab
        self.weight = nn.Parameter(torch.empty(per, hidden))

    load_param = VocabParallelEmbedding.load_param

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_logits(hidden, self.weight, self.vocab)


class TensorSource:
    """A Source over a tensor already in memory (transformed or dequantized checkpoint tensors)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def narrow(self, dim: int, start: int, size: int) -> torch.Tensor:
        return self.tensor.narrow(dim, start, size)

    def full(self) -> torch.Tensor:
        return self.tensor
