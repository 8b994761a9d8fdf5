"""Paged attention through FlashInfer 0.6.3 (CUDA fast path).

Per attention kind (each distinct AttentionParams of the model's layers: e.g. Gemma 2's sliding and full
layers, which differ in window_left) there is one pair of wrappers, and a batch plans exactly one of each
pair, once, before the layers run; each layer's run() uses its kind's planned wrapper:
  * decode batches (every request has one new token, no mask) -> BatchDecodeWithPagedKVCacheWrapper
  * everything else (prefill, mixed, custom masks)           -> BatchPrefillWithPagedKVCacheWrapper
The window (window_left), logit soft-cap (logits_soft_cap) and softmax scale (sm_scale) are plan()
arguments of both wrappers in 0.6.3. All wrappers share one 128 MiB float workspace: runs are sequential on
one stream, and each wrapper keeps its own plan info.

Attention sinks (GPT-OSS): 0.6.3's standard FA2 kernels ignore sinks (its `sinks=` argument reaches only the
trtllm-gen kernels, Blackwell), but it ships `BatchAttentionWithAttentionSinkWrapper`: a paged prefill-style
wrapper whose JIT-built FA2 variant adds a per-head sink logit to the softmax denominator, with the sliding
window (window_left, fixed at construction) and the softmax scale as run arguments. Kinds with sinks run on
it for causal batches, prefill and decode alike (a decode step is a prefill of one token per request); it
takes no custom mask and no soft-cap, so masked batches of those kinds, and sink kinds with a soft-cap, use
the torch fallback below. A wrapper whose JIT build fails (no CUDA toolkit on the host) is logged and its
kind falls back as well.

Per-layer fallback: kinds FlashInfer 0.6.3 cannot run (head dims other than 64/128/256; see above for sinks)
run on the portable torch backend instead, planned for the same batch; the others stay on FlashInfer. CUDA
graphs are off for such models (the torch backend plans on the host per batch), and so for every model with
sinks (masked batches may need the fallback; the graph-mode decode wrappers have no sink variant).

FP8 KV cache (kv_dtype float8_e4m3fn): every wrapper is planned with kv_data_type e4m3 and reads the pages as
they are (no dequantized copy); each layer's (k_scale, v_scale) goes to run(), which folds k_scale into the
softmax scale and multiplies the output by v_scale (the sink wrapper gets the same two by hand).

Both use the NHD layout, which is pie's cache layout: kv_cache[layer] is [num_pages, 2, page_size, Hkv, D].
FlashInfer's causal mode aligns the query block to the end of the KV (query i of a request with qo_len n and
kv_len L sees slots <= L - n + i), which is exactly pie's "new tokens occupy the last n slots" rule. A custom
mask is pie's flat bool layout unchanged: per request a row-major [qo_len, kv_len] block, concatenated.
Positions never reach FlashInfer (pos_encoding_mode "NONE"): the model applies RoPE before attention.

Why the FA2 kernels everywhere (backend="fa2"), although 0.6.3 would pick FA3 on Hopper: FA3 has no custom
masks, and a wrapper fixes its backend at its first plan, so an "auto" prefill wrapper that first saw a causal
batch would later run masked batches on FA3. One FA2 module per (dtype, head_dim) serves causal, masked and
tensor-core decode alike, which also keeps JIT compile time (~100 s per prefill module) to one module.

Host work and syncs: plan() wants CPU indptr arrays, and pie already has them (AttentionMetadata's numpy
copies), so plan costs no device->host sync. The exception is a batch with a custom mask: 0.6.3 packs the
bool mask on the device with an indptr derived from the indptr tensors it is given, so those must be device
tensors there and plan syncs a few times (reading them back). Its `packed_custom_mask` path cannot be used
instead: it pairs the packed bytes with a per-request offset counted in bits, not bytes.

CUDA graphs (pie.drivers.cuda_graphs): FlashInferDecodeGraph is a decode wrapper in FlashInfer's graph mode
for one fixed batch size; the eager wrappers above are untouched by it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pie.attention.base import AttentionBackend, AttentionMetadata, AttentionParams
from pie.errors import DriverError

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended float workspace (split-k partial results)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
KV_LAYOUT = "NHD"
FA_BACKEND = "fa2"
# The CUDA-core decode kernel is compiled for GQA group sizes 1, 2, 3, 4, 8 only; from 4 up the
# tensor-core path (a prefill kernel with qo_len 1) is faster and handles any group size.
TENSOR_CORE_MIN_GROUP = 4


def unsupported_reason(num_qo_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """Why FlashInfer cannot run this attention shape (None when it can). Pure; no CUDA needed."""
    if dtype not in SUPPORTED_DTYPES:
        name = str(dtype).removeprefix("torch.")
        return f"FlashInfer attention needs bfloat16 or float16 activations, not {name}"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"FlashInfer attention supports head_dim {', '.join(map(str, SUPPORTED_HEAD_DIMS))}, not {head_dim}"
    if num_kv_heads < 1 or num_qo_heads % num_kv_heads:
        return f"num_qo_heads {num_qo_heads} is not a multiple of num_kv_heads {num_kv_heads}"
    return None


def params_unsupported_reason(p: AttentionParams, dtype: torch.dtype) -> str | None:
    """Why FlashInfer's paged wrappers cannot run a layer of these params (None when they can)."""
    if p.has_sinks and p.logits_soft_cap > 0:
        return "FlashInfer 0.6.3's attention-sink wrapper has no logit soft-cap"
    return unsupported_reason(p.num_qo_heads, p.num_kv_heads, p.head_dim, dtype)


