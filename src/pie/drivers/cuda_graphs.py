"""CUDA-graph capture of decode steps (cuda_native's fast path; on only with ExecutorSpec.cuda_graphs on CUDA
with FlashInfer attention).

Why: an eager decode step launches ~15 kernels per layer from Python and plans FlashInfer each step; at
batch 1 that host work (~30 ms for Qwen3-0.6B) dwarfs the GPU time (~2.4 ms). A graph replays the whole
forward (embedding -> layers -> final norm -> logits) as one launch.

What runs in a graph: pure decode batches (every request has exactly one new token, no custom mask) of R
requests, padded up to the bucket B >= R (decode_buckets). Padding rows write and read only the scratch
page, a KV page the executor allocates beyond the num_pages it reports, so no batch can name it. Everything
else (prefill, mixed, masked, too large) runs eagerly, unchanged.

Per step: pad the batch on the host (vectorized), copy it into static device buffers (two H2D copies from
pinned staging), re-plan the bucket's graph-mode FlashInfer wrapper (outside the graph, as FlashInfer
requires), replay, and hand the output rows of the static logits [B, V] to the executor's sampling, which
stays eager (it branches on host values).

Capture is lazy, the first time a bucket is needed: two warm-up runs on a side stream (Triton compiles,
cuBLAS workspaces, RoPE tables, FlashInfer's cached buffers), then torch.cuda.graph with one memory pool
shared by all buckets (safe: one replay at a time, and each replay's logits are consumed before the next).
Capture inputs are padding rows only, so real KV pages are never touched. Hybrid models (a state pool):
each row's state slot and "fresh" flag are static inputs too; padding rows use the pool's scratch slot. A capture failure turns graphs
off for this executor (logged with the reason); the batch then runs eagerly.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pie.attention.base import AttentionBackend, AttentionMetadata
from pie.drivers.protocol import ForwardBatch
from pie.layers.attention import ForwardContext
from pie.layers.gated_deltanet import RecurrentBatch

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
WARMUP_RUNS = 2
# Most page indices one graph step may carry (16 MiB of int32 per staging buffer); larger batches run eagerly.
MAX_PAGE_INDICES = 1 << 22


# ---- pure host logic (tested on CPU) -----------------------------------------------------------------


def decode_buckets(max_batch_size: int, sizes: tuple[int, ...] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """Batch sizes to capture: `sizes` up to max_batch_size, plus max_batch_size itself when it falls
    strictly between two of them (so every batch the executor accepts, up to max(sizes), has a bucket)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    out = [b for b in sizes if b <= max_batch_size]
    if max_batch_size < sizes[-1] and (not out or out[-1] != max_batch_size):
        out.append(max_batch_size)
    return tuple(out)


