"""How many KV pages to allocate. `plan_num_pages` is pure (numbers in, count out) so it is unit tested
with exact figures; the helpers at the bottom read free memory.

Policies (ExecutorSpec.kv_policy), in order of precedence:
  spec.num_pages set        -> exactly that.
  CPU device (any policy)   -> host budget: min(4 GiB, 25% of available RAM) / page_bytes, capped at
                               enough pages for 64 sequences of max_position tokens. Modest on purpose:
                               the dev driver shares the host with everything else.
  "cuda_native" on CUDA     -> floor((util * free_before_load - weights_bytes - activation_reserve) / page_bytes)
  "dev" on CUDA             -> floor(util * free_after_load / page_bytes)
                               (the 1 - util left over covers activations)
spec.max_num_kv_pages, when set, caps every policy. Fewer than one page is a DriverError saying what to change.

activation_reserve (cuda_native) estimates the transient peak of one forward pass at max_batch_tokens T:
  T * (6 * hidden + 3 * intermediate) * act_bytes   residual, normed x, qkv, attention out (~6 H wide),
                                                    gate_up + activated product (3 I wide)
  + min(max_batch_size, T) * vocab * 16             fp32 logits and up to 3 same-size sampling temporaries
  + T * k * (3 * I_moe * act_bytes + 4 * hidden)    MoE layers (fused_moe): gate_up + activated product of
                                                    the k routed copies of each token, fp32 expert outputs
  + 256 MiB                                         FlashInfer workspace (128 MiB) and allocator slack
"""

from __future__ import annotations

import os

import torch

from pie.drivers.spec import ExecutorSpec
from pie.errors import DriverError
from pie.layers.parallel import kv_heads_per_rank
from pie.models.config import ModelConfig

GiB = 1 << 30
MiB = 1 << 20
HOST_BUDGET_MAX = 4 * GiB
HOST_BUDGET_FRACTION = 0.25
HOST_MAX_SEQUENCES = 64
ACTIVATION_FIXED_BYTES = 256 * MiB


def kv_layer_groups(config: ModelConfig, tp: int = 1) -> list[tuple[tuple[int, int], list[int]]]:
    """Layers grouped by KV shape: [((Hkv, D), [layer indices])], in order of first layer. Each group is
    one allocation [L_g, num_pages, 2, page_size, Hkv, D]; layers may differ in KV heads and head dim.
    Shared-KV layers (LayerSpec.kv_source set) and recurrent layers own no cache and are in no group. With
    tp tensor-parallel ranks, Hkv is one rank's KV heads (pie.layers.parallel.kv_heads_per_rank)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, layer in enumerate(config.layers):
        if not layer.owns_kv:
            continue
        groups.setdefault((kv_heads_per_rank(layer.num_kv_heads, tp), layer.head_dim), []).append(i)
    return list(groups.items())


def page_bytes(config: ModelConfig, page_size: int, dtype: torch.dtype, tp: int = 1) -> int:
    """Bytes of one page across all layers on one of tp ranks: sum over layers of 2 (K, V) * page_size *
    Hkv_l * D_l * elem, Hkv_l that rank's KV heads (shared-KV layers, which read another layer's cache, and
    recurrent layers add nothing)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(
        2 * page_size * kv_heads_per_rank(layer.num_kv_heads, tp) * layer.head_dim * elem
        for layer in config.layers
        if layer.owns_kv
    )


def activation_reserve(spec: ExecutorSpec, config: ModelConfig, act_bytes: int) -> int:
    """Estimated peak activation bytes of one forward pass on one rank (see the module docstring; the
    gathered logits are whole on every rank, the rest is not divided by tensor_parallel_size: an
    over-estimate that keeps the formula simple)."""
    T = spec.max_batch_tokens
    per_token = (6 * config.hidden_size + 3 * config.intermediate_size) * act_bytes
    if config.moe is not None:
        moe = config.moe
        per_token += moe.top_k * (3 * moe.expert_intermediate_size * act_bytes + 4 * config.hidden_size)
    logits = min(spec.max_batch_size, T) * config.vocab_size * 16
    return T * per_token + logits + ACTIVATION_FIXED_BYTES