def decode_uses_tensor_cores(num_qo_heads: int, num_kv_heads: int) -> bool:
    return num_qo_heads // num_kv_heads >= TENSOR_CORE_MIN_GROUP


def _scale_kwargs(scales: tuple[float, float] | None) -> dict[str, float]:
    """run()'s k_scale / v_scale for an FP8 cache (0.6.3 multiplies sm_scale by k_scale and the output by
    v_scale); nothing otherwise."""
    return {} if scales is None else {"k_scale": scales[0], "v_scale": scales[1]}


def _host_i32(a: np.ndarray) -> torch.Tensor:
    """A CPU int32 tensor sharing memory with `a` when it already is contiguous int32 (no copy)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))


def _kind_kwargs(p: AttentionParams) -> dict[str, Any]:
    """The per-kind plan arguments: sliding window and soft-cap only where set (0.6.3's defaults otherwise)."""
    out: dict[str, Any] = {}
    if p.window_left >= 0:
        out["window_left"] = p.window_left
    if p.logits_soft_cap > 0:
        out["logits_soft_cap"] = p.logits_soft_cap
    return out


def decode_plan_args(
    backend: AttentionBackend, meta: AttentionMetadata, params: AttentionParams | None = None
) -> tuple[tuple, dict[str, Any]]:
    """Arguments of BatchDecodeWithPagedKVCacheWrapper.plan (0.6.3) for a decode batch and one kind.

    indptr and last_page_len are CPU tensors (plan reads them on the host and copies them up itself);
    indices are meta's device tensor (plan only moves them to the device, a no-op then).
    """
    p = params or backend.default_params
    args = (
        _host_i32(meta.kv_page_indptr_host),  # indptr [R+1]
        meta.kv_page_indices,  # indices [P], device
        _host_i32(meta.kv_last_page_len_host),  # last_page_len [R]
        p.num_qo_heads,
        p.num_kv_heads,
        p.head_dim,
        backend.page_size,
    )
    kwargs = dict(
        pos_encoding_mode="NONE",
        q_data_type=backend.dtype,
        kv_data_type=backend.kv_dtype,  # float8_e4m3fn for an FP8 cache: the kernels read it as is
        sm_scale=p.sm_scale,
        **_kind_kwargs(p),
    )
    return args, kwargs


def prefill_plan_args(
    backend: AttentionBackend, meta: AttentionMetadata, params: AttentionParams | None = None
) -> tuple[tuple, dict[str, Any]]:
    """Arguments of BatchPrefillWithPagedKVCacheWrapper.plan (0.6.3): causal, or pie's custom mask.

    Without a mask the indptrs are CPU tensors (no sync). With a mask they are meta's device tensors,
    because FlashInfer packs the bool mask on the device with segment offsets computed from them
    (sum of qo_len * kv_len per request, which is exactly meta.mask_indptr).
    """
    if meta.mask is None:
        qo_indptr = _host_i32(meta.qo_indptr_host)
        kv_indptr = _host_i32(meta.kv_page_indptr_host)
        last_page_len = _host_i32(meta.kv_last_page_len_host)
    else:
        qo_indptr, kv_indptr, last_page_len = meta.qo_indptr, meta.kv_page_indptr, meta.kv_last_page_len
    p = params or backend.default_params
    args = (
        qo_indptr,  # qo_indptr [R+1]
        kv_indptr,  # paged_kv_indptr [R+1]
        meta.kv_page_indices,  # paged_kv_indices [P], device
        last_page_len,  # paged_kv_last_page_len [R]
        p.num_qo_heads,
        p.num_kv_heads,
        p.head_dim,  # head_dim_qk (head_dim_vo defaults to it)
        backend.page_size,
    )
    kwargs = dict(
        custom_mask=meta.mask,  # flat bool [sum(qo_len * kv_len)] or None; True = may attend
        causal=meta.mask is None,  # ignored by FlashInfer when custom_mask is given
        pos_encoding_mode="NONE",
        sm_scale=p.sm_scale,
        q_data_type=backend.dtype,
        kv_data_type=backend.kv_dtype,  # float8_e4m3fn for an FP8 cache: the kernels read it as is
        **_kind_kwargs(p),
    )
    return args, kwargs


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"

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
        super().__init__(
            num_qo_heads,
            num_kv_heads,
            head_dim,
            page_size,
            dtype,
            device,
            sm_scale,
            layer_params,
            kv_dtype,
            kv_scales,
        )
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise DriverError(
                f"FlashInfer attention runs on CUDA only, not {self.device}; use attention_backend 'torch'"
            )
        reasons = {p: params_unsupported_reason(p, dtype) for p in self.layer_params}
        supported = [p for p, why in reasons.items() if why is None]
        if not supported:
            raise DriverError(
                f'{next(iter(reasons.values()))}; set attention_backend = "torch" for this model'
            )
        try:
            import flashinfer
        except Exception as e:  # an ImportError, or a broken native extension
            raise DriverError(
                f"FlashInfer failed to import ({e}); install flashinfer-python==0.6.3 apache-tvm-ffi==0.1.15.post2 "
                'einops, or set attention_backend = "torch"'
            ) from None
        # Zero-filled: the decode wrapper requires a zeroed float workspace on first use.
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        # kind -> (decode wrapper, prefill wrapper); sink kinds -> their sink wrapper (causal batches only)
        self._wrappers: dict[AttentionParams, tuple[Any, Any]] = {}
        self._sink_wrappers: dict[AttentionParams, Any] = {}
        for p in [p for p in supported if p.has_sinks]:
            try:
                self._sink_wrappers[p] = flashinfer.BatchAttentionWithAttentionSinkWrapper(
                    self._workspace,
                    KV_LAYOUT,
                    backend=FA_BACKEND,
                    q_data_type=dtype,
                    kv_data_type=self.kv_dtype,
                    head_dim_qk=p.head_dim,
                    head_dim_vo=p.head_dim,
                    window_left=p.window_left,
                )
            except Exception as e:  # its FA2 variant is JIT-built: a host without nvcc cannot
                log.warning(
                    "FlashInfer attention-sink wrapper unavailable (%s); those layers run on torch", e
                )
        for p in [p for p in supported if not p.has_sinks]:
            tc = decode_uses_tensor_cores(p.num_qo_heads, p.num_kv_heads)
            self._wrappers[p] = (
                flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    self._workspace, KV_LAYOUT, use_tensor_cores=tc, backend=FA_BACKEND
                ),
                flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                    self._workspace, KV_LAYOUT, backend=FA_BACKEND
                ),
            )
        self.decode_tensor_cores = decode_uses_tensor_cores(num_qo_heads, num_kv_heads)
        # Kinds FlashInfer lacks a feature for run on the torch backend, per layer (see the module docstring).
        self._fallback: AttentionBackend | None = None
        if len(self._wrappers) < len(reasons):  # unsupported kinds, or sink kinds (masked batches)
            from pie.attention.torch_backend import TorchBackend

            self._fallback = TorchBackend(
                num_qo_heads,
                num_kv_heads,
                head_dim,
                page_size,
                dtype,
                self.device,
                sm_scale,
                layer_params,
                self.kv_dtype,
                kv_scales,
            )
        self._active: dict[AttentionParams, Any] = {}  # kind -> the wrapper planned for the current batch
        self._planned = False  # _active may be empty after a plan (sink kinds of a masked batch: fallback)
        self._graph_workspace: torch.Tensor | None = None  # graph wrappers' own, when they need more

    @property
    def has_fallback(self) -> bool:
        return self._fallback is not None

    def graph_decode(self, batch_size: int, max_pages: int, workspace_bytes: int) -> FlashInferDecodeGraph:
        """A graph-mode decode wrapper set (one per kind) for exactly `batch_size` requests and at most
        `max_pages` pages.

        workspace_bytes: the float workspace the largest graph of this backend needs (graph_workspace_bytes);
        pass the same value on every call. Up to WORKSPACE_BYTES the eager wrappers' workspace is shared (one
        stream runs one batch at a time); beyond it all graph wrappers share one larger zeroed buffer.
        """
        workspace = self._workspace
        if workspace_bytes > workspace.numel():
            if self._graph_workspace is None or self._graph_workspace.numel() < workspace_bytes:
                self._graph_workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
            workspace = self._graph_workspace
        return FlashInferDecodeGraph(self, batch_size, max_pages, workspace)

    def plan(self, meta: AttentionMetadata) -> None:
        """One plan per attention kind present in the model (its decode or prefill wrapper)."""
        if meta.page_size != self.page_size:
            raise ValueError(f"metadata page_size {meta.page_size} != backend page_size {self.page_size}")
        self._active, self._planned = {}, True
        for p, (decode, prefill) in self._wrappers.items():
            if meta.is_decode:
                args, kwargs = decode_plan_args(self, meta, p)
                decode.plan(*args, **kwargs)
                self._active[p] = decode
            else:
                args, kwargs = prefill_plan_args(self, meta, p)
                prefill.plan(*args, **kwargs)
                self._active[p] = prefill
        if meta.mask is None:  # the sink wrapper has no custom mask: masked batches take the fallback
            for p, sink in self._sink_wrappers.items():
                args, kwargs = prefill_plan_args(self, meta, p)
                sink.plan(*args, **kwargs)
                self._active[p] = sink
        if self._fallback is not None:
            self._fallback.plan(meta)

    def run(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        layer_idx: int,
        params: AttentionParams | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; kv_cache: [num_pages, 2, page_size, Hkv, D] in self.dtype -> [T, Hq, D] in q's dtype."""
        if not self._planned:
            raise RuntimeError("FlashInferBackend.run called before plan")
        p = params or self.default_params
        wrapper = self._active.get(p)
        if wrapper is None:
            if self._fallback is None:
                raise ValueError(f"layer {layer_idx}: attention params {p} were not given at construction")
            return self._fallback.run(q, kv_cache, layer_idx, p, sinks)
        # The kernels were planned for self.dtype; .contiguous() is a no-op for the model's fresh q.
        out_dtype, q = q.dtype, q.to(self.dtype).contiguous()
        scales = self.kv_scale(layer_idx)  # FP8 pages: k_scale folds into sm_scale, v_scale scales the output
        if p.has_sinks:
            if sinks is None:
                raise ValueError(f"layer {layer_idx} has attention sinks but run() got no sink tensor")
            # the variant's extra arguments: sink logits [Hq] fp32, then its softmax scale
            k_scale, v_scale = scales or (1.0, 1.0)
            out = wrapper.run(q, kv_cache, sinks.float(), float(p.sm_scale) * k_scale)
            return (out * v_scale if v_scale != 1.0 else out).to(out_dtype)
        return wrapper.run(q, kv_cache, **_scale_kwargs(scales)).to(out_dtype)


# ---- CUDA-graph decode --------------------------------------------------------------------------------


def graph_decode_wrapper_kwargs(
    workspace: torch.Tensor,
    tensor_cores: bool,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    last_page_len: torch.Tensor,
) -> dict[str, Any]:
    """Keyword arguments of BatchDecodeWithPagedKVCacheWrapper(...) (0.6.3) in CUDA-graph mode."""
    return dict(
        float_workspace_buffer=workspace,
        kv_layout=KV_LAYOUT,
        use_cuda_graph=True,
        use_tensor_cores=tensor_cores,
        paged_kv_indptr_buffer=indptr,  # [B+1] int32, device
        paged_kv_indices_buffer=indices,  # [max_pages] int32, device
        paged_kv_last_page_len_buffer=last_page_len,  # [B] int32, device
        backend=FA_BACKEND,
    )


def fa2_cta_tile_q(packed_qo_len: int, head_dim: int, sm80_or_newer: bool) -> int:
    """FlashInfer 0.6.3's FA2DetermineCtaTileQ (include/flashinfer/utils.cuh)."""
    if packed_qo_len > 64 and head_dim < 256:
        return 128
    if not sm80_or_newer:
        return 64
    return 64 if packed_qo_len > 16 else 16


def graph_workspace_bytes(
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    batch_size: int,
    tensor_cores: bool,
    num_sms: int,
    sm80_or_newer: bool = True,
) -> int:
    """Float workspace a graph-mode decode wrapper for `batch_size` requests needs (split-kv partial results).

    Graph mode always plans split-kv with a padded grid that depends only on the batch size
    (include/flashinfer/attention/scheduler.cuh, 0.6.3), so this is fixed per bucket:
      * tensor cores (PrefillPlan): padded = max(2 * SMs / Hkv, ceil(B * group / cta_tile_q) + B - 1);
        tmp_v [Hq, padded, cta_tile_q, D] and tmp_s [Hq, padded, cta_tile_q], fp32
      * CUDA cores (DecodePlan): split only while B * Hkv < max grid; padded = max grid / Hkv, bounded
        here by 32 resident blocks per SM (the hardware limit); tmp_v [Hq, padded, D], tmp_s [Hq, padded]
    Plus 1 MiB for alignment. For Llama-3.1-8B at B = 512 this is ~170 MB, beyond the 128 MiB default.
    """
    if tensor_cores:
        group = num_qo_heads // num_kv_heads
        cta = fa2_cta_tile_q(group, head_dim, sm80_or_newer)
        padded = max(2 * num_sms // num_kv_heads, -(-batch_size * group // cta) + batch_size - 1)
        rows = padded * cta
    else:
        rows = 32 * num_sms // num_kv_heads
    return num_qo_heads * rows * (head_dim + 1) * 4 + (1 << 20)


class FlashInferDecodeGraph(AttentionBackend):
    """Decode attention for exactly `batch_size` requests in FlashInfer's CUDA-graph mode, one wrapper per
    attention kind of the parent backend.

    The wrappers read indptr [B+1], indices [max_pages] and last_page_len [B] from fixed device buffers
    (kv_indptr, kv_indices, kv_last_page_len, shared by all kinds: each kind's plan writes the same values)
    that plan() refills, so kernels captured from run() stay valid across plans. In graph mode 0.6.3's launch
    parameters (plan_info: split-kv, padded grid, workspace offsets) depend only on the batch size, never on
    KV lengths, so one capture serves every later plan. plan() must run outside the graph, before each
    replay. Same kernels as the eager decode wrappers: FA2, tensor cores from GQA group 4.
    """

    name = "flashinfer-decode-graph"

    def __init__(
        self, parent: FlashInferBackend, batch_size: int, max_pages: int, workspace: torch.Tensor
    ) -> None:
        super().__init__(
            parent.num_qo_heads,
            parent.num_kv_heads,
            parent.head_dim,
            parent.page_size,
            parent.dtype,
            parent.device,
            parent.sm_scale,
            list(parent._wrappers),
            parent.kv_dtype,
            parent.kv_scales,
        )
        import flashinfer

        dev = parent.device
        self.batch_size = batch_size
        self.kv_indptr = torch.zeros(batch_size + 1, dtype=torch.int32, device=dev)
        self.kv_indices = torch.zeros(max_pages, dtype=torch.int32, device=dev)
        self.kv_last_page_len = torch.ones(batch_size, dtype=torch.int32, device=dev)
        self._wrappers: dict[AttentionParams, Any] = {}
        for p in self.layer_params:
            tc = decode_uses_tensor_cores(p.num_qo_heads, p.num_kv_heads)
            kwargs = graph_decode_wrapper_kwargs(
                workspace, tc, self.kv_indptr, self.kv_indices, self.kv_last_page_len
            )
            self._wrappers[p] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(**kwargs)

    def plan(self, meta: AttentionMetadata) -> None:
        """meta: a decode batch of exactly batch_size requests; its kv_page_indices may be any device
        tensor (plan copies it into kv_indices), indptr / last_page_len are read from its host copies."""
        if meta.num_requests != self.batch_size or not meta.is_decode:
            raise ValueError(
                f"graph decode wrapper for {self.batch_size} requests got {meta.num_requests} "
                f"({'decode' if meta.is_decode else 'not a decode batch'})"
            )
        if meta.kv_page_indices.numel() > self.kv_indices.numel():
            raise ValueError(
                f"{meta.kv_page_indices.numel()} KV pages exceed this graph's {self.kv_indices.numel()}"
            )
        for p, wrapper in self._wrappers.items():
            args, kwargs = decode_plan_args(self, meta, p)
            wrapper.plan(*args, **kwargs)

    def run(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        layer_idx: int,
        params: AttentionParams | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [B, Hq, D]; kv_cache: [num_pages, 2, page_size, Hkv, D] -> [B, Hq, D] in q's dtype."""
        wrapper = self._wrappers[params or self.default_params]
        out = wrapper.run(q.to(self.dtype).contiguous(), kv_cache, **_scale_kwargs(self.kv_scale(layer_idx)))
        return out.to(q.dtype)
