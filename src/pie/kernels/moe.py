"""Fused mixture-of-experts MLP: every expert's SwiGLU in two grouped GEMM launches (Triton), no Python loop.

Data flow for T tokens, each routed to k of E experts (N = T * k (token, slot) pairs):

    align_by_expert(topk_ids)      sort the N pairs by expert, pad each expert's run to a multiple of BLOCK_M
        sorted_ids  [P] int32      pair index n = t * k + j, or N (padding) ; P >= N, a static bound
        block_expert[P / BLOCK_M]  the one expert each BLOCK_M-row block belongs to (E past the end)
        num_padded  [1]            how many of the P rows are used (blocks beyond it exit at once)
    gemm 1:  inter[n] = x[n // k] @ w1[e(n)].T (+ b1[e(n)])        [N, 2I]  (gate | up, HF 5's `gate_up_proj`)
    act:     h[n] = act(gate, up)                                  [N, I]   (torch, in x's dtype as HF rounds it)
    gemm 2:  out[n] = weight[n] * (h[n] @ w2[e(n)].T (+ b2[e(n)]))  [N, H]   fp32
    y[t] = sum_j out[t * k + j]                                    [T, H]   cast to x's dtype

act is `silu_and_mul` (SwiGLU: Mixtral, Qwen) or `swiglu_oai` (GPT-OSS: clamped, (up + 1) * gate *
sigmoid(alpha * gate)); the expert biases (GPT-OSS) are added to the fp32 accumulator inside the GEMMs.

Every step has shapes fixed by (T, k, E) and no host synchronization, so the whole thing can be captured in
a CUDA graph. `moe_reference` is the plain PyTorch loop over experts that the kernel is tested against.
The design follows vLLM/SGLang's fused_moe (token sort by expert + grouped GEMM); the code is our own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # CPU-only installs: only moe_reference and align_by_expert are usable
    HAS_TRITON = False


Activation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up."""
    return F.silu(gate) * up


def swiglu_oai(limit: float | None, alpha: float) -> Activation:
    """GPT-OSS's clamped SwiGLU (transformers' GptOssExperts._apply_gate): gate clamped from above at
    `limit`, up to [-limit, limit]; (up + 1) * gate * sigmoid(alpha * gate)."""

    def act(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if limit is not None:
            gate = gate.clamp(min=None, max=limit)
            up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return act


def moe_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    act: Activation = silu_and_mul,
) -> torch.Tensor:
    """The plain loop (transformers' eager experts): x [T, H]; w1 [E, 2I, H]; w2 [E, H, I];
    topk_weights [T, k] (fp32 or x's dtype); topk_ids [T, k] int; optional biases b1 [E, 2I], b2 [E, H].
    Returns [T, H] in x's dtype.

    Only experts that received tokens run. Each expert's output is scaled by its routing weight (in the
    promoted dtype of the two, as HF does) and added into an x-dtype accumulator.
    """
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    flat = topk_ids.reshape(-1)
    for e in torch.unique(flat).tolist():  # one host sync per layer: the CPU path, where it is free
        tok, slot = torch.where(topk_ids == e)
        gate, up = F.linear(x[tok], w1[e], None if b1 is None else b1[e]).split(inter, dim=-1)
        h = F.linear(act(gate, up), w2[e], None if b2 is None else b2[e]) * topk_weights[tok, slot, None]
        # tokens are unique within one expert; index_put_ is ~100x faster than index_add_ on the CPU
        out.index_put_((tok,), h.to(out.dtype), accumulate=True)
    return out


