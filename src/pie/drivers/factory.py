"""From a config's [[model]] entry to a Driver (not started).

The config (pie.config) has been validated when it was loaded, so values here are trusted; the
only work is naming: config option keys -> ExecutorSpec fields, driver type -> driver class.
"""

from __future__ import annotations

from pie.config import ModelEntry
from pie.drivers.base import Driver
from pie.drivers.spec import ExecutorSpec
from pie.errors import ConfigError


def executor_spec(entry: ModelEntry) -> ExecutorSpec:
    from pie.models.check import check_model_dir
    from pie.models.config import read_model_config
    from pie.models.hub import resolve_model_dir

    d, o = entry.driver, entry.driver.options
    model_path = resolve_model_dir(entry.hf_repo)
    # Fail here, before a driver process starts, on a checkpoint the executor would reject
    # (config normalization, safetensors headers; the tokenizer is the engine's).
    check_model_dir(model_path, tokenizer=False)
    model_config = read_model_config(model_path)
    if d.tensor_parallel_size > 1:  # heads and sizes must split evenly over the ranks: say so before starting
        from pie.drivers.executor import tensor_parallel_problem
        from pie.drivers.quantization import tensor_parallel_quant_problem
        from pie.models.registry import get_model_class

        model_cls = get_model_class(model_config.model_type)
        problem = tensor_parallel_problem(model_config, model_cls, d.tensor_parallel_size)
        if problem is None:  # each rank quantizes its own shard: the format's blocks must not straddle ranks
            quant = "float8" if getattr(o, "runtime_quant", "") == "fp8" else o.weight_dtype
            problem = tensor_parallel_quant_problem(model_cls, model_config, d.tensor_parallel_size, quant)
        if problem is not None:
            raise ConfigError(f"model {entry.name!r}: {problem}")
    common = dict(
        model_path=str(model_path),
        device=d.device[0],
        devices=list(d.device),
        tensor_parallel_size=d.tensor_parallel_size,
        activation_dtype=d.activation_dtype,
        # cuda_native's runtime_quant "fp8" is FP8 weights and activations: weight_dtype "float8"
        weight_dtype="float8" if getattr(o, "runtime_quant", "") == "fp8" else o.weight_dtype,
        kv_cache_dtype=o.kv_cache_dtype,
        page_size=o.kv_page_size,
        gpu_mem_utilization=o.gpu_mem_utilization,
        max_batch_tokens=o.max_batch_tokens,
        max_batch_size=o.max_batch_size,
    )
    if d.type == "cuda_native":
        # CUDA graphs for decode: the fast path's point (pie.drivers.cuda_graphs); on only with FlashInfer.
        return ExecutorSpec(
            **common,
            kv_policy="cuda_native",
            max_num_kv_pages=o.max_num_kv_pages,
            swap_slots=o.swap_pool_size,
            cuda_graphs=True,
        )
    if d.type == "dev":
        return ExecutorSpec(
            **common,
            kv_policy="dev",
            max_dist_size=o.max_dist_size,
            max_num_kv_pages=o.max_num_kv_pages,
            swap_slots=swap_slots_for_budget(entry, model_config),
        )
    raise ConfigError(f"model {entry.name!r}: unknown driver type {d.type!r}; use cuda_native or dev")


def swap_slots_for_budget(entry: ModelEntry, model_config) -> int:
    """dev's cpu_mem_budget_in_gb as a count of host swap slots: floor(budget / bytes of one KV page)."""
    import torch

    from pie.drivers.kv_plan import GiB, page_bytes

    d, o = entry.driver, entry.driver.options
    budget = o.cpu_mem_budget_in_gb
    if budget == 0:
        return 0
    kv_dtype = torch.float8_e4m3fn if o.kv_cache_dtype == "fp8_e4m3" else getattr(torch, d.activation_dtype)
    nbytes = page_bytes(model_config, o.kv_page_size, kv_dtype)
    slots = int(budget * GiB // nbytes)
    if slots < 1:
        raise ConfigError(
            f"model {entry.name!r}: cpu_mem_budget_in_gb = {budget:g} holds no KV page (one page takes "
            f"{nbytes / 2**20:.2f} MiB); raise it, or set 0 to disable swap"
        )
    return slots


def create_driver(entry: ModelEntry, in_process: bool = False) -> Driver:
    """The driver the entry asks for. `in_process` (tests, debugging) runs any entry's executor in
    this process through InProcessDriver, whatever its driver type."""
    spec = executor_spec(entry)
    d, o = entry.driver, entry.driver.options
    if in_process:
        from pie.drivers.inprocess import InProcessDriver

        return InProcessDriver(spec)
    if d.type == "cuda_native":
        from pie.drivers.cuda_native import CudaNativeDriver

        return CudaNativeDriver(
            spec, ready_timeout_s=o.ready_timeout_s, shutdown_timeout_s=o.shutdown_timeout_s
        )
    from pie.drivers.dev.client import DevDriver

    return DevDriver(
        spec,
        python=o.python,
        venv=o.venv,
        ready_timeout_s=o.ready_timeout_s,
        shutdown_timeout_s=o.shutdown_timeout_s,
        heartbeat_timeout_s=o.heartbeat_timeout_s,
    )