def bucket_for(num_requests: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= num_requests (buckets ascending), or None when none is large enough."""
    i = bisect.bisect_left(buckets, num_requests)
    return buckets[i] if i < len(buckets) else None


@dataclass
class PaddedDecode:
    """One decode batch padded to B rows: the R real rows first, then B - R padding rows, each a
    one-token request on the scratch page (slot 0, token 0, position 0). P = real pages + (B - R)."""

    input_ids: np.ndarray  # [B] int64
    positions: np.ndarray  # [B] int64
    append_pages: np.ndarray  # [B] int64, page receiving each row's K/V
    append_offsets: np.ndarray  # [B] int64, slot within that page
    kv_page_indptr: np.ndarray  # [B+1] int32
    kv_page_indices: np.ndarray  # [P] int32
    kv_last_page_len: np.ndarray  # [B] int32
    kv_lens: np.ndarray  # [B] int32, after append


def pad_decode_arrays(
    token_ids: np.ndarray,
    positions: np.ndarray,
    kv_page_indptr: np.ndarray,
    kv_page_indices: np.ndarray,
    kv_last_page_len: np.ndarray,
    bucket: int,
    page_size: int,
    scratch_page: int,
) -> PaddedDecode:
    """Pad R one-token requests (the protocol's arrays; R may be 0) to `bucket` rows."""
    R = int(kv_last_page_len.shape[0])
    if not 0 <= R <= bucket:
        raise ValueError(f"cannot pad {R} requests to a bucket of {bucket}")
    n = bucket - R
    indptr = np.asarray(kv_page_indptr, dtype=np.int64)
    last = np.asarray(kv_last_page_len, dtype=np.int64)
    indices = np.asarray(kv_page_indices, dtype=np.int64)
    zeros, ones = np.zeros(n, np.int64), np.ones(n, np.int64)
    scratch = np.full(n, scratch_page, np.int64)
    # The one new token of request r sits at slot kv_len - 1: in r's last page, at offset last_page_len - 1.
    real_pages = indices[indptr[1:] - 1]
    kv_lens = (np.diff(indptr) - 1) * page_size + last
    return PaddedDecode(
        input_ids=np.concatenate([np.asarray(token_ids, np.int64), zeros]),
        positions=np.concatenate([np.asarray(positions, np.int64), zeros]),
        append_pages=np.concatenate([real_pages, scratch]),
        append_offsets=np.concatenate([last - 1, zeros]),
        kv_page_indptr=np.concatenate([indptr, indptr[-1] + np.arange(1, n + 1)]).astype(np.int32),
        kv_page_indices=np.concatenate([indices, scratch]).astype(np.int32),
        kv_last_page_len=np.concatenate([last, ones]).astype(np.int32),
        kv_lens=np.concatenate([kv_lens, ones]).astype(np.int32),
    )


def pad_decode(batch: ForwardBatch, bucket: int, page_size: int, scratch_page: int) -> PaddedDecode:
    return pad_decode_arrays(
        batch.token_ids,
        batch.positions,
        batch.kv_page_indptr,
        batch.kv_page_indices,
        batch.kv_last_page_len,
        bucket,
        page_size,
        scratch_page,
    )


def ineligible_reason(
    batch: ForwardBatch,
    buckets: tuple[int, ...],
    page_capacity: Callable[[int], int],
    needs_slots: bool = False,
) -> str | None:
    """Why `batch` cannot replay a decode graph (None when it can). page_capacity(B): most KV page
    indices (real + padding) a bucket-B graph holds. Output rows need no check: with T == R every
    valid output row is some request's single token."""
    if batch.mask is not None:
        return "the batch has a custom mask"
    if batch.state_slots is None and needs_slots:
        return "the batch names no state slots"
    R, T = batch.num_requests, batch.num_tokens
    if T != R:
        return "a request has more than one new token"
    B = bucket_for(R, buckets)
    if B is None:
        return f"{R} requests exceed the largest graph batch size {buckets[-1]}"
    pages = int(batch.kv_page_indices.shape[0]) + B - R
    if pages > page_capacity(B):
        return f"{pages} KV page indices exceed the batch-{B} graph's {page_capacity(B)}"
    return None


# ---- the runner ----------------------------------------------------------------------------------------


@dataclass
class _Bucket:
    size: int
    attn: AttentionBackend  # planned per step from `meta`
    meta: AttentionMetadata  # device fields are static buffers; host fields are refreshed per step
    ctx: ForwardContext
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [B, V] fp32, the graph's output (overwritten by every replay)


@dataclass
class GraphStats:
    captured: dict[int, float] = field(default_factory=dict)  # bucket -> capture seconds
    replays: int = 0
    eager_decode: int = 0  # decode-shaped batches (one token per request) that ran eagerly
    last_refusal: str | None = None
    disabled: str | None = None  # why graphs were turned off (a capture failed)

    def summary(self) -> dict:
        return {
            "captured_buckets": sorted(self.captured),
            "capture_s": {str(b): round(s, 3) for b, s in sorted(self.captured.items())},
            "replays": self.replays,
            "eager_decode_batches": self.eager_decode,
            "last_refusal": self.last_refusal,
            "disabled": self.disabled,
        }


class DecodeGraphRunner:
    """Runs pure decode batches through per-bucket CUDA graphs (see the module docstring).

    make_attention(B, max_pages) builds the bucket's decode attention (FlashInferDecodeGraph on CUDA).
    With capture=False nothing is captured and each step re-runs the forward eagerly on the same static
    buffers and padded plan: the CPU tests use this to check everything but the capture itself.

    Invariants: scratch_page indexes a page of every kv_caches[l] that no batch names (it equals the
    executor's num_pages: batches use pages below it); the graphs read inputs only from the static
    buffers, whose addresses never change; one step at a time (the executor's thread), and the logits
    returned by run() are consumed before the next run().
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        make_attention: Callable[[int, int], AttentionBackend],
        *,
        page_size: int,
        scratch_page: int,
        max_batch_size: int,
        max_position: int,
        device: torch.device,
        capture: bool = True,
        state_pool=None,
    ) -> None:
        """state_pool: the executor's StatePool (hybrid models; it must have a scratch slot), else None."""
        self.model, self.kv_caches, self.make_attention = model, kv_caches, make_attention
        self.state_pool = state_pool
        self.page_size, self.scratch_page, self.device = page_size, scratch_page, torch.device(device)
        self.capture = capture
        self.buckets = decode_buckets(max_batch_size)
        # a request of max_position tokens, or naming every page once (scratch_page == the executor's num_pages)
        self.pages_per_request = max(1, min(-(-max_position // page_size), scratch_page))
        self.stats = GraphStats()
        self._graphs: dict[int, _Bucket] = {}
        bmax, cap = self.buckets[-1], self.page_capacity(self.buckets[-1])
        self._bmax = bmax
        cuda = self.device.type == "cuda"
        pin = dict(pin_memory=True) if cuda else {}
        # Static inputs of every graph. Rows of ids_pos: token ids, positions, append pages, append offsets;
        # bucket B reads [:, :B]. i32: kv_lens [bmax] | page indices [cap]. Each is refilled by one H2D copy.
        self._ids_pos = torch.zeros(4, bmax, dtype=torch.int64, device=self.device)
        self._i32 = torch.zeros(bmax + cap, dtype=torch.int32, device=self.device)
        self._ids_pos_host = torch.zeros(4, bmax, dtype=torch.int64, **pin)
        self._i32_host = torch.zeros(bmax + cap, dtype=torch.int32, **pin)
        # Host-only: FlashInfer's plan() reads these on the host and copies them into its own buffers.
        self._indptr_host = torch.zeros(bmax + 1, dtype=torch.int32, **pin)
        self._last_host = torch.ones(bmax, dtype=torch.int32, **pin)
        # hybrid models: rows of state slots and fresh flags (0/1), bucket B reads [:, :B]
        self._rec = torch.zeros(2, bmax, dtype=torch.int64, device=self.device)
        self._rec_host = torch.zeros(2, bmax, dtype=torch.int64, **pin)
        self._staged = torch.cuda.Event() if cuda else None  # recorded after each step's input copies
        self._stream = torch.cuda.Stream(device=self.device) if cuda and capture else None
        self._pool = torch.cuda.graph_pool_handle() if cuda and capture else None

    def page_capacity(self, bucket: int) -> int:
        """Page indices a bucket's graph holds: `bucket` requests of pages_per_request pages each (so
        requests sharing prefix pages fit too), at most MAX_PAGE_INDICES."""
        return min(bucket * self.pages_per_request, MAX_PAGE_INDICES)

    def accepts(self, batch: ForwardBatch) -> bool:
        if self.stats.disabled is not None:
            return False
        reason = ineligible_reason(batch, self.buckets, self.page_capacity, self.state_pool is not None)
        if reason is not None and batch.num_tokens == batch.num_requests:
            self.stats.eager_decode += 1
            self.stats.last_refusal = reason
        return reason is None

    def run(self, batch: ForwardBatch, feed=None) -> torch.Tensor | None:
        """Replay the batch's bucket; fp32 logits [O, V] of its output rows (a view of the graph's static
        output when the rows are 0..R-1), or None when graphs were turned off (run it eagerly then).
        Precondition: accepts(batch)."""
        R = batch.num_requests
        B = bucket_for(R, self.buckets)
        bucket = self._bucket(B)
        if bucket is None:
            return None
        padded = pad_decode(batch, B, self.page_size, self.scratch_page)
        slots = None
        if self.state_pool is not None:
            slots = np.full(B, self.state_pool.scratch_slot, np.int64)
            slots[:R] = batch.state_slots
        # inference mode: the buffers plan() refills were created under it (capture runs under it)
        with torch.inference_mode(), _on_device(self.device):
            self._stage(bucket, padded, slots)
            if feed is not None:  # generation steps whose token is the previous batch's output
                feed(self._ids_pos[0, :R])
            bucket.attn.plan(bucket.meta)
            if self.capture:
                # recorded before the replay: the next step may restage once this step's copies (staging,
                # plan) have run, while this step's graph still runs (the driver launches ahead)
                self._staged.record()
                bucket.graph.replay()
            else:
                bucket.logits = self._forward(bucket)
        self.stats.replays += 1
        rows = batch.output_indices
        if rows.shape[0] == R and np.array_equal(rows, np.arange(R)):
            return bucket.logits[:R]
        idx = torch.from_numpy(rows.astype(np.int64)).to(self.device, non_blocking=True)
        return bucket.logits.index_select(0, idx)

    def prepare(self, batch_size: int) -> bool:
        """Capture the bucket for batch_size requests now (e.g. before timing); False when graphs are off
        or no bucket is large enough."""
        B = bucket_for(batch_size, self.buckets)
        return B is not None and self._bucket(B) is not None

    # ---- internals ----

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        B = bucket.size
        hidden = self.model(self._ids_pos[0, :B], self._ids_pos[1, :B], bucket.ctx)  # [B, H]
        return self.model.compute_logits(hidden)  # [B, V] fp32

    def _bucket(self, B: int) -> _Bucket | None:
        bucket = self._graphs.get(B)
        if bucket is None and self.stats.disabled is None:
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():  # as execute() runs; prepare() may be called outside it
                    bucket = self._capture(B)
            except Exception as e:  # graphs are an optimization: fall back to eager, say why
                self.stats.disabled = f"capture of batch size {B} failed: {type(e).__name__}: {e}"
                log.warning(
                    "CUDA graphs turned off, decode runs eagerly: %s", self.stats.disabled, exc_info=True
                )
                return None
            self._graphs[B] = bucket
            self.stats.captured[B] = time.perf_counter() - t0
            log.info("captured the decode graph for batch size %d in %.2f s", B, self.stats.captured[B])
        return bucket

    def _static_meta(self, B: int, attn: AttentionBackend) -> AttentionMetadata:
        dev = self.device
        # FlashInferDecodeGraph's own indptr / last_page_len buffers, refilled by its plan(); other
        # backends (CPU tests) plan from the host copies and get placeholders
        kv_indptr = getattr(attn, "kv_indptr", None)
        kv_last = getattr(attn, "kv_last_page_len", None)
        if kv_indptr is None or kv_last is None:
            kv_indptr = torch.zeros(B + 1, dtype=torch.int32, device=dev)
            kv_last = torch.ones(B, dtype=torch.int32, device=dev)
        return AttentionMetadata(
            num_tokens=B,
            num_requests=B,
            page_size=self.page_size,
            qo_indptr=torch.arange(B + 1, dtype=torch.int32, device=dev),
            kv_page_indptr=kv_indptr,
            kv_page_indices=self._i32[self._bmax : self._bmax],  # set per step (length varies)
            kv_last_page_len=kv_last,
            kv_lens=self._i32[:B],
            append_pages=self._ids_pos[2, :B],
            append_offsets=self._ids_pos[3, :B],
            mask=None,
            mask_indptr=None,
            qo_indptr_host=np.arange(B + 1, dtype=np.int32),
            kv_page_indptr_host=self._indptr_host.numpy()[: B + 1],
            kv_page_indices_host=np.zeros(0, np.int32),
            kv_last_page_len_host=self._last_host.numpy()[:B],
            kv_lens_host=np.ones(B, np.int32),
            is_decode=True,
        )

    def _stage(self, bucket: _Bucket, p: PaddedDecode, slots: np.ndarray | None = None) -> None:
        """Write the padded batch into the static buffers (two H2D copies; a third for the state slots of
        hybrid models) and the bucket's metadata."""
        B, P, bmax = bucket.size, p.kv_page_indices.shape[0], self._bmax
        if self._staged is not None:
            self._staged.synchronize()  # the previous step's copies have read the pinned staging
        ids_pos, i32 = self._ids_pos_host.numpy(), self._i32_host.numpy()
        ids_pos[0, :B], ids_pos[1, :B] = p.input_ids, p.positions
        ids_pos[2, :B], ids_pos[3, :B] = p.append_pages, p.append_offsets
        i32[:B] = p.kv_lens
        i32[bmax : bmax + P] = p.kv_page_indices
        self._indptr_host.numpy()[: B + 1] = p.kv_page_indptr
        self._last_host.numpy()[:B] = p.kv_last_page_len
        self._ids_pos.copy_(self._ids_pos_host, non_blocking=True)  # all of it: 32 * bmax bytes
        self._i32[: bmax + P].copy_(self._i32_host[: bmax + P], non_blocking=True)
        if slots is not None:
            rec = self._rec_host.numpy()
            rec[0, :B] = slots
            rec[1, :B] = p.kv_lens == 1  # a row's one token at KV slot 0: its state starts from zero
            self._rec.copy_(self._rec_host, non_blocking=True)
        m = bucket.meta
        m.kv_page_indices = self._i32[bmax : bmax + P]
        m.kv_page_indices_host = p.kv_page_indices
        m.kv_lens_host = p.kv_lens

    def _capture(self, B: int) -> _Bucket:
        attn = self.make_attention(B, self.page_capacity(B))
        meta = self._static_meta(B, attn)
        ctx = ForwardContext(meta=meta, backend=attn, kv_caches=self.kv_caches)
        slots = None
        pool = self.state_pool
        if pool is not None:
            ctx.recurrent = RecurrentBatch(
                conv_states=pool.conv,
                delta_states=pool.delta,
                slots=self._rec[0, :B],
                fresh=self._rec[1, :B],
                qo_indptr=list(range(B + 1)),
                fresh_host=[True] * B,  # unused: a decode batch takes the batched path
                is_decode=True,
            )
            slots = np.full(B, pool.scratch_slot, np.int64)
        bucket = _Bucket(B, attn, meta, ctx)
        empty = np.zeros(0, np.int64)
        # Padding rows only: the warm-up runs write K/V to the scratch page (and state to the scratch slot)
        # and nowhere else.
        padded = pad_decode_arrays(
            empty, empty, np.zeros(1, np.int32), empty, empty, B, self.page_size, self.scratch_page
        )
        with _on_device(self.device):
            self._stage(bucket, padded, slots)
            attn.plan(meta)
            if not self.capture:
                return bucket
            current = torch.cuda.current_stream()
            self._stream.wait_stream(current)
            with torch.cuda.stream(self._stream):
                for _ in range(WARMUP_RUNS):
                    self._forward(bucket)
            current.wait_stream(self._stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(
                graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"
            ):
                logits = self._forward(bucket)
            self._staged.record()
        bucket.graph, bucket.logits = graph, logits
        return bucket


def _on_device(device: torch.device):
    """torch.cuda.device(device) on CUDA (graphs capture and replay on the current device); no-op on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def flashinfer_graph_runner(executor) -> DecodeGraphRunner | None:
    """The runner for a ModelExecutor whose KV cache has a scratch page at index executor.num_pages;
    None (logged) when its attention backend is not FlashInfer (graphs need its graph-mode wrappers)."""
    from pie.attention.flashinfer_backend import (
        FlashInferBackend,
        decode_uses_tensor_cores,
        graph_workspace_bytes,
    )

    backend, spec, cfg, dev = executor.backend, executor.spec, executor.model_config, executor.device
    if not isinstance(backend, FlashInferBackend):
        log.info("CUDA graphs off: they need the FlashInfer attention backend, not %r", backend.name)
        return None
    if backend.has_fallback:
        log.info("CUDA graphs off: some layers run on the torch attention fallback (see flashinfer_backend)")
        return None
    buckets = decode_buckets(spec.max_batch_size)
    props = torch.cuda.get_device_properties(dev)
    # sized for the largest bucket and the hungriest attention kind, so every wrapper can share one workspace
    workspace = max(
        graph_workspace_bytes(
            p.num_qo_heads,
            p.num_kv_heads,
            p.head_dim,
            buckets[-1],
            decode_uses_tensor_cores(p.num_qo_heads, p.num_kv_heads),
            props.multi_processor_count,
            sm80_or_newer=props.major >= 8,
        )
        for p in backend.layer_params
    )
    runner = DecodeGraphRunner(
        executor.model,
        executor.kv_caches,
        lambda B, max_pages: backend.graph_decode(B, max_pages, workspace),
        page_size=spec.page_size,
        scratch_page=executor.num_pages,
        max_batch_size=spec.max_batch_size,
        max_position=cfg.max_position_embeddings,
        device=dev,
        state_pool=executor.state_pool,
    )
    log.info("CUDA graphs on for decode batches of up to %d requests (buckets %s)", buckets[-1], buckets)
    return runner
