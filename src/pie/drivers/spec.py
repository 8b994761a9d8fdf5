"""What a driver needs to build its model executor; plain data so it can cross a process boundary."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ExecutorSpec:
    model_path: str  # a resolved local directory holding config.json, safetensors, tokenizer
    device: str = "cpu"  # "cpu" or "cuda:N"
    activation_dtype: str = "float32"  # bfloat16, float16, float32
    weight_dtype: str = "auto"  # auto (= activation dtype), bfloat16, float16, float32; int8, int4, float8
    kv_cache_dtype: str = "auto"  # auto (= activation dtype) or fp8_e4m3 (drivers/quantization.py)
    page_size: int = 16
    # How the KV page count is planned:
    #   "cuda_native": min(max_num_kv_pages, what gpu_mem_utilization of free memory allows)
    #   "dev":         gpu_mem_utilization of free memory after weights (CUDA) / host budget (CPU)
    kv_policy: str = "dev"
    gpu_mem_utilization: float = 0.8
    max_num_kv_pages: int | None = None
    num_pages: int | None = None  # explicit page count (tests); overrides planning
    swap_slots: int = 0  # pages of host memory for PageOps swap_out / swap_in (0: no swap pool)
    # recurrent-state slots of hybrid models (Qwen 3.5): one per live sequence or in-memory snapshot;
    # 0: min(max_batch_size, 128). Ignored by models without recurrent layers.
    state_slots: int = 0
    max_batch_tokens: int = 10240
    max_batch_size: int = 512
    max_dist_size: int = 32
    attention_backend: str = "auto"  # auto (flashinfer on CUDA when it imports), flashinfer, torch
    cuda_graphs: bool = False  # capture decode steps in CUDA graphs (cuda_native's fast path)
    # tensor parallelism: one process per device in `devices` (device is rank 0's); pie.drivers.tp builds
    # the group, every rank its shard (ModelExecutor reads the rank from pie.distributed)
    tensor_parallel_size: int = 1
    devices: list[str] | None = None  # one per rank; None: [device]
    tp_timeout_s: float = 300.0  # the longest a rank waits in a collective (or to join) before failing
    random_weights: bool = False  # benchmarks: real config, random weights, no safetensors needed
    seed: int = 0

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: dict) -> ExecutorSpec:
        return cls(**d)
