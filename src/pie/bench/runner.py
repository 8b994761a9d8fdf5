"""Measure a ModelExecutor: decode step time at several batch sizes, prefill throughput, and the device's
copy bandwidth and matmul rate, each figure beside its floor (see floors.py).

The executor is driven directly with real ForwardBatches (no scheduler, no driver thread), so the figures
are the executor's own: model forward, attention plan/run, logits of the output rows, sampling, and the one
device->host copy of the result that ends every step (which also synchronizes, so wall time is exact).

Page layout: sequence r of a run owns pages [r * pages_per_seq, (r + 1) * pages_per_seq); every run
starts again at page 0 and overwrites the previous run's KV.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pie.drivers.protocol import ForwardBatch

Progress = Callable[[str], None]


@dataclass
class BenchOptions:
    context: int = 128  # prompt tokens of every decode sequence
    batch_sizes: tuple[int, ...] = (1, 64, 256)
    prefill_requests: int = 4
    prefill_len: int = 2048
    steps: int = 16  # timed decode steps per repeat
    repeats: int = 3  # figures are the median over repeats
    warmup: int = 3  # untimed decode steps (and prefill passes) before timing
    page_size: int = 32
    device: str = "cuda:0"
    dtype: str = "bfloat16"
    attention_backend: str = "auto"
    chunk_tokens: int = 8192  # most tokens in one context-prefill pass
    profile_path: str | None = None  # torch.profiler table of one decode step at profile_batch
    profile_batch: int = 64
    cuda_graphs: bool = True  # decode through CUDA graphs (CUDA with FlashInfer only; ignored elsewhere)
    e2e_steps: int = 0  # > 0: also generate this many tokens per inferlet through the runtime and SDK
    tensor_parallel_size: int = 1  # > 1: one process per device in `devices` (pie.drivers.tp)
    devices: tuple[str, ...] = ()  # one per rank; () means (device,)
    weight_dtype: str = "auto"  # int8 / int4 / float8: quantized projections (floors stay the bf16 ones)
    kv_cache_dtype: str = "auto"  # fp8_e4m3: FP8 KV pages

    @property
    def decode_steps_total(self) -> int:
        return self.warmup + self.repeats * self.steps + 1  # +1: the profiled step

    def pages_per_seq(self) -> int:
        return -(-(self.context + max(self.decode_steps_total, self.e2e_steps + 1)) // self.page_size)

    def num_pages(self) -> int:
        decode = max(self.batch_sizes) * self.pages_per_seq()
        prefill = self.prefill_requests * -(-self.prefill_len // self.page_size)
        return max(decode, prefill)


@dataclass
class DecodeFigure:
    batch: int
    step_s: float  # median seconds per decode step
    mean_kv_len: float  # mean KV length (after append) over the timed steps
    step_times: list[float] = field(default_factory=list)
    launch_s: float = 0.0  # median host time of launching one step (before waiting on the device)


@dataclass
class PrefillFigure:
    requests: int
    tokens_per_request: int
    pass_s: float  # median seconds per prefill pass
    pass_times: list[float] = field(default_factory=list)


# ---- batches (vectorized host work) -------------------------------------------------------------


def _batch(
    token_ids: np.ndarray,
    positions: np.ndarray,
    qo_lens: np.ndarray,
    kv_lens: np.ndarray,
    pages_per_seq: int,
    page_size: int,
) -> ForwardBatch:
    """Requests r = 0..R-1 with qo_lens[r] new tokens and kv_lens[r] KV slots after the pass, pages laid
    out per the module docstring; one greedy output row at each request's last token."""
    R = len(qo_lens)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    npages = -(-kv_lens // page_size)  # [R] pages in use after the pass
    kv_indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    req = np.repeat(np.arange(R), npages)
    indices = req * pages_per_seq + (np.arange(kv_indptr[-1]) - kv_indptr[req])
    outputs = qo_indptr[1:] - 1
    return ForwardBatch(
        token_ids=token_ids.astype(np.int64),
        positions=positions.astype(np.int64),
        qo_indptr=qo_indptr,
        kv_page_indices=indices.astype(np.int32),
        kv_page_indptr=kv_indptr,
        kv_last_page_len=(kv_lens - (npages - 1) * page_size).astype(np.int32),
        output_indices=outputs.astype(np.int32),
        temperature=np.zeros(R, np.float32),
        top_k=np.zeros(R, np.int32),
        top_p=np.ones(R, np.float32),
        min_p=np.zeros(R, np.float32),
        seed=np.full(R, -1, np.int64),
        dist_k=np.zeros(R, np.int32),
        return_logits=np.zeros(R, bool),
        state_slots=np.arange(R, dtype=np.int32),  # hybrid models: sequence r's recurrent-state slot
    )


def prefill_batch(
    prompt_lens: np.ndarray, pages_per_seq: int, page_size: int, vocab: int, rng
) -> ForwardBatch:
    """Fresh prompts (KV starts empty): positions 0..n-1 of each request."""
    prompt_lens = np.asarray(prompt_lens, dtype=np.int64)
    T = int(prompt_lens.sum())
    starts = np.repeat(np.cumsum(prompt_lens) - prompt_lens, prompt_lens)
    positions = np.arange(T) - starts
    tokens = rng.integers(0, vocab, size=T)
    return _batch(tokens, positions, prompt_lens, prompt_lens, pages_per_seq, page_size)


def decode_batch(
    kv_lens_after: np.ndarray, pages_per_seq: int, page_size: int, vocab: int, rng
) -> ForwardBatch:
    """One new token per sequence, at slot and position kv_len_after - 1."""
    kv = np.asarray(kv_lens_after, dtype=np.int64)
    tokens = rng.integers(0, vocab, size=len(kv))
    return _batch(tokens, kv - 1, np.ones(len(kv), np.int64), kv, pages_per_seq, page_size)


# ---- timing ---------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, n: int) -> float:
    """Seconds per call of fn, averaged over n calls, fenced by device synchronization."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / n


def measure_copy_bandwidth(
    device: torch.device, nbytes: int | None = None, iters: int = 5, repeats: int = 5
) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (best repeat)."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 32 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    best = min(_timed(lambda: dst.copy_(src), device, iters) for _ in range(repeats))
    return 2 * nbytes / best


def measure_matmul_rate(
    device: torch.device, n: int | None = None, iters: int = 10, repeats: int = 3
) -> float:
    """bf16 square matmul rate in flop/s (2 n^3 per product, best repeat)."""
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    out = torch.empty(n, n, dtype=torch.bfloat16, device=device)
    torch.matmul(a, b, out=out)  # library warm-up (cuBLAS handle, heuristics)
    best = min(_timed(lambda: torch.matmul(a, b, out=out), device, iters) for _ in range(repeats))
    return 2.0 * n**3 / best


# ---- runs -----------------------------------------------------------------------------------------


def fill_context(executor, batch: int, opts: BenchOptions, vocab: int, rng) -> None:
    """Prefill `opts.context` prompt tokens for sequences 0..batch-1, in passes of <= chunk_tokens tokens."""
    per_pass = max(1, opts.chunk_tokens // opts.context)
    pps = opts.pages_per_seq()
    for first in range(0, batch, per_pass):
        n = min(per_pass, batch - first)
        b = prefill_batch(np.full(n, opts.context), pps, opts.page_size, vocab, rng)
        b.kv_page_indices = b.kv_page_indices + np.int32(first * pps)  # shift to sequences first..first+n-1
        b.state_slots = b.state_slots + np.int32(first)
        executor.execute(b)


def run_decode(executor, batch: int, opts: BenchOptions, vocab: int, rng, progress: Progress) -> DecodeFigure:
    """Decode `batch` sequences after a context prefill; median seconds per step over opts.repeats."""
    progress(f"decode batch {batch}: prefill {batch} x {opts.context} context tokens")
    fill_context(executor, batch, opts, vocab, rng)
    pps, device = opts.pages_per_seq(), executor.device
    # All step batches are built before timing: host batch building is the scheduler's cost, not ours.
    steps = [
        decode_batch(np.full(batch, opts.context + s + 1), pps, opts.page_size, vocab, rng)
        for s in range(opts.decode_steps_total)
    ]
    graphs = getattr(executor, "graphs", None)
    if graphs is not None and graphs.prepare(batch):  # capture now, so even --warmup 0 times no capture
        progress(f"decode batch {batch}: CUDA graph ready")
    progress(f"decode batch {batch}: {opts.warmup} warm-up + {opts.repeats} x {opts.steps} timed steps")
    for b in steps[: opts.warmup]:
        executor.execute(b)
    times, kv_lens = [], []
    for r in range(opts.repeats):
        chunk = steps[opts.warmup + r * opts.steps : opts.warmup + (r + 1) * opts.steps]
        it = iter(chunk)
        times.append(_timed(lambda it=it: executor.execute(next(it)), device, len(chunk)))
        kv_lens.extend(int(b.kv_lens(opts.page_size)[0]) for b in chunk)
    # host time of launching a step (everything the executor does before waiting on the device), which
    # the runtime's own host work must share a step with
    launch = []
    for b in steps[opts.warmup : opts.warmup + opts.steps]:
        synchronize(device)
        t0 = time.perf_counter()
        wait = executor.launch(b)
        launch.append(time.perf_counter() - t0)
        wait()
    if opts.profile_path and batch == opts.profile_batch:
        try:
            write_profile(executor, steps[-1], opts.profile_path, progress)
        except (RuntimeError, OSError) as e:  # a profiler (CUPTI) or file failure must not cost the figures
            progress(f"profile not written: {type(e).__name__}: {e}")
    return DecodeFigure(
        batch, statistics.median(times), float(np.mean(kv_lens)), times, statistics.median(launch)
    )


def run_prefill(executor, opts: BenchOptions, vocab: int, rng, progress: Progress) -> PrefillFigure:
    R, n = opts.prefill_requests, opts.prefill_len
    pps = -(-n // opts.page_size)
    b = prefill_batch(np.full(R, n), pps, opts.page_size, vocab, rng)
    progress(f"prefill {R} x {n} tokens: {opts.warmup} warm-up + {opts.repeats} timed passes")
    for _ in range(max(1, opts.warmup)):
        executor.execute(b)
    times = [_timed(lambda: executor.execute(b), executor.device, 1) for _ in range(opts.repeats)]
    return PrefillFigure(R, n, statistics.median(times), times)


def write_profile(executor, batch: ForwardBatch, path: str, progress: Progress) -> None:
    """torch.profiler table of one step (top 30 ops by self device time; CPU time on CPU) written to path."""
    from torch.profiler import ProfilerActivity, profile

    device = executor.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    executor.execute(batch)  # untimed: the profiled step repeats this one's slot
    synchronize(device)
    with profile(activities=activities) as prof:
        executor.execute(batch)
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    header = f"# one decode step, batch {batch.num_requests}, sorted by {sort}\n"
    with open(path, "w") as f:
        f.write(header + table + "\n")
    progress(f"profile written to {path}")


# ---- the whole benchmark ------------------------------------------------------------------------


@dataclass
class Measurements:
    copy_bandwidth_bps: float
    matmul_flops_per_s: float
    decode: list[DecodeFigure]
    prefill: PrefillFigure | None
    capabilities: dict  # the executor's Capabilities as a dict (backend, dtype, pages, ...)
    cuda_graphs: dict | None = None  # GraphStats.summary() of the run; None when graphs were off
    e2e: list = field(default_factory=list)  # e2e.E2EFigure per batch size (bench --e2e)
    # tensor parallelism: size, per-rank layout (device, weight and KV bytes), and the seconds the
    # collectives of one step take alone, per decode batch and for the prefill pass; None at size 1
    tensor_parallel: dict | None = None


def executor_spec(model_path: str, opts: BenchOptions, random_weights: bool):
    from pie.drivers.spec import ExecutorSpec

    return ExecutorSpec(
        model_path=str(model_path),
        device=opts.device,
        activation_dtype=opts.dtype,
        weight_dtype=opts.weight_dtype,
        kv_cache_dtype=opts.kv_cache_dtype,
        page_size=opts.page_size,
        kv_policy="cuda_native",
        num_pages=opts.num_pages(),
        max_batch_tokens=max(
            opts.chunk_tokens, opts.prefill_requests * opts.prefill_len, max(opts.batch_sizes)
        ),
        max_batch_size=max(max(opts.batch_sizes), opts.prefill_requests),
        state_slots=max(max(opts.batch_sizes), opts.prefill_requests),  # hybrid models: one per sequence
        attention_backend=opts.attention_backend,
        cuda_graphs=opts.cuda_graphs,
        random_weights=random_weights,
        tensor_parallel_size=opts.tensor_parallel_size,
        devices=list(opts.devices or (opts.device,)),
    )


def run_benchmark(
    model_path: str, opts: BenchOptions, random_weights: bool, progress: Progress
) -> Measurements:
    """Ceilings first (while the device is empty), then one executor for every decode run and the prefill."""
    from pie.drivers.executor import resolve_device
    from pie.drivers.tp import build_executor

    device = resolve_device(opts.device)
    progress(f"measuring copy bandwidth and bf16 matmul rate on {device}")
    bandwidth = measure_copy_bandwidth(device)
    matmul = measure_matmul_rate(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    progress(
        f"building the executor ({'random' if random_weights else 'checkpoint'} weights, {opts.num_pages()} KV pages)"
    )
    spec = executor_spec(model_path, opts, random_weights)
    if device.type == "cuda":  # as cuda_native would: "auto" -> FlashInfer when it supports the model
        from pie.drivers.cuda_native import resolve_attention_backend

        spec = dataclasses.replace(spec, attention_backend=resolve_attention_backend(spec))
    executor = build_executor(spec, progress=True)  # a group of processes at tensor_parallel_size > 1
    try:
        return _measure(executor, opts, bandwidth, matmul, progress)
    finally:
        close = getattr(executor, "close", None)
        if close is not None:
            close()


def _measure(
    executor, opts: BenchOptions, bandwidth: float, matmul: float, progress: Progress
) -> Measurements:
    caps = executor.capabilities
    progress(
        f"executor ready: attention backend {caps.extra.get('attention_backend')}, dtype {caps.dtype}, "
        f"CUDA graphs {'on' if executor.graphs is not None else 'off'}"
    )
    vocab = executor.model_config.vocab_size
    rng = np.random.default_rng(0)
    decode = [run_decode(executor, b, opts, vocab, rng, progress) for b in opts.batch_sizes]
    prefill = run_prefill(executor, opts, vocab, rng, progress) if opts.prefill_requests > 0 else None
    graphs = executor.graphs.stats.summary() if executor.graphs is not None else None
    if graphs is not None:
        progress(
            f"CUDA graphs: buckets {graphs['captured_buckets']} captured, {graphs['replays']} replays, "
            f"{graphs['eager_decode_batches']} decode batches eager, disabled: {graphs['disabled']}"
        )
    e2e = []
    if opts.e2e_steps:
        from pie.bench.e2e import run_e2e
        from pie.drivers.inprocess import InProcessDriver

        driver = InProcessDriver.from_executor(executor)
        before = executor.graphs.stats.summary() if executor.graphs is not None else None
        e2e = run_e2e(driver, opts.batch_sizes, opts.context, opts.e2e_steps, vocab, progress)
        if executor.graphs is not None:
            after = executor.graphs.stats.summary()
            progress(
                f"e2e CUDA graphs: {after['replays'] - before['replays']} replays, "
                f"{after['eager_decode_batches'] - before['eager_decode_batches']} decode batches eager "
                f"(last refusal: {after['last_refusal']})"
            )
    tp = None
    if opts.tensor_parallel_size > 1:
        tp = tensor_parallel_figures(executor, opts, progress)
    return Measurements(bandwidth, matmul, decode, prefill, caps.to_wire(), graphs, e2e, tp)


def tensor_parallel_figures(executor, opts: BenchOptions, progress: Progress) -> dict:
    """The group's layout and, per decode batch and for the prefill pass, the seconds its collectives take
    alone (2 all-reduces per layer, the embedding's, the logits' all-gather; graph-captured on CUDA)."""
    layout = executor.capabilities.extra["tp_layout"]
    for r in layout:
        progress(
            f"rank {r['rank']} on {r['device']}: weights {r['weights_bytes'] / 2**30:.2f} GiB, "
            f"KV cache {r['kv_cache_bytes'] / 2**30:.2f} GiB"
        )
    collectives = {}
    for b in opts.batch_sizes:
        collectives[f"decode_b{b}"] = executor.time_collectives(b, b)
    if opts.prefill_requests:
        tokens = opts.prefill_requests * opts.prefill_len
        collectives["prefill"] = executor.time_collectives(tokens, opts.prefill_requests, iters=5)
    for k, v in collectives.items():
        progress(f"{k}: collectives alone {v * 1e3:.3f} ms per step")
    return {"size": opts.tensor_parallel_size, "layout": layout, "collective_s": collectives}