def plan_num_pages(
    spec: ExecutorSpec,
    page_bytes: int,
    weights_bytes: int,
    free_before_load: int,
    free_after_load: int,
    *,
    model_config: ModelConfig,
    act_bytes: int = 2,
) -> int:
    """Number of KV pages for `spec` (see the module docstring for the policy).

    free_before_load / free_after_load: free device memory (CUDA) or available host RAM (CPU) in bytes,
    measured before and after the weights were materialized.
    """
    if spec.num_pages is not None:
        if spec.num_pages < 1:
            raise DriverError(f"num_pages must be >= 1, got {spec.num_pages}")
        return int(spec.num_pages)
    util = spec.gpu_mem_utilization
    if not 0.0 < util <= 1.0:
        raise DriverError(f"gpu_mem_utilization must be in (0, 1], got {util}")
    is_cpu = spec.device.startswith("cpu")
    if is_cpu:
        budget = min(HOST_BUDGET_MAX, int(HOST_BUDGET_FRACTION * free_after_load))
        cap_tokens = HOST_MAX_SEQUENCES * model_config.max_position_embeddings
        n = min(budget // page_bytes, -(-cap_tokens // spec.page_size))
        hint = "free host memory, use a smaller model, or set num_pages"
    elif spec.kv_policy == "cuda_native":
        reserve = activation_reserve(spec, model_config, act_bytes)
        n = int((util * free_before_load - weights_bytes - reserve) // page_bytes)
        hint = (
            f"the weights take {weights_bytes / GiB:.2f} GiB and activations ~{reserve / GiB:.2f} GiB of "
            f"{util:.0%} of {free_before_load / GiB:.2f} GiB free; raise gpu_mem_utilization, lower "
            "max_batch_tokens / max_batch_size, or use a smaller model"
        )
    elif spec.kv_policy == "dev":
        n = int(util * free_after_load // page_bytes)
        hint = "raise gpu_mem_utilization, free GPU memory, or use a smaller model"
    else:
        raise DriverError(f"unknown kv_policy {spec.kv_policy!r}; use 'cuda_native' or 'dev'")
    if spec.max_num_kv_pages is not None:
        n = min(n, spec.max_num_kv_pages)
    if n < 1:
        raise DriverError(f"no memory left for the KV cache (one page needs {page_bytes} bytes): {hint}")
    return int(n)


def capacity_hint(entry, source: str = "") -> str:
    """What to change when the KV pages of config model `entry` (a pie.config.ModelEntry) run out.

    Names only keys that act on its driver and device: on CPU the KV budget is host memory (above),
    and gpu_mem_utilization has no effect there."""
    d, o = entry.driver, entry.driver.options
    where = f" in the driver options of model {entry.name!r}" + (f" in {source}" if source else "")
    cap = getattr(o, "max_num_kv_pages", None)  # cuda_native always; dev where the option exists
    if d.device[0].startswith("cpu"):
        raise_cap = f"raise max_num_kv_pages (now {cap}){where}, or " if cap else ""
        return (
            f"{raise_cap}free host memory: on cpu the KV cache gets min({HOST_BUDGET_MAX // GiB} GiB, "
            f"{HOST_BUDGET_FRACTION:.0%} of available RAM) when the driver starts (gpu_mem_utilization has "
            "no effect on cpu); shorter prompts or fewer concurrent contexts also help"
        )
    keys = "max_num_kv_pages or gpu_mem_utilization" if cap is not None else "gpu_mem_utilization"
    return f"raise {keys}{where}"


def host_available_bytes() -> int:
    """Available host RAM: MemAvailable from /proc/meminfo, else free physical pages (non-Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of `device`: CUDA free bytes (after emptying torch's cache), or available host RAM."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(device)[0])
    return host_available_bytes()