def align_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the N = T * k (token, slot) pairs by expert, each expert's run padded to a multiple of block_m.

    Returns (sorted_ids [P] int32, block_expert [P // block_m] int32, num_padded [1] int32) with
    P = N + min(N, E) * (block_m - 1) rounded up to block_m: at most min(N, E) experts get pairs and each
    wastes < block_m rows. Padding rows hold N; blocks past num_padded belong to expert E (none).
    Static shapes, no host sync (CUDA-graph safe).
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    dev = flat.device
    p = -(-(n + min(n, num_experts) * (block_m - 1)) // block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)  # [E] end row of each expert's padded run
    order = torch.argsort(flat, stable=True)  # pair indices grouped by expert, in token order within one
    expert_of = flat[order]
    rank = torch.arange(n, device=dev) - (counts.cumsum(0) - counts)[expert_of]  # index within its expert
    dest = (padded_end - padded)[expert_of] + rank
    sorted_ids = torch.full((p,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, p, block_m, device=dev)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_ids, block_expert, padded_end[-1:].to(torch.int32)


if HAS_TRITON:

    @triton.jit
    def _grouped_gemm_kernel(
        a_ptr,  # [M_a, K]: x [T, H] (gemm 1, row = pair // TOP_K) or h [N, I] (gemm 2, row = pair)
        b_ptr,  # [E, N_out, K]: w1 or w2, one matrix per expert, used transposed
        c_ptr,  # [N, N_out] output rows indexed by pair
        w_ptr,  # [N] routing weights (read only with MUL_WEIGHT)
        bias_ptr,  # [E, N_out] per-expert bias (read only with HAS_BIAS)
        sorted_ids_ptr,  # [P] int32
        block_expert_ptr,  # [P // BLOCK_M] int32
        num_padded_ptr,  # [1] int32
        num_pairs,  # N: the padding sentinel
        N_out,
        K,
        stride_am,
        stride_ak,
        stride_be,
        stride_bn,
        stride_bk,
        stride_cm,
        stride_cn,
        stride_bias_e,
        TOP_K: tl.constexpr,
        MUL_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (no silent TF32); None (default) otherwise
    ):
        pid = tl.program_id(0)
        num_n_blocks = tl.cdiv(N_out, BLOCK_N)
        pid_m = pid // num_n_blocks
        pid_n = pid % num_n_blocks
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return  # past the last expert's run (the grid is sized for the worst case)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + rows)
        row_ok = pair < num_pairs
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + (pair // TOP_K).to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = (
            b_ptr
            + expert * stride_be
            + offs_n[None, :].to(tl.int64) * stride_bn
            + offs_k[:, None] * stride_bk
        )
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N_out), other=0.0)
            acc += tl.dot(a, b, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if HAS_BIAS:
            bias = tl.load(bias_ptr + expert * stride_bias_e + offs_n, mask=offs_n < N_out, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if MUL_WEIGHT:
            acc *= tl.load(w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N_out))


def launch_config(num_pairs: int, num_experts: int) -> dict[str, int]:
    """Tile sizes: 16-row blocks when experts get few rows each (decode), 64 when they get many (prefill)."""
    block_m = 16 if num_pairs <= 4 * num_experts else 64
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}


def _gemm(a, b, c, weights, bias, sorted_ids, block_expert, num_padded, num_pairs, top_k, cfg) -> None:
    n_out, k = b.shape[1], b.shape[2]
    grid = (block_expert.numel() * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    _grouped_gemm_kernel[grid](
        a,
        b,
        c,
        c if weights is None else weights,  # unread without MUL_WEIGHT
        c if bias is None else bias,  # unread without HAS_BIAS
        sorted_ids,
        block_expert,
        num_padded,
        num_pairs,
        n_out,
        k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        c.stride(0),
        c.stride(1),
        0 if bias is None else bias.stride(0),
        TOP_K=top_k,
        MUL_WEIGHT=weights is not None,
        HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else None,
        **cfg,
    )


def _check(x, w1, w2, topk_weights, topk_ids, b1=None, b2=None) -> None:
    if x.ndim != 2 or w1.ndim != 3 or w2.ndim != 3:
        raise ValueError(
            f"fused_moe: x must be [T, H], w1 [E, 2I, H], w2 [E, H, I]; got {tuple(x.shape)}, "
            f"{tuple(w1.shape)}, {tuple(w2.shape)}"
        )
    E, two_i, H = w1.shape
    if x.shape[1] != H or w2.shape != (E, H, two_i // 2) or two_i % 2:
        raise ValueError(
            f"fused_moe: shapes disagree: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}"
        )
    if topk_ids.shape != topk_weights.shape or topk_ids.ndim != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [T={x.shape[0]}, k]"
        )
    if x.dtype != w1.dtype or x.dtype != w2.dtype:
        raise ValueError(f"fused_moe: x {x.dtype}, w1 {w1.dtype}, w2 {w2.dtype} must share a dtype")
    if b1 is not None and b1.shape != (E, two_i) or b2 is not None and b2.shape != (E, H):
        raise ValueError(f"fused_moe: biases must be b1 [{E}, {two_i}] and b2 [{E}, {H}]")


def fused_moe(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    act: Activation = silu_and_mul,
) -> torch.Tensor:
    """Same contract as moe_reference (x [T, H]; w1 [E, 2I, H]; w2 [E, H, I]; topk_* [T, k]; optional
    biases b1 [E, 2I], b2 [E, H]; the gated activation) in two grouped GEMM launches. Routing ids outside
    [0, E) are not detected (the router cannot produce them)."""
    _check(x, w1, w2, topk_weights, topk_ids, b1, b2)
    T, k = topk_ids.shape
    E, two_i, H = w1.shape
    n = T * k
    if n == 0:
        return torch.zeros_like(x)
    x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
    b1 = None if b1 is None else b1.contiguous()
    b2 = None if b2 is None else b2.contiguous()
    cfg = launch_config(n, E)
    sorted_ids, block_expert, num_padded = align_by_expert(topk_ids, E, cfg["BLOCK_M"])
    inter = torch.empty((n, two_i), dtype=x.dtype, device=x.device)
    _gemm(x, w1, inter, None, b1, sorted_ids, block_expert, num_padded, n, k, cfg)
    gate, up = inter.split(two_i // 2, dim=-1)
    h = act(gate, up).contiguous()  # [N, I], rounded to x's dtype like HF's act_fn(gate) * up
    out = torch.empty((n, H), dtype=torch.float32, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    _gemm(h, w2, out, weights, b2, sorted_ids, block_expert, num_padded, n, 1, cfg)
    return out.view(T, k, H).sum(dim=1).to(x.dtype)
