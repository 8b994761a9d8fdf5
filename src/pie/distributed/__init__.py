"""Tensor-parallel process group: this process's rank, the group's size, and the collectives layers use.

One process per device; rank 0 is the driver's own process. `init_tp` joins the group (NCCL on CUDA, gloo
on CPU, plus a gloo group for host-side control messages); until then, and at tensor_parallel_size 1, every
collective is a no-op, so layers call them unconditionally. Layers read `tp_rank()` / `tp_size()` when
they are built (each rank builds only its shard).

Collectives are in-place / static-shaped so CUDA graphs can capture them (NCCL all-reduce and
all-gather-into-tensor are capturable).

Small all-reduces on CUDA (decode: [batch, hidden], a few KiB) are latency-bound: NCCL's ~10 us each, two
per layer, would eat much of what splitting the weights saves at batch 1. `prepare_fast_all_reduce` sets up
a symmetric-memory buffer (torch.distributed._symmetric_memory, peer-to-peer over NVLink, no multicast) and
all-reduces of at most FAST_MAX_BYTES then run as one-shot kernels (each rank copies its partial sums in,
reads every peer's and adds them). Larger ones, and every one when the setup fails on any rank or
PIE_TP_ALLREDUCE=nccl, go through NCCL.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class TPState:
    rank: int = 0
    size: int = 1
    device: torch.device | None = None
    group: object | None = None  # ProcessGroup for tensors (NCCL or gloo); None at size 1
    control: object | None = None  # gloo ProcessGroup for pickled host messages (batches)


_STATE = TPState()
# torch 2.13 renamed all_gather_into_tensor (older name deprecated there; older torch has only it)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def tp_rank() -> int:
    return _STATE.rank


def tp_size() -> int:
    return _STATE.size


def tp_state() -> TPState:
    return _STATE


def init_tp(rank: int, size: int, device: torch.device, init_method: str, timeout_s: float = 300.0) -> None:
    """Join the tensor-parallel group of `size` processes (blocking until all have joined, at most
    timeout_s). init_method: a torch.distributed URL ("tcp://127.0.0.1:PORT" or "file:///path")."""
    if _STATE.size > 1:
        raise RuntimeError("this process already belongs to a tensor-parallel group")
    if size == 1:
        _STATE.device = device
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout, **kwargs
    )
    group = dist.group.WORLD
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else group
    _STATE.rank, _STATE.size, _STATE.device, _STATE.group, _STATE.control = rank, size, device, group, control
    # the first collective sets up the communicators: here, not inside a CUDA-graph capture later
    dist.barrier(group=control)
    all_reduce(torch.zeros(1, device=device))
    log.info("tensor-parallel rank %d of %d on %s (%s)", rank, size, device, backend)


def destroy_tp() -> None:
    """Leave the group (idempotent; also after abort_tp); collectives become no-ops again."""
    global _STATE
    _FAST.clear()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # a peer already gone: nothing left to tear down cleanly
            log.debug("destroy_process_group: %s", e)
    _STATE = TPState()


def abort_tp() -> None:
    """Unblock collectives stuck on a dead peer (NCCL: abort the communicators; gloo fails on its own when
    the peer's socket closes). The group stays this process's until destroy_tp: a pass still running must
    not see tensor_parallel_size 1 halfway through."""
    group = _STATE.group
    if group is None:
        return
    for g in {id(group): group, id(_STATE.control): _STATE.control}.values():
        backend = _backend_of(g)
        abort = getattr(backend, "abort", None) if backend is not None else None
        if abort is not None:
            try:
                abort()
            except Exception as e:
                log.debug("process group abort: %s", e)


def _backend_of(group):
    try:
        return group._get_backend(_STATE.device or torch.device("cpu"))
    except Exception:
        return None


FAST_MAX_BYTES = 512 * 1024  # [64, 4096] bf16: decode up to batch 64 of an 8B model
_FAST: dict[torch.dtype, tuple[torch.Tensor, str]] = {}  # dtype -> (symmetric buffer, group name)


def prepare_fast_all_reduce(dtype: torch.dtype) -> bool:
    """Set up the one-shot symmetric-memory all-reduce for `dtype` (CUDA, size > 1; a collective: every rank
    calls it, in the same order). True when small all-reduces of `dtype` will use it."""
    if _STATE.size == 1 or _STATE.device is None or _STATE.device.type != "cuda":
        return False
    if os.environ.get("PIE_TP_ALLREDUCE", "auto") == "nccl":
        return False
    if dtype in _FAST:
        return True
    buf, name, ok = None, _STATE.group.group_name, True
    try:
        import warnings

        import torch.distributed._symmetric_memory as symm_mem

        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)  # needed before torch 2.8, then a no-op
        if enable is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable(name)
        buf = symm_mem.empty(FAST_MAX_BYTES // torch.empty((), dtype=dtype).element_size(), dtype=dtype,
                             device=_STATE.device)  # fmt: skip
        symm_mem.rendezvous(buf, name)
        probe = torch.full((64,), float(_STATE.rank + 1), dtype=dtype, device=_STATE.device)
        buf[:64].copy_(probe)
        torch.ops.symm_mem.one_shot_all_reduce_out(buf[:64], "sum", name, probe)
        want = _STATE.size * (_STATE.size + 1) / 2
        ok = bool((probe.float() == want).all())
        if not ok:
            log.warning("symmetric-memory all-reduce gave a wrong sum; using NCCL")
    except Exception as e:  # no P2P, an old torch, ...: NCCL does every all-reduce
        log.warning("symmetric-memory all-reduce unavailable (%s: %s); using NCCL", type(e).__name__, e)
        ok = False
    if not all(all_gather_object(ok)):  # every rank must take the same path
        return False
    _FAST[dtype] = (buf, name)
    log.info("small %s all-reduces (<= %d KiB) use symmetric memory", dtype, FAST_MAX_BYTES // 1024)
    return True


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place; returns x (no-op at size 1)."""
    if _STATE.size == 1:
        return x
    fast = _FAST.get(x.dtype)
    nbytes = x.numel() * x.element_size()
    if fast is not None and nbytes <= FAST_MAX_BYTES and nbytes % 16 == 0 and x.is_contiguous():
        buf, name = fast
        flat = x.view(-1)
        slot = buf[: flat.numel()]  # offset 0 of the symmetric buffer: aligned
        slot.copy_(flat)
        torch.ops.symm_mem.one_shot_all_reduce_out(slot, "sum", name, flat)
        return x
    dist.all_reduce(x, group=_STATE.group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` (same shape on all) along `dim`, rank order (x at size 1)."""
    if _STATE.size == 1:
        return x
    x = x.contiguous()
    # [tp * x.shape[0], ...]: the flat layout both NCCL and gloo take, viewed as [tp, *x.shape]
    out = torch.empty((_STATE.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_flat(out, x, group=_STATE.group)
    dim = dim % x.dim()
    return torch.cat(out.view(_STATE.size, *x.shape).unbind(0), dim=dim)


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank src's `x` into every rank's `x` (same shape and dtype everywhere), in place."""
    if _STATE.size > 1:
        dist.broadcast(x, src=src, group=_STATE.group)
    return x


def broadcast_object(obj: object = None, src: int = 0) -> object:
    """Rank src's picklable object on every rank, through the gloo control group."""
    if _STATE.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_STATE.control)
    return box[0]


def all_gather_object(obj: object) -> list:
    """Every rank's picklable `obj`, in rank order, through the gloo control group ([obj] at size 1)."""
    if _STATE.size == 1:
        return [obj]
    out: list = [None] * _STATE.size
    dist.all_gather_object(out, obj, group=_STATE.control)
    return out


def time_step_collectives(
    tokens: int,
    outputs: int,
    hidden: int,
    vocab_per_rank: int,
    num_layers: int,
    dtype: torch.dtype,
    iters: int = 20,
) -> float:
    """Seconds the collectives of one forward pass take alone, measured on this rank (every rank must call
    it with the same arguments): (2 * num_layers + 1) all-reduces of [tokens, hidden] (after attention and
    after the MLP of each layer, and the embedding) and the logits' all-gather of [outputs, vocab_per_rank].
    On CUDA they are captured in a CUDA graph and replayed, as the decode step's are, and timed with CUDA
    events; elsewhere timed eagerly."""
    if _STATE.size == 1:
        return 0.0
    device = _STATE.device
    x = torch.zeros(tokens, hidden, dtype=dtype, device=device)
    logits = torch.zeros(max(outputs, 1), vocab_per_rank, dtype=dtype, device=device)

    def step() -> None:
        for _ in range(2 * num_layers + 1):
            all_reduce(x)
        all_gather(logits)

    if device is not None and device.type == "cuda":
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            step()  # warm-up outside the capture
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) / iters


@contextlib.contextmanager
def simulated_rank(rank: int, size: int):
    """Layers built inside see rank `rank` of `size` without a group (planning: the shapes and bytes of a
    rank's shard, e.g. for pie doctor, on the meta device). Running collectives inside is an error."""
    global _STATE
    if _STATE.size > 1:
        raise RuntimeError("simulated_rank inside a real tensor-parallel group")
    saved, _STATE = _STATE, TPState(rank=rank, size=size)
    try:
        yield
    finally:
        _STATE = saved
