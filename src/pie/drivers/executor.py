"""ModelExecutor: the one copy of "run a ForwardBatch through the model" that every driver shares.

Build: config.json -> ModelConfig -> model class (registry) built on the meta device, materialized on
the target device, then filled from safetensors (or randomly, for benchmarks); KV pages planned
(kv_plan) and allocated per layer group of equal KV shape, [L_g, num_pages, 2, page_size, Hkv, D] each,
exposed as one per-layer view list `kv_caches`; attention backend by name, told every layer's params.

Execute: validate -> AttentionMetadata -> backend.plan -> model.forward over all T tokens ->
logits of the O output rows (fp32) -> sampling -> one host copy at the end. With spec.cuda_graphs on CUDA
(FlashInfer attention), pure decode batches replay a captured graph instead of the eager forward
(pie.drivers.cuda_graphs); the KV cache then has one scratch page beyond the num_pages it reports.

Tensor parallelism (spec.tensor_parallel_size > 1): this executor is one rank's, built inside the group
pie.drivers.tp set up (pie.distributed): the model holds its shard, the KV cache its KV heads, the page
count is the smallest any rank can afford (every rank names the same pages); only rank 0 samples, and it
broadcasts the sampled tokens so the next batch's prev_token_rows feed the same ids on every rank.

Page ops: `page_ops(PageOps)` copies, swaps (host pool of spec.swap_slots pages), reads and writes whole KV
pages through pie.drivers.page_mover, on the same stream as forward passes.

Hybrid models (recurrent layers: Qwen 3.5's Gated DeltaNet) also own a recurrent-state pool
(pie.drivers.state_pool) of spec.state_slots slots; batches name each request's slot (state_slots), the
layers update them in place, and PageOps copy, read and write whole slots. CUDA graphs are off for them
(their decode graphs gather and scatter the state slots too; padding rows use a scratch slot).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from pie.attention import create_backend
from pie.attention.base import AttentionMetadata
from pie.distributed import all_gather_object, broadcast_, prepare_fast_all_reduce, tp_rank, tp_size
from pie.drivers.kv_fingerprint import kv_fingerprint, weights_identity
from pie.drivers.kv_plan import free_memory_bytes, kv_layer_groups, page_bytes, plan_num_pages
from pie.drivers.page_mover import PageMover
from pie.drivers.protocol import (
    PROTOCOL_VERSION,
    BatchError,
    Capabilities,
    ForwardBatch,
    ForwardResult,
    PageOps,
    PageOpsResult,
)
from pie.drivers.quantization import kv_cache_torch_dtype, kv_scales, weight_format
from pie.drivers.sampling import SamplingParams, sample
from pie.drivers.spec import ExecutorSpec
from pie.drivers.state_pool import DEFAULT_SLOTS, StatePool
from pie.errors import DriverError
from pie.layers.attention import ForwardContext, attention_params
from pie.layers.gated_deltanet import RecurrentBatch
from pie.layers.norm import RMSNorm
from pie.layers.quant import FORMATS as QUANT_FORMATS
from pie.layers.quant import (
    QuantLinear,
    finalize_quantized_,
    init_random_quantized_,
    quantize_model_,
    quantized_bytes,
)
from pie.models.config import read_model_config
from pie.models.registry import get_model_class
from pie.models.weights import load_weights

log = logging.getLogger(__name__)

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def resolve_dtypes(activation_dtype: str, weight_dtype: str) -> tuple[torch.dtype, torch.dtype]:
    """(activation, weight) torch dtypes; weight "auto" means the activation dtype. A quantized weight_dtype
    (int8, int4, float8: pie.layers.quant) gives the activation dtype too: the dtype of the parameters it
    leaves in full precision (norms, embeddings, LM head) and of the quantized layers' outputs."""
    if activation_dtype not in _DTYPES:
        raise DriverError(f"activation_dtype {activation_dtype!r} is not one of bfloat16, float16, float32")
    act = _DTYPES[activation_dtype]
    if weight_dtype == "auto" or weight_dtype in QUANT_FORMATS:
        return act, act
    if weight_dtype not in _DTYPES:
        raise DriverError(
            f"weight_dtype {weight_dtype!r} is not one of auto, bfloat16, float16, float32, int8, int4, float8"
        )
    if _DTYPES[weight_dtype] != act:
        raise DriverError(
            f"weight_dtype {weight_dtype} differs from activation_dtype {activation_dtype}; mixed precision is "
            "not implemented yet: use weight_dtype 'auto'"
        )
    return act, act


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DriverError(f"invalid device {name!r}; use 'cpu' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DriverError(f"device {name!r} requested but CUDA is not available to this torch build")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DriverError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise DriverError(f"device type {device.type!r} is not supported; use 'cpu' or 'cuda:N'")
    return device


def init_random_(model: torch.nn.Module, seed: int) -> None:
    """Benchmark weights: normal(0, 0.02) matrices, zero biases, unit norm scales; seeded, on-device."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    norms = {id(m.weight): m.init_value for m in model.modules() if isinstance(m, RMSNorm)}
    quantized = {id(p) for m in model.modules() if isinstance(m, QuantLinear) for p in m.parameters()}
    for name, p in model.named_parameters():
        if id(p) in quantized:
            continue  # filled below, quantized from the same distribution
        if id(p) in norms:
            p.data.fill_(norms[id(p)])
        elif name.endswith(".bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, 0.02, generator=gen)
    init_random_quantized_(model, gen)


class ModelExecutor:
    """Owns the model, its KV cache and the attention backend of one driver. Not thread-safe: one
    `execute` at a time (drivers serialize forward passes)."""

    def __init__(self, spec: ExecutorSpec, progress: bool = False) -> None:
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.dtype, self.weight_dtype = resolve_dtypes(spec.activation_dtype, spec.weight_dtype)
        if spec.page_size < 1:
            raise DriverError(f"page_size must be >= 1, got {spec.page_size}")
        self.model_config = cfg = read_model_config(spec.model_path)
        model_cls = get_model_class(cfg.model_type)
        self.tp, self.tp_rank = tp_size(), tp_rank()
        if self.tp != spec.tensor_parallel_size:
            raise DriverError(
                f"tensor_parallel_size {spec.tensor_parallel_size} but this process is in a group of {self.tp}; "
                "build tensor-parallel executors through pie.drivers.tp.build_executor"
            )
        problem = tensor_parallel_problem(cfg, model_cls, self.tp)
        if problem is not None:
            raise DriverError(problem)

        free_before = free_memory_bytes(self.device)
        # Meta-device construction allocates nothing; to_empty then materializes each parameter once,
        # directly on the target device in the target dtype (an 8B model never touches host memory).
        with torch.device("meta"):
            model = model_cls(cfg)
        model = model.to(dtype=self.weight_dtype)
        # quantized projections are swapped in before materializing: their full-precision weights never exist
        self.weight_format = weight_format(spec.weight_dtype, spec.model_path, self.device, self.dtype)
        if self.weight_format is not None:
            try:  # at tensor_parallel_size > 1 each rank quantizes its own shard of every projection
                quantize_model_(model, self.weight_format)
            except ValueError as e:
                raise DriverError(str(e)) from None
        model = model.to_empty(device=self.device)
        if spec.random_weights:
            init_random_(model, spec.seed)
        else:
            load_weights(model, spec.model_path, progress=progress)
        self.weight_kernels = finalize_quantized_(model)  # {kernel: layers}; empty unless quantized
        if self.weight_kernels:
            log.info("%s weights: %s", self.weight_format, self.weight_kernels)
        self.model = model.eval().requires_grad_(False)
        if self.tp > 1:  # one-shot all-reduces for decode-sized sums (CUDA; every rank, in step)
            prepare_fast_all_reduce(self.dtype)
        self.weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + quantized_bytes(
            model
        )
        # allocated before the KV plan reads free memory, so the pages are planned around it
        self.state_pool: StatePool | None = None
        graphs = spec.cuda_graphs and self.device.type == "cuda"
        if cfg.recurrent_layers:
            slots = spec.state_slots or min(spec.max_batch_size, DEFAULT_SLOTS)
            self.state_pool = StatePool(cfg, slots, self.dtype, self.device, scratch=1 if graphs else 0)
        free_after = free_memory_bytes(self.device)

        self.kv_dtype = kv_cache_torch_dtype(spec.kv_cache_dtype, self.dtype)
        pbytes = page_bytes(cfg, spec.page_size, self.kv_dtype, self.tp)
        act_bytes = torch.empty((), dtype=self.dtype).element_size()
        planned: int | str
        try:
            # the state pool is memory the pages cannot have, like the weights (policies that plan from the
            # free memory before loading subtract it; those that measure after loading already see it gone)
            resident = self.weights_bytes + (0 if self.state_pool is None else self.state_pool.nbytes)
            planned = plan_num_pages(
                spec,
                pbytes,
                resident,
                free_before,
                free_after,
                model_config=cfg,
                act_bytes=act_bytes,
            )
        except DriverError as e:
            planned = str(e)
        # every rank names the same pages: the smallest count any rank can hold (a rank's error is everyone's)
        plans = all_gather_object(planned)
        errors = [f"rank {r}: {p}" if self.tp > 1 else p for r, p in enumerate(plans) if isinstance(p, str)]
        if errors:
            raise DriverError("; ".join(errors))
        self.num_pages = min(plans)
        # CUDA graphs pad decode batches with rows that write to a scratch page no batch can name: the page
        # after the num_pages reported in Capabilities (check_batch rejects it).
        scratch_pages = 1 if graphs else 0
        pages = self.num_pages + scratch_pages
        # One allocation per layer group of equal KV shape; kv_caches[l] is layer l's view into its group.
        self.kv_cache_groups: list[torch.Tensor] = []
        self.kv_caches: list[torch.Tensor] = [None] * cfg.num_layers  # type: ignore[list-item]
        try:
            for (kv_heads, head_dim), layer_ids in kv_layer_groups(cfg, self.tp):
                shape = (len(layer_ids), pages, 2, spec.page_size, kv_heads, head_dim)
                group = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
                self.kv_cache_groups.append(group)
                for layer, view in zip(layer_ids, group.unbind(0), strict=True):
                    self.kv_caches[layer] = view  # [num_pages, 2, ps, Hkv_l, D_l]
            # shared-KV layers (Gemma 4) alias their source layer's cache: they read it and write nothing
            for layer, spec_l in enumerate(cfg.layers):
                if spec_l.kv_source is not None:
                    self.kv_caches[layer] = self.kv_caches[spec_l.kv_source]
        except torch.OutOfMemoryError:
            raise DriverError(
                f"out of memory allocating {self.num_pages} KV pages ({self.num_pages * pbytes / 2**30:.2f} GiB); "
                "lower gpu_mem_utilization or max_num_kv_pages"
            ) from None
        # page moves and the fingerprint see each cache once (an aliased shared-KV layer adds no bytes)
        owned = [kv for kv, layer in zip(self.kv_caches, cfg.layers, strict=True) if layer.owns_kv]
        self.page_mover = PageMover(owned, spec.swap_slots, self.device)
        weights = f"random:{spec.seed}" if spec.random_weights else weights_identity(spec.model_path)
        self.kv_fingerprint = kv_fingerprint(cfg, weights, spec.page_size, owned)
        self.layer_params = [attention_params(layer, self.tp) for layer in cfg.layers]
        first = self.layer_params[0]
        self.backend = create_backend(
            spec.attention_backend,
            num_qo_heads=first.num_qo_heads,
            num_kv_heads=first.num_kv_heads,
            head_dim=first.head_dim,
            page_size=spec.page_size,
            dtype=self.dtype,
            device=self.device,
            sm_scale=first.sm_scale,
            layer_params=self.layer_params,
            kv_dtype=self.kv_dtype,
            kv_scales=kv_scales(cfg.num_layers) if self.kv_dtype != self.dtype else None,
        )
        self._prev_tokens: torch.Tensor | None = None  # sampled tokens of the last batch, on the device
        self._sampling_key: bytes | None = None  # the sampler fields of the last pass, and their tensors
        self._sampling: SamplingParams | None = None
        # recorded after an eager pass's attention plan: its host staging may be reused once it has run
        self._planned: torch.cuda.Event | None = None
        self.graphs = None  # DecodeGraphRunner when CUDA graphs are on
        if scratch_pages:
            from pie.drivers.cuda_graphs import flashinfer_graph_runner

            self.graphs = flashinfer_graph_runner(self)  # None (logged) unless the backend is FlashInfer
        kv_bytes = sum(g.numel() * g.element_size() for g in self.kv_cache_groups)
        # every rank's share, for pie doctor / pie bench (rank, device, weight bytes, KV bytes)
        self.tp_layout = [
            {"rank": r, "device": d, "weights_bytes": w, "kv_cache_bytes": k}
            for r, (d, w, k) in enumerate(all_gather_object((str(self.device), self.weights_bytes, kv_bytes)))
        ]
        log.info(
            "executor ready: %s on %s, %d KV pages of %d, backend %s",
            cfg.model_type,
            self.device,
            self.num_pages,
            spec.page_size,
            self.backend.name,
        )

    @property
    def kv_cache(self) -> torch.Tensor:
        """The whole cache [L, pages, 2, ps, Hkv, D] when every layer has one KV shape (one group)."""
        if len(self.kv_cache_groups) != 1:
            raise AttributeError("layers differ in KV shape; use kv_caches (per layer) or kv_cache_groups")
        return self.kv_cache_groups[0]

    @property
    def capabilities(self) -> Capabilities:
        cfg, spec = self.model_config, self.spec
        return Capabilities(
            protocol_version=PROTOCOL_VERSION,
            architecture=cfg.model_type,
            num_pages=self.num_pages,
            page_size=spec.page_size,
            vocab_size=cfg.vocab_size,
            max_batch_tokens=spec.max_batch_tokens,
            max_batch_size=spec.max_batch_size,
            max_dist_size=spec.max_dist_size,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            num_layers=cfg.num_layers,
            num_swap_slots=self.page_mover.num_swap_slots,
            page_nbytes=self.page_mover.page_nbytes,
            kv_fingerprint=self.kv_fingerprint,
            num_state_slots=0 if self.state_pool is None else self.state_pool.num_slots,
            state_nbytes=0 if self.state_pool is None else self.state_pool.slot_nbytes,
            extra={
                "attention_backend": self.backend.name,
                "max_position_embeddings": cfg.max_position_embeddings,
                # every layer slides: KV outside the largest window is never read again (runtime frees it)
                "kv_window": (
                    max(layer.sliding_window for layer in cfg.layers)
                    if all(layer.sliding_window for layer in cfg.layers)
                    else None
                ),
                "eos_token_ids": list(cfg.eos_token_ids),
                "weights_bytes": self.weights_bytes,
                "weight_format": self.weight_format,  # None, or a pie.layers.quant format
                "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch."),
                "kv_cache_bytes": sum(g.numel() * g.element_size() for g in self.kv_cache_groups),
                "cuda_graphs": self.graphs is not None,
                "tensor_parallel_size": self.tp,
                "tp_layout": self.tp_layout,
            },
        )

    def check_batch(self, batch: ForwardBatch) -> None:
        """The protocol checks plus this executor's limits; BatchError says what was wrong."""
        spec = self.spec
        batch.validate(spec.page_size, self.num_pages, self.model_config.vocab_size)
        if batch.num_tokens > spec.max_batch_tokens:
            raise BatchError(
                f"batch has {batch.num_tokens} tokens, more than max_batch_tokens {spec.max_batch_tokens}"
            )
        if batch.num_requests > spec.max_batch_size:
            raise BatchError(
                f"batch has {batch.num_requests} requests, more than max_batch_size {spec.max_batch_size}"
            )
        max_pos = self.model_config.max_position_embeddings
        if batch.positions.min() < 0 or batch.positions.max() >= max_pos:
            raise BatchError(f"positions must be in 0..{max_pos - 1} (the model's max_position_embeddings)")
        if batch.num_outputs and batch.dist_k.max() > spec.max_dist_size:
            raise BatchError(f"dist_k exceeds max_dist_size {spec.max_dist_size}")
        if self.state_pool is not None:
            self._check_recurrent(batch)
        if batch.mask is not None:
            # every mask row must allow at least one slot (an empty softmax is NaN)
            kv_lens = batch.kv_lens(spec.page_size).astype(np.int64)
            qo_lens = batch.qo_lens().astype(np.int64)
            req = np.repeat(np.arange(batch.num_requests), qo_lens)
            row_in_req = np.arange(batch.num_tokens) - batch.qo_indptr[req]
            starts = batch.mask_indptr[:-1][req] + row_in_req * kv_lens[req]
            empty = ~np.logical_or.reduceat(batch.mask, starts)
            if empty.any():
                raise BatchError(f"mask row of token {int(np.flatnonzero(empty)[0])} attends to no KV slot")

    def _check_recurrent(self, batch: ForwardBatch) -> None:
        """What a hybrid model's recurrent layers need of a batch (see protocol's module docstring)."""
        arch = self.model_config.model_type
        if batch.state_slots is None:
            raise BatchError(f"{arch} has recurrent layers: the batch must name each request's state_slots")
        n = self.state_pool.num_slots  # type: ignore[union-attr]
        if batch.state_slots.min() < 0 or batch.state_slots.max() >= n:
            raise BatchError(f"state_slots out of range 0..{n - 1}")
        if len(np.unique(batch.state_slots)) != batch.num_requests:
            raise BatchError("two requests of one batch name the same state slot")
        if batch.mask is not None:
            raise BatchError(
                f"{arch} has recurrent (Gated DeltaNet) layers, which see every earlier token in order: custom "
                "attention masks cannot be honoured; use causal attention"
            )
        steps = np.diff(batch.positions)
        steps[batch.qo_indptr[1:-1] - 1] = 1  # a step between two requests is no step
        if batch.num_tokens > 1 and np.any(steps != 1):
            raise BatchError(
                f"{arch} has recurrent layers: a request's positions must be consecutive (each token one "
                "position after the previous)"
            )

    def execute(self, batch: ForwardBatch) -> ForwardResult:
        """One forward pass, waited for (see launch)."""
        return self.launch(batch)()

    def launch(self, batch: ForwardBatch, *, checked: bool = False) -> Callable[[], ForwardResult]:
        """Queue one forward pass on the device; returns a function that waits for it and gives the host
        (numpy) results of the batch's output rows. The device->host copies are asynchronous (pinned), so
        a driver can launch the next batch before waiting for this one.

        Batches the CUDA-graph runner accepts (pure decode, small enough) replay a graph; all others, and
        every batch once graphs are off, run the eager forward. Sampling and the result are the same.
        `checked`: check_batch already passed (tensor-parallel ranks: rank 0 checks before broadcasting)."""
        if not checked:
            self.check_batch(batch)
        prev, self._prev_tokens = self._prev_tokens, None  # a failed batch leaves no tokens to feed
        feed = None
        if batch.prev_token_rows is not None:
            feed = self._feeder(batch.prev_token_rows, prev)
        with torch.inference_mode():
            logits = None
            if self.graphs is not None and self.graphs.accepts(batch):
                logits = self.graphs.run(batch, feed)  # [O, V] fp32; None when its capture failed (now eager)
            if logits is None:
                logits = self._forward_eager(batch, feed)
            if batch.num_outputs == 0:
                self._prev_tokens = torch.zeros(0, dtype=torch.int64, device=self.device)
                return _Pending(None, {"tokens": (torch.zeros(0, dtype=torch.int64), np.int64)}, self.spec)
            if self.tp_rank > 0:  # rank 0 samples; the others take its tokens for the next batch's feed
                self._prev_tokens = broadcast_(
                    torch.empty(batch.num_outputs, dtype=torch.int64, device=self.device)
                )
                return _Pending(None, {"tokens": (torch.zeros(0, dtype=torch.int64), np.int64)}, self.spec)
            return self._sample(batch, logits)

    def _feeder(self, rows: np.ndarray, prev: torch.Tensor | None):
        """In-place fill of input ids [T] (device) from the previous batch's sampled tokens [O_prev]
        (ForwardBatch.prev_token_rows); rows past them (or after a failed batch) get token 0."""
        at = np.flatnonzero(rows >= 0)
        if at.size == 0:
            return None
        src = rows[at].astype(np.int64)
        n = 0 if prev is None else int(prev.shape[0])
        dev = self.device
        k = int(at.size)
        if n >= k and at[-1] == k - 1 and np.array_equal(src, at):
            # the steady state: the same generations in the same rows as the previous pass (rows 0..k-1
            # take its rows 0..k-1): a device-to-device copy, no host data to move

            def fill_same(ids: torch.Tensor) -> None:
                ids[:k].copy_(prev[:k])

            return fill_same
        at_t = torch.from_numpy(at).to(dev, non_blocking=True)
        if n == 0:

            def fill(ids: torch.Tensor) -> None:
                ids.index_fill_(0, at_t, 0)

            return fill
        ok = src < n
        src_t = torch.from_numpy(np.where(ok, src, 0)).to(dev, non_blocking=True)
        ok_t = torch.from_numpy(ok).to(dev, non_blocking=True)

        def fill(ids: torch.Tensor) -> None:
            ids.index_copy_(0, at_t, torch.where(ok_t, prev.index_select(0, src_t), 0).to(ids.dtype))

        return fill

    def page_ops(self, ops: PageOps) -> PageOpsResult:
        """Apply KV page movements (order and byte layout: protocol.PageOps); BatchError for bad ops.

        Serialized with `execute` by the caller (one thread), and enqueued on the same stream, so a forward
        pass after it sees the moved pages."""
        mover, pool = self.page_mover, self.state_pool
        n_state, state_nbytes = (0, 0) if pool is None else (pool.num_slots, pool.slot_nbytes)
        ops.validate(self.num_pages, mover.num_swap_slots, mover.page_nbytes, n_state, state_nbytes)
        with torch.inference_mode():
            result = mover.apply(ops)
            if pool is not None and ops.has_state_ops:
                pool.copy(ops.state_copy)
                if len(ops.state_write):
                    pool.write(ops.state_write, ops.state_write_data)
                if len(ops.state_read):
                    result.state_data = pool.read(ops.state_read)
            return result

    def _forward_eager(self, batch: ForwardBatch, feed=None) -> torch.Tensor | None:
        """Model forward over all T tokens; fp32 logits [O, V] of the output rows (None when O == 0)."""
        dev = self.device
        meta = AttentionMetadata.from_batch(batch, self.spec.page_size, dev)
        if self._planned is not None:  # the previous pass's plan copies have left the backend's buffers
            self._planned.synchronize()
        self.backend.plan(meta)
        if dev.type == "cuda":
            self._planned = torch.cuda.Event()
            self._planned.record()
        ctx = ForwardContext(meta=meta, backend=self.backend, kv_caches=self.kv_caches)
        if self.state_pool is not None:
            ctx.recurrent = self._recurrent_batch(batch, meta)
        input_ids = torch.from_numpy(batch.token_ids).to(dev, non_blocking=True)
        if feed is not None:
            feed(input_ids)
        positions = torch.from_numpy(batch.positions).to(dev, non_blocking=True)
        hidden = self.model(input_ids, positions, ctx)  # [T, H]
        if batch.num_outputs == 0:
            return None
        rows = torch.from_numpy(batch.output_indices.astype(np.int64)).to(dev, non_blocking=True)
        return self.model.compute_logits(hidden[rows])  # [O, V] fp32

    def _recurrent_batch(self, batch: ForwardBatch, meta: AttentionMetadata) -> RecurrentBatch:
        pool, dev = self.state_pool, self.device
        assert pool is not None and batch.state_slots is not None
        fresh = (meta.kv_lens_host - batch.qo_lens()) == 0  # the first new token is at KV slot 0
        return RecurrentBatch(
            conv_states=pool.conv,
            delta_states=pool.delta,
            slots=torch.from_numpy(batch.state_slots.astype(np.int64)).to(dev, non_blocking=True),
            fresh=torch.from_numpy(fresh).to(dev, non_blocking=True),
            qo_indptr=batch.qo_indptr.tolist(),
            fresh_host=fresh.tolist(),
            is_decode=batch.num_tokens == batch.num_requests,
        )

    def _sample(self, batch: ForwardBatch, logits: torch.Tensor) -> Callable[[], ForwardResult]:
        """Sample the output rows of logits [O, V] fp32 and copy the results to the host."""
        dev = self.device
        # the same sampler rows as the previous pass (a generation's steps, unseeded): reuse its device
        # tensors instead of copying them again (the sampler only reads them)
        key = b"".join(np.ascontiguousarray(getattr(batch, f)).tobytes() for f in _SAMPLER_FIELDS)
        if key != self._sampling_key:
            self._sampling = SamplingParams.from_batch(batch, dev)
            self._sampling_key = key
        out = sample(logits, self._sampling, batch.return_logprobs)
        self._prev_tokens = broadcast_(
            out.tokens.contiguous()
        )  # [O] device: the next batch's prev_token_rows read these
        # NaN logits (fp16 overflow, corrupt weights) would sample garbage silently. The check rides on
        # the token copy: a row with a NaN gets token -1 in the host copy only, no extra sync.
        host_tokens = out.tokens.masked_fill(logits.isnan().any(dim=-1), -1)  # [O]
        keep_rows = np.flatnonzero(batch.return_logits)
        kept = logits[torch.from_numpy(keep_rows).to(dev)] if keep_rows.size else None
        # the single device -> host transfer point: asynchronous copies into pinned memory, waited for
        # by the returned function (an event, not a device-wide sync)
        fields = {
            "tokens": (host_tokens, np.int64),
            "logprobs": (out.logprobs, np.float32),
            "entropies": (out.entropies, np.float32),
            "logits": (kept, np.float32),
            "dist_ids": (out.dist_ids, np.int64),
            "dist_probs": (out.dist_probs, np.float32),
        }
        host = {
            k: (None if t is None else t.detach().to("cpu", non_blocking=True), dt)
            for k, (t, dt) in fields.items()
        }
        event = None
        if dev.type == "cuda":
            event = torch.cuda.Event()
            event.record()

        return _Pending(event, host, self.spec)


_SAMPLER_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed", "dist_k")


class _Pending:
    """A launched pass: call it to wait for its results (an event, not a device-wide sync)."""

    __slots__ = ("event", "host", "spec")

    def __init__(self, event, host: dict, spec) -> None:
        self.event, self.host, self.spec = event, host, spec

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def __call__(self) -> ForwardResult:
        if self.event is not None:
            self.event.synchronize()
        res = ForwardResult(
            **{k: None if t is None else t.numpy().astype(dt, copy=False) for k, (t, dt) in self.host.items()}
        )
        if (res.tokens < 0).any():
            raise DriverError(nan_message(np.flatnonzero(res.tokens < 0), len(res.tokens), self.spec))
        return res


def tensor_parallel_problem(cfg, model_cls: type, tp: int) -> str | None:
    """Why `cfg` cannot be split over tp ranks (None when it can): heads, KV heads, intermediate sizes
    must divide (KV heads may instead be fewer than tp, dividing it), and the family must be built from
    the tensor-parallel layers."""
    if tp == 1:
        return None
    if not getattr(model_cls, "supports_tensor_parallel", False):
        return f"{cfg.model_type} does not support tensor parallelism yet; set tensor_parallel_size = 1"
    try:
        for layer in cfg.layers:
            attention_params(layer, tp)
    except ValueError as e:
        return f"{cfg.model_type}: {e}"
    sizes = {"intermediate_size": cfg.intermediate_size}
    if cfg.moe is not None:
        sizes["moe_intermediate_size"] = cfg.moe.expert_intermediate_size
    for name, n in sizes.items():
        if n % tp:
            return (
                f"{cfg.model_type}: {name} = {n} is not divisible by tensor_parallel_size {tp}; choose a "
                "tensor_parallel_size that divides it"
            )
    return None


def nan_message(rows: np.ndarray, num_rows: int, spec: ExecutorSpec) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:8]) + (", ..." if len(rows) > 8 else "")
    hint = (
        'float16 activations overflow easily: try activation_dtype = "bfloat16" or "float32"'
        if spec.activation_dtype == "float16"
        else "check the checkpoint's weights (pie model list / pie doctor) and the prompt's positions"
    )
    return (
        f"the model produced NaN logits for {len(rows)} of {num_rows} output rows (rows {shown}); "
        f"the forward pass failed instead of sampling from them; {hint}"
    )
