"""cuda_native: the in-process CUDA fast path (FlashInfer attention), on InProcessDriver's worker thread.

On top of InProcessDriver it adds: a refusal, with a hint, when the device is not CUDA or torch sees no
CUDA; the attention backend choice for "auto" (FlashInfer when it imports and supports the model's
attention shape and dtype, else the portable torch backend, with one warning); and time limits on start
(the model load) and shutdown. Decode steps replay CUDA graphs (drivers/cuda_graphs.py; the factory sets ExecutorSpec.cuda_graphs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from pie.drivers.inprocess import InProcessDriver
from pie.drivers.protocol import Capabilities
from pie.drivers.spec import ExecutorSpec
from pie.errors import DriverError, PieError

log = logging.getLogger(__name__)
_warned: set[str] = set()  # fallback reasons already logged (warn once per process)


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def check_cuda(device: str) -> None:
    """DriverError unless `device` names a CUDA device that torch can use."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DriverError(f"cuda_native: invalid device {device!r}; use 'cuda:N'") from None
    if dev.type != "cuda":
        raise DriverError(
            f'the cuda_native driver runs on CUDA devices, not {device!r}; set device = ["cuda:0"], '
            'or use the dev driver (type = "dev") on CPU'
        )
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DriverError(
            f"the cuda_native driver needs CUDA, but torch {torch.__version__} ({built}) sees no CUDA device; "
            "check nvidia-smi and install a CUDA build of torch, or use the dev driver on CPU"
        )


def flashinfer_unusable_reason(spec: ExecutorSpec) -> str | None:
    """Why "auto" should not pick FlashInfer for this spec (None when it should).

    A config.json that cannot be read is not a reason: the executor reports that itself, better.
    """
    from pie.attention import flashinfer_available

    if not flashinfer_available():
        return (
            "FlashInfer is not installed or fails to import (pip install flashinfer-python==0.6.3 "
            "apache-tvm-ffi==0.1.15.post2 einops)"
        )
    from pie.attention.flashinfer_backend import params_unsupported_reason
    from pie.drivers.executor import resolve_dtypes
    from pie.layers.attention import attention_params
    from pie.models.config import read_model_config

    try:
        act, _ = resolve_dtypes(spec.activation_dtype, spec.weight_dtype)
        cfg = read_model_config(spec.model_path)
    except PieError:
        return None
    # usable when it runs at least one layer kind; the others fall back per layer (flashinfer_backend)
    reasons = [params_unsupported_reason(attention_params(layer), act) for layer in cfg.layers]
    return None if any(r is None for r in reasons) else reasons[0]


def resolve_attention_backend(spec: ExecutorSpec) -> str:
    """The backend name cuda_native builds with: an explicit choice is kept; "auto" becomes "flashinfer"
    when usable, else "torch" (warned once)."""
    if spec.attention_backend != "auto":
        return spec.attention_backend
    reason = flashinfer_unusable_reason(spec)
    if reason is None:
        return "flashinfer"
    _warn_once(f"cuda_native: using the portable torch attention backend: {reason}")
    return "torch"


class CudaNativeDriver(InProcessDriver):
    """In-process CUDA driver. Construction checks the device (DriverError when unusable) and fixes the
    attention backend; `start` loads the model within ready_timeout_s, `shutdown` gives up after
    shutdown_timeout_s."""

    def __init__(
        self, spec: ExecutorSpec, ready_timeout_s: float = 600.0, shutdown_timeout_s: float = 5.0
    ) -> None:
        if ready_timeout_s <= 0 or shutdown_timeout_s <= 0:
            raise DriverError("cuda_native: ready_timeout_s and shutdown_timeout_s must be > 0")
        for device in spec.devices or [spec.device]:  # one per tensor-parallel rank
            check_cuda(device)
        spec = dataclasses.replace(spec, attention_backend=resolve_attention_backend(spec))
        super().__init__(spec)
        self.ready_timeout_s = ready_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s

    async def start(self) -> Capabilities:
        try:
            return await asyncio.wait_for(super().start(), timeout=self.ready_timeout_s)
        except TimeoutError:
            # The load goes on in the worker thread; it stops (and drops the executor) when the load ends.
            self._closed = True
            self.abandon()
            raise DriverError(
                f"cuda_native: the model at {self.spec.model_path} was not ready within {self.ready_timeout_s:g} s "
                "(ready_timeout_s); raise it for large models or slow disks"
            ) from None

    async def shutdown(self) -> None:
        try:
            await asyncio.wait_for(super().shutdown(), timeout=self.shutdown_timeout_s)
        except TimeoutError:
            # A forward pass is still running on the worker thread; it cannot be interrupted, so let it
            # finish in the background rather than hang the caller.
            _warn_once(
                f"cuda_native: shutdown did not finish within {self.shutdown_timeout_s:g} s (shutdown_timeout_s); "
                "a forward pass was still running"
            )
