"""Portable paged attention in plain PyTorch (CPU, or CUDA without FlashInfer).

Plan (once per batch) splits the requests into groups and precomputes, per group, the token rows it
owns, the (page, offset) of every KV slot to gather, and the bool mask; run (once per layer) gathers K/V
with one advanced-indexing op per group and calls torch SDPA. FP8 pages (kv_dtype float8_e4m3fn) are
dequantized as they are gathered: cast to the query dtype, times the layer's scale.

Groups: all single-token requests (decode steps, with or without a custom mask) form ONE group, padded
to the longest KV length (padding masked out), so a decode batch is one SDPA call per layer. Each
multi-token request is its own group (no padding waste when one long prefill shares a batch with many
decodes). Invariant: a group's query rows are never padded. Written by hand because no maintained
library offers paged attention without CUDA; SDPA does the math.

Per-layer params: a sliding window ANDs a band (slot > q_slot - window_left - 1) into the group's mask,
built once per (group, window) per batch and shared by every layer with that window. A logit soft-cap or
attention sinks take the explicit path (matmul, cap * tanh(s / cap), mask, fp32 softmax with the sink
column, matmul), which is transformers' eager attention step for step; everything else runs SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pie.attention.base import AttentionBackend, AttentionMetadata, AttentionParams


@dataclass
class _Group:
    rows: torch.Tensor | slice  # token rows of this group in the batch (slice for one request)
    pages: torch.Tensor  # [G, S] int64 page of each gathered KV slot
    offsets: torch.Tensor  # [G, S] int64 offset in that page
    mask: torch.Tensor | None  # [G, 1, n, S] bool (True = attend); None = plain causal (n == S)
    num_rows: int  # G * n
    q_slots: torch.Tensor  # [G, 1, n, 1] int64 KV slot of each query row (for windows)
    windowed: dict[int, torch.Tensor]  # window_left -> [G, 1, n, S] mask with the band applied

    def mask_for(self, window_left: int) -> torch.Tensor | None:
        """The group's mask for a layer with this window (None: plain causal, SDPA's fast path)."""
        if window_left < 0:
            return self.mask
        m = self.windowed.get(window_left)
        if m is None:
            S = self.pages.shape[1]
            slot = torch.arange(S, device=self.pages.device).view(1, 1, 1, S)
            base = self.mask
            if base is None:  # fresh prefill: causal over slots 0..n-1
                base = slot <= self.q_slots
            m = base & (slot >= self.q_slots - window_left)
            self.windowed[window_left] = m
        return m


class TorchBackend(AttentionBackend):
    name = "torch"

    def plan(self, meta: AttentionMetadata) -> None:
        qo = meta.qo_indptr_host.astype(np.int64)
        qo_lens = np.diff(qo)
        kv_lens = meta.kv_lens_host.astype(np.int64)
        page_ptr = meta.kv_page_indptr_host.astype(np.int64)
        # host copy of mask_indptr (validated by ForwardBatch.validate to be these block sizes)
        mask_ptr = np.concatenate([[0], np.cumsum(qo_lens * kv_lens)])
        self._groups: list[_Group] = []
        single = np.flatnonzero(qo_lens == 1)
        if single.size:
            self._groups.append(self._plan_group(meta, single, qo, kv_lens, page_ptr, mask_ptr, n=1))
        for r in np.flatnonzero(qo_lens > 1):
            self._groups.append(
                self._plan_group(meta, np.array([r]), qo, kv_lens, page_ptr, mask_ptr, n=int(qo_lens[r]))
            )

    def _plan_group(
        self,
        meta: AttentionMetadata,
        reqs: np.ndarray,
        qo: np.ndarray,
        kv_lens: np.ndarray,
        page_ptr: np.ndarray,
        mask_ptr: np.ndarray,
        n: int,
    ) -> _Group:
        """Requests `reqs` (each with exactly n new tokens) padded to the group's longest KV length S."""
        dev = self.device
        lens = kv_lens[reqs]  # [G]
        S = int(lens.max())
        slot = np.arange(S)[None, :]  # [1, S]
        valid = slot < lens[:, None]  # [G, S]
        slot_c = np.minimum(slot, lens[:, None] - 1)  # padding re-reads the last real slot (masked out)
        pages = meta.kv_page_indices_host[page_ptr[reqs][:, None] + slot_c // self.page_size]
        offsets = slot_c % self.page_size
        rows = (
            slice(int(qo[reqs[0]]), int(qo[reqs[0]]) + n)
            if len(reqs) == 1
            else torch.from_numpy(qo[reqs]).to(dev)
        )

        if meta.mask is not None:
            # Custom mask: request r's block is mask[mask_indptr[r] : +n*kv_len] as [n, kv_len].
            idx = mask_ptr[reqs][:, None, None] + np.arange(n)[None, :, None] * lens[:, None, None]
            idx = idx + slot_c[:, None, :]  # [G, n, S] flat index of (row i, slot j) of each request
            mask = meta.mask[torch.from_numpy(idx).to(dev)] & torch.from_numpy(valid)[:, None, :].to(dev)
        elif n == S:
            mask = None  # fresh prefill: plain causal, lets SDPA pick its fused causal kernel
        else:
            # Causal over slots: new token i sits at slot kv_len - n + i and sees slots <= that.
            q_slot = lens[:, None] - n + np.arange(n)[None, :]  # [G, n]
            mask = torch.from_numpy((slot[:, None, :] <= q_slot[:, :, None]) & valid[:, None, :]).to(dev)
        if mask is not None:
            mask = mask.unsqueeze(1)  # [G, 1, n, S], broadcast over heads
        q_slots = lens[:, None] - n + np.arange(n)[None, :]  # [G, n]
        return _Group(
            rows=rows,
            pages=torch.from_numpy(pages).to(dev),
            offsets=torch.from_numpy(offsets).to(dev),
            mask=mask,
            num_rows=len(reqs) * n,
            q_slots=torch.from_numpy(q_slots).to(dev).view(len(reqs), 1, n, 1),
            windowed={},
        )

    def run(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        layer_idx: int,
        params: AttentionParams | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; kv_cache: [num_pages, 2, page_size, Hkv, D] -> [T, Hq, D]."""
        p = params or self.default_params
        if p.has_sinks and sinks is None:
            raise ValueError(f"layer {layer_idx} has attention sinks but run() got no sink tensor")
        Hq, D = p.num_qo_heads, p.head_dim
        out = torch.empty_like(q)
        for g in self._groups:
            G = g.pages.shape[0]
            n = g.num_rows // G
            qg = q[g.rows].view(G, n, Hq, D).transpose(1, 2)  # [G, Hq, n, D]
            k = kv_cache[g.pages, 0, g.offsets].transpose(1, 2).to(q.dtype)  # [G, Hkv, S, D]
            v = kv_cache[g.pages, 1, g.offsets].transpose(1, 2).to(q.dtype)
            scales = self.kv_scale(layer_idx)
            if scales is not None:  # FP8 pages hold value / scale (attention.base.append_kv)
                k, v = k * scales[0], v * scales[1]
            mask = g.mask_for(p.window_left)
            if p.logits_soft_cap > 0 or p.has_sinks:
                o = _explicit_attention(qg, k, v, mask, p, sinks)
            else:
                o = F.scaled_dot_product_attention(
                    qg,
                    k,
                    v,
                    attn_mask=mask,
                    is_causal=mask is None and n > 1,
                    scale=p.sm_scale,
                    enable_gqa=Hq != p.num_kv_heads,
                )  # [G, Hq, n, D]
            out[g.rows] = o.transpose(1, 2).reshape(g.num_rows, Hq, D)
        return out


def _explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    p: AttentionParams,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """transformers' eager attention: q [G, Hq, n, D], k/v [G, Hkv, S, D], mask [G, 1, n, S] or None
    (causal, n == S) -> [G, Hq, n, D]."""
    group = p.num_qo_heads // p.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.matmul(q, k.transpose(2, 3)) * p.sm_scale  # [G, Hq, n, S]
    if p.logits_soft_cap > 0:
        s = torch.tanh(s / p.logits_soft_cap) * p.logits_soft_cap
    if mask is None:
        n, S = s.shape[-2:]
        mask = torch.ones(n, S, dtype=torch.bool, device=s.device).tril(S - n)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:  # one extra logit per head that takes probability mass but has no value
        sink = sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        probs = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
    else:
        probs = torch.softmax(s, dim=-1, dtype=torch.float32)
    return torch.matmul(probs.to(q.dtype), v)
