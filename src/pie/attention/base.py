"""Attention backends: plan once per batch, run once per layer.

KV cache layout (FlashInfer's NHD), one tensor per layer:
    kv_cache[layer]: [num_pages, 2, page_size, num_kv_heads, head_dim]   (index 0 = K, 1 = V)

A token's KV slot s of a request lives at page kv_page_indices[r][s // page_size], offset s % page_size.

Per-layer attention parameters (AttentionParams: heads, scale, sliding window, logit soft-cap, sinks) are
fixed when the model is built; a backend is told every distinct one at construction (`layer_params`) so it
can plan once per batch for each attention kind present, and each layer's run() names its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from pie.drivers.protocol import ForwardBatch


@dataclass(frozen=True)
class AttentionParams:
    """One layer's attention, as the backends see it (hashable: layers with equal params share a plan).

    window_left: a query at KV slot s sees slots s - window_left .. s (FlashInfer's convention; an HF
    sliding_window W is window_left W - 1); -1 = unbounded. logits_soft_cap: scores -> cap * tanh(scores / cap)
    after scaling, before the mask; 0 = off. has_sinks: a per-head sink logit joins the softmax denominator
    (the layer passes the sink tensor to run()).
    """

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    sm_scale: float
    window_left: int = -1
    logits_soft_cap: float = 0.0
    has_sinks: bool = False

    @property
    def kind(self) -> str:
        return "sliding" if self.window_left >= 0 else "full"


@dataclass
class AttentionMetadata:
    """Per-batch attention inputs, built once by the executor and shared by all layers."""

    num_tokens: int
    num_requests: int
    page_size: int
    # device tensors
    qo_indptr: torch.Tensor  # [R+1] int32
    kv_page_indptr: torch.Tensor  # [R+1] int32
    kv_page_indices: torch.Tensor  # [P] int32
    kv_last_page_len: torch.Tensor  # [R] int32
    kv_lens: torch.Tensor  # [R] int32, after append
    append_pages: torch.Tensor  # [T] int64, page that receives token t's K/V
    append_offsets: torch.Tensor  # [T] int64, slot within that page
    mask: torch.Tensor | None  # flat bool, per request [n_r, kv_len_r] row-major; None = causal
    mask_indptr: torch.Tensor | None  # [R+1] int64
    # host copies (numpy), for backends that plan on the host
    qo_indptr_host: np.ndarray
    kv_page_indptr_host: np.ndarray
    kv_page_indices_host: np.ndarray
    kv_last_page_len_host: np.ndarray
    kv_lens_host: np.ndarray
    is_decode: bool  # every request has exactly one new token and there is no mask

    @classmethod
    def from_batch(cls, batch: ForwardBatch, page_size: int, device: torch.device) -> AttentionMetadata:
        qo_lens = batch.qo_lens()
        kv_lens = batch.kv_lens(page_size)
        R = batch.num_requests
        # slot of each new token: kv_len - n + i for i in 0..n-1, vectorized over the batch
        req_of_tok = np.repeat(np.arange(R), qo_lens)
        tok_in_req = np.arange(batch.num_tokens) - batch.qo_indptr[req_of_tok]
        slots = (kv_lens - qo_lens)[req_of_tok] + tok_in_req
        pages = batch.kv_page_indices[batch.kv_page_indptr[req_of_tok] + slots // page_size]

        def dev(a, dtype):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype, non_blocking=True)

        return cls(
            num_tokens=batch.num_tokens,
            num_requests=R,
            page_size=page_size,
            qo_indptr=dev(batch.qo_indptr, torch.int32),
            kv_page_indptr=dev(batch.kv_page_indptr, torch.int32),
            kv_page_indices=dev(batch.kv_page_indices, torch.int32),
            kv_last_page_len=dev(batch.kv_last_page_len, torch.int32),
            kv_lens=dev(kv_lens, torch.int32),
            append_pages=dev(pages, torch.int64),
            append_offsets=dev(slots % page_size, torch.int64),
            mask=None if batch.mask is None else dev(batch.mask, torch.bool),
            mask_indptr=None if batch.mask_indptr is None else dev(batch.mask_indptr, torch.int64),
            qo_indptr_host=batch.qo_indptr,
            kv_page_indptr_host=batch.kv_page_indptr,
            kv_page_indices_host=batch.kv_page_indices,
            kv_last_page_len_host=batch.kv_last_page_len,
            kv_lens_host=kv_lens,
            is_decode=bool(batch.mask is None and np.all(qo_lens == 1)),
        )


FP8_KV = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value; the cast of anything larger is NaN, so writes saturate


def append_kv(
    kv_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    scales: tuple[float, float] | None = None,
) -> None:
    """Write this batch's new K/V into the paged cache.

    kv_cache: [num_pages, 2, page_size, Hkv, D]; k, v: [T, Hkv, D]. An FP8 cache stores k / k_scale and
    v / v_scale (scales: this layer's (k_scale, v_scale); None = 1), saturated to e4m3's range.
    """
    if kv_cache.dtype == FP8_KV:
        k_scale, v_scale = scales or (1.0, 1.0)
        k = (k.float() * (1.0 / k_scale)).clamp_(-FP8_MAX, FP8_MAX)
        v = (v.float() * (1.0 / v_scale)).clamp_(-FP8_MAX, FP8_MAX)
    kv_cache[meta.append_pages, 0, meta.append_offsets] = k.to(kv_cache.dtype)
    kv_cache[meta.append_pages, 1, meta.append_offsets] = v.to(kv_cache.dtype)


class AttentionBackend(ABC):
    """One instance per executor. `plan` once per batch (host work), `run` once per layer."""

    name: str = "base"

    def __init__(
        self,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        sm_scale: float | None = None,
        layer_params: list[AttentionParams] | None = None,
        kv_dtype: torch.dtype | None = None,
        kv_scales: list[tuple[float, float]] | None = None,
    ) -> None:
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.dtype = dtype
        self.device = device
        self.sm_scale = sm_scale if sm_scale is not None else head_dim**-0.5
        # what run() uses when a caller names no params: full causal attention with the shape above
        self.default_params = AttentionParams(num_qo_heads, num_kv_heads, head_dim, self.sm_scale)
        # every distinct layer's params, in first-use order (the kinds planned per batch)
        self.layer_params: list[AttentionParams] = list(dict.fromkeys(layer_params or [self.default_params]))
        # KV pages' element dtype (dtype unless an FP8 cache) and, for FP8, each layer's (k_scale, v_scale):
        # stored = value / scale, read = stored * scale
        self.kv_dtype = kv_dtype or dtype
        self.kv_scales = kv_scales

    def kv_scale(self, layer_idx: int) -> tuple[float, float] | None:
        """This layer's FP8 KV scales (None: the cache is not FP8, or both scales are 1: nothing to apply)."""
        if self.kv_scales is None or self.kv_scales[layer_idx] == (1.0, 1.0):
            return None
        return self.kv_scales[layer_idx]

    @abstractmethod
    def plan(self, meta: AttentionMetadata) -> None:
        """Prepare for a batch; called once before the layers run."""

    @abstractmethod
    def run(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        layer_idx: int,
        params: AttentionParams | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; kv_cache: this layer's [num_pages, 2, page_size, Hkv, D], already appended;
        params: this layer's (None: default_params); sinks: [Hq] sink logits when params.has_sinks.

        Returns [T, Hq, D] in q's dtype.
        """
