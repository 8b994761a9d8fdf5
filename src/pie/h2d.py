"""Host arrays to device tensors without stalling the stream.

cudaMemcpyAsync from pageable host memory stages through a driver buffer and may wait for the stream to
drain first: a pass launched while the previous one runs would then wait for it, and the pipelining of
steps (pie.drivers.inprocess) would collapse into a serial loop. Copies from pinned memory are truly
asynchronous; torch's pinned allocator caches blocks and keeps each until its copy has run.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(a: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
