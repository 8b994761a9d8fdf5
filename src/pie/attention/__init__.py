"""Attention backends by name: "torch" (portable), "flashinfer" (CUDA fast path), "auto"."""

from __future__ import annotations

import importlib.util

import torch

from pie.attention.base import AttentionBackend
from pie.errors import DriverError

BACKENDS = ("auto", "flashinfer", "torch")
_FLASHINFER_HINT = (
    "install it into the driver's environment: pip install flashinfer-python==0.6.3 "
    'apache-tvm-ffi==0.1.15.post2 einops (or set attention_backend = "torch")'
)


def flashinfer_available() -> bool:
    """True when `import flashinfer` succeeds (it may fail at import even when the package is present)."""
    if importlib.util.find_spec("flashinfer") is None:
        return False
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


def create_backend(name: str, **kwargs) -> AttentionBackend:
    """Build a backend; kwargs are AttentionBackend's constructor arguments (num_qo_heads, num_kv_heads,
    head_dim, page_size, dtype, device, sm_scale, layer_params).

    "auto" picks FlashInfer when the device is CUDA, flashinfer imports and supports the dtype and at least
    one layer's attention (layers it cannot run fall back to the torch backend inside it), else torch.
    """
    if name == "auto":
        name = "torch"
        if torch.device(kwargs.get("device", "cpu")).type == "cuda" and flashinfer_available():
            from pie.attention.base import AttentionParams
            from pie.attention.flashinfer_backend import params_unsupported_reason

            default = AttentionParams(
                kwargs["num_qo_heads"],
                kwargs["num_kv_heads"],
                kwargs["head_dim"],
                kwargs.get("sm_scale") or kwargs["head_dim"] ** -0.5,
            )
            kinds = kwargs.get("layer_params") or [default]
            if any(params_unsupported_reason(p, kwargs["dtype"]) is None for p in kinds):
                name = "flashinfer"
    if name == "torch":
        from pie.attention.torch_backend import TorchBackend

        return TorchBackend(**kwargs)
    if name == "flashinfer":
        try:
            import flashinfer  # noqa: F401
        except Exception as e:
            raise DriverError(
                f"attention backend 'flashinfer' needs FlashInfer, which failed to import ({e}); {_FLASHINFER_HINT}"
            ) from None
        if torch.device(kwargs.get("device", "cpu")).type != "cuda":
            raise DriverError(
                "attention backend 'flashinfer' runs on CUDA only; use 'torch' or 'auto' on CPU"
            )
        from pie.attention.flashinfer_backend import FlashInferBackend

        return FlashInferBackend(**kwargs)
    raise DriverError(f"unknown attention backend {name!r}; choose one of: {', '.join(BACKENDS)}")
