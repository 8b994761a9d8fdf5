"""Capabilities.kv_fingerprint: a short hash that changes whenever saved KV page bytes would not be valid.

Page bytes (PageOps.read) are the keys and values a specific model computed; they can be written back
(PageOps.write) only into a driver that would have computed the same bytes in the same layout. The
fingerprint covers:

  - the normalized model config (architecture, shapes, rope, norms, biases; not eos/bos ids),
  - the weights' identity: each safetensors file's name, size, header and 64 chunks of 16 KiB spread over
    it (1 MiB read per file: a fine-tune or a different checkpoint of the same shape changes it, reading
    every byte of an 8B model would cost seconds); random weights: their seed,
  - page_size, the KV dtype and the per-layer page shape [2, page_size, Hkv, D] of every layer.

The activation dtype is part of it through the KV dtype (the cache stores activations).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from pie.models.config import ModelConfig
from pie.models.weights import checkpoint_files

SAMPLE_CHUNKS = 64
CHUNK_BYTES = 16 * 1024
# Config fields that do not change any key or value (generation stops, bookkeeping).
_IGNORED_FIELDS = ("raw", "eos_token_ids", "bos_token_id", "torch_dtype")


def weights_identity(model_dir: str | Path) -> str:
    """Hash of the checkpoint's safetensors files (names, sizes, headers, sampled contents)."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for path in checkpoint_files(root):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}\n".encode())
        with open(path, "rb") as f:
            if size <= SAMPLE_CHUNKS * CHUNK_BYTES:
                h.update(f.read())
                continue
            header_len = int.from_bytes(f.read(8), "little")  # safetensors: u64 header size, JSON header
            h.update(f.read(min(header_len, size - 8)))
            for i in range(SAMPLE_CHUNKS):
                f.seek(i * (size - CHUNK_BYTES) // (SAMPLE_CHUNKS - 1))
                h.update(f.read(CHUNK_BYTES))
    return h.hexdigest()


def config_identity(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for key in _IGNORED_FIELDS:
        d.pop(key, None)
    return d


def kv_fingerprint(
    cfg: ModelConfig,
    weights: str,
    page_size: int,
    kv_caches: list[torch.Tensor],
) -> str:
    """`architecture-<16 hex>`; `weights` is weights_identity(...) or e.g. "random:<seed>"."""
    layout = [[str(kv.dtype).removeprefix("torch."), list(kv.shape[1:])] for kv in kv_caches]
    doc = {"config": config_identity(cfg), "weights": weights, "page_size": page_size, "layout": layout}
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
    return f"{cfg.model_type}-{digest[:16]}"
