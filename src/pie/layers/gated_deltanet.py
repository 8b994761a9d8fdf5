"""Gated DeltaNet (Qwen 3.5's linear-attention layers): a causal depthwise conv, then the gated delta rule,
with per-sequence recurrent state kept in the executor's state pool (not in KV pages).

Per token t and value head h (k, q l2-normalized, q scaled by head_k_dim^-0.5; S is [dk, dv]):

    S_t = exp(g_t) * S_{t-1} + k_t (beta_t * (v_t - k_t^T exp(g_t) S_{t-1}))^T      o_t = q_t^T S_t
    g_t = -exp(A_log) * softplus(a_t + dt_bias)   (log decay, <= 0)      beta_t = sigmoid(b_t)

then o = RMSNormGated(o, z) per head (weight * norm(o), times silu(z)) and out_proj.

Why our own torch code: flash-linear-attention (FLA, the maintained Triton kernels) is not installed and has
no CPU path. Prefill runs the chunked (WY / UT-transform) form, chunks of 64 tokens (matmuls inside a chunk,
a short loop across chunks); decode runs the one-step recurrence vectorized over the batch. Both read a
sequence's state from its slot and write it back in place. A request whose first new token is at KV slot 0
starts from a zero state (a fresh sequence, or a recompute after preemption).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pie.layers.linear import MergedLinear
from pie.layers.norm import RMSNorm
from pie.models.config import GatedDeltaNetConfig

CHUNK = 64


@dataclass
class RecurrentBatch:
    """Per-batch inputs of the recurrent layers, built by the executor.

    conv_states: [S, Lr, conv_dim, K - 1] (activation dtype), delta_states: [S, Lr, Hv, dk, dv] fp32: the
    whole pool, slot-major (a slot's state is contiguous); layer i of the Lr recurrent layers reads [:, i].
    slots: [R] int64 (device) each request's slot; fresh: [R] bool or 0/1 integers (device) the request
    starts at slot 0 of its KV, so its state starts from zero (CUDA graphs stage both as int64 rows). qo_indptr / fresh_host: the same on the host, for the prefill loop.
    """

    conv_states: torch.Tensor
    delta_states: torch.Tensor
    slots: torch.Tensor
    fresh: torch.Tensor
    qo_indptr: list[int]
    fresh_host: list[bool]
    is_decode: bool  # every request has exactly one new token


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (FLA's and transformers' form)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, fp32. q, k: [H, T, dk] (normalized, q scaled); v: [H, T, dv]; g, beta: [H, T];
    state: [H, dk, dv]. Returns (o [H, T, dv], final state [H, dk, dv]).

    Within a chunk of C tokens the C sequential rank-1 updates are one triangular solve: with
    L[i, j] = exp(G_i - G_j) (G the in-chunk cumulative log decay) and A = strict_lower(diag(beta) K K^T * L),
    (I + A) U = diag(beta) V gives the chunk's corrected values before the carried state and
    (I + A) W = diag(beta exp(G)) K how the carried state leaks into them. Then per chunk:
    v' = U - W S;  o = (Q exp(G)) S + (Q K^T * L, causal) v';  S <- exp(G_C) S + (K exp(G_C - G))^T v'."""
    H, T, dk = k.shape
    chunk = min(chunk, T)  # a short prompt is one chunk of its own length (no padding to solve)
    pad = (-T) % chunk
    if pad:  # zero keys and betas, zero log-decay: padded tokens change nothing
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (T + pad) // chunk
    q, k, v = (x.reshape(H, n, chunk, -1) for x in (q, k, v))
    g, beta = g.reshape(H, n, chunk), beta.reshape(H, n, chunk)
    G = g.cumsum(-1)  # [H, n, C]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    L = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [H, n, C, C]
    kb = k * beta[..., None]
    A = (kb @ k.transpose(-1, -2) * L).tril(-1)
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    system = eye + A
    U = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(system, kb * G.exp()[..., None], upper=False, unitriangular=True)
    attn = q @ k.transpose(-1, -2) * L  # [H, n, C, C], zero above the diagonal
    q_dec = q * G.exp()[..., None]
    k_dec = k * (G[..., -1:] - G).exp()[..., None]
    chunk_decay = G[..., -1].exp()[..., None, None]  # [H, n, 1, 1]
    out = torch.empty_like(v)
    S = state
    for i in range(n):
        v_new = U[:, i] - W[:, i] @ S  # [H, C, dv]
        out[:, i] = q_dec[:, i] @ S + attn[:, i] @ v_new
        S = S * chunk_decay[:, i] + k_dec[:, i].transpose(-1, -2) @ v_new
    return out.reshape(H, n * chunk, -1)[:, :T], S


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence, fp32, batched: q, k: [R, H, dk]; v: [R, H, dv]; g, beta: [R, H];
    state: [R, H, dk, dv]. Returns (o [R, H, dv], new state)."""
    S = state * g.exp()[..., None, None]
    kv_mem = (k.unsqueeze(-2) @ S).squeeze(-2)  # [R, H, dv] = k^T S
    delta = (v - kv_mem) * beta[..., None]
    S = S + k.unsqueeze(-1) * delta.unsqueeze(-2)
    return (q.unsqueeze(-2) @ S).squeeze(-2), S


class RMSNormGated(RMSNorm):
    """weight * rms_norm(x) (in the activation dtype, llama-style rounding), times silu(gate) in fp32
    (transformers' Qwen3_5RMSNormGated). No fused residual."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * xf.to(dtype)
        return (y * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    """Qwen 3.5's linear_attn. state_index: this layer's index among the model's recurrent layers (its row
    in the state pool). in_proj fuses the checkpoint's in_proj_qkv, in_proj_z, in_proj_b, in_proj_a."""

    def __init__(self, hidden: int, cfg: GatedDeltaNetConfig, state_index: int, eps: float) -> None:
        super().__init__()
        self.cfg, self.state_index = cfg, state_index
        self.in_proj = MergedLinear(
            hidden,
            {"qkv": cfg.conv_dim, "z": cfg.value_dim, "b": cfg.num_v_heads, "a": cfg.num_v_heads},
            bias=False,
        )
        self.split_sizes = [cfg.conv_dim, cfg.value_dim, cfg.num_v_heads, cfg.num_v_heads]
        # depthwise causal conv over q|k|v; weight [conv_dim, 1, K] as in the checkpoint
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(cfg.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(cfg.num_v_heads))
        self.norm = RMSNormGated(cfg.head_v_dim, eps)
        self.out_proj = nn.Linear(cfg.value_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, rb: RecurrentBatch) -> torch.Tensor:
        """x: [T, H] -> [T, H]; reads and writes the batch's slots of this layer's state in place."""
        c = self.cfg
        T = x.shape[0]
        mixed, z, b, a = self.in_proj(x).split(self.split_sizes, dim=-1)
        beta = b.float().sigmoid()  # [T, Hv]
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # [T, Hv]
        conv_pool = rb.conv_states[:, self.state_index]  # [S, C, K-1] view
        delta_pool = rb.delta_states[:, self.state_index]  # [S, Hv, dk, dv] view
        if rb.is_decode:
            o = self._decode(mixed, g, beta, rb, conv_pool, delta_pool)
        else:
            o = self._prefill(mixed, g, beta, rb, conv_pool, delta_pool)
        o = self.norm(o.reshape(T * c.num_v_heads, c.head_v_dim), z.reshape(T * c.num_v_heads, c.head_v_dim))
        return self.out_proj(o.reshape(T, c.value_dim))

    def _heads(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conv output [T, conv_dim] -> fp32 q, k [T, Hv, dk] (normalized, grouped heads repeated, q scaled)
        and v [T, Hv, dv]."""
        c = self.cfg
        T = mixed.shape[0]
        q, k, v = mixed.float().split([c.key_dim, c.key_dim, c.value_dim], dim=-1)
        q, k = (
            l2norm(q.reshape(T, c.num_k_heads, c.head_k_dim)),
            l2norm(k.reshape(T, c.num_k_heads, c.head_k_dim)),
        )
        if c.num_v_heads != c.num_k_heads:  # each q/k head serves num_v / num_k consecutive value heads
            rep = c.num_v_heads // c.num_k_heads
            q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
        return q * c.head_k_dim**-0.5, k, v.reshape(T, c.num_v_heads, c.head_v_dim)

    def _decode(self, mixed, g, beta, rb: RecurrentBatch, conv_pool, delta_pool):
        """One token per request (R == T): the conv window and the delta state, gathered, stepped, scattered."""
        keep = rb.fresh.logical_not()[:, None, None]
        conv = conv_pool.index_select(0, rb.slots) * keep.to(conv_pool.dtype)  # [R, C, K-1]
        window = torch.cat([conv, mixed.to(conv.dtype).unsqueeze(-1)], dim=-1)  # [R, C, K]
        w = self.conv1d.weight[:, 0, :]  # [C, K]
        out = F.silu((window.to(w.dtype) * w).sum(-1)).to(mixed.dtype)  # [R, C]
        conv_pool.index_copy_(0, rb.slots, window[..., 1:])
        q, k, v = self._heads(out)
        state = delta_pool.index_select(0, rb.slots) * keep[..., None].float()  # [R, Hv, dk, dv]
        o, state = recurrent_step(q, k, v, g, beta, state)
        delta_pool.index_copy_(0, rb.slots, state)
        return o.to(mixed.dtype)

    def _prefill(self, mixed, g, beta, rb: RecurrentBatch, conv_pool, delta_pool) -> torch.Tensor:
        """Requests one at a time: conv over (saved inputs | new tokens), then the chunked rule."""
        K = self.cfg.conv_kernel
        w = self.conv1d.weight
        out = torch.empty(mixed.shape[0], self.cfg.value_dim, dtype=mixed.dtype, device=mixed.device)
        for r in range(len(rb.qo_indptr) - 1):
            lo, hi = rb.qo_indptr[r], rb.qo_indptr[r + 1]
            slot = rb.slots[r : r + 1]
            xs = mixed[lo:hi].t()  # [C, n]
            if rb.fresh_host[r]:
                prev = torch.zeros(xs.shape[0], K - 1, dtype=conv_pool.dtype, device=xs.device)
                state = torch.zeros_like(delta_pool[0])
            else:
                prev = conv_pool.index_select(0, slot)[0]
                state = delta_pool.index_select(0, slot)[0]
            xs = torch.cat([prev, xs.to(prev.dtype)], dim=-1)  # [C, K-1+n]
            conv_pool.index_copy_(0, slot, xs[None, :, -(K - 1) :])
            y = F.silu(F.conv1d(xs.to(w.dtype)[None], w, groups=xs.shape[0])[0]).to(mixed.dtype)  # [C, n]
            q, k, v = self._heads(y.t())
            o, state = chunk_gated_delta_rule(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), g[lo:hi].t(), beta[lo:hi].t(), state
            )
            delta_pool.index_copy_(0, slot, state[None])
            out[lo:hi] = o.transpose(0, 1).reshape(hi - lo, -1).to(mixed.dtype)
        return out
