"""Skip marks shared by the GPU test files: CUDA, and FlashInfer (which must be present, and so fails
rather than skips, when PIE_REQUIRE_FLASHINFER=1, as scripts/gpu_check.sh sets)."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
try:
    import flashinfer  # noqa: F401

    HAS_FLASHINFER = True
except Exception:
    HAS_FLASHINFER = False
MUST_FLASHINFER = os.environ.get("PIE_REQUIRE_FLASHINFER") == "1"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
needs_flashinfer = pytest.mark.skipif(
    not HAS_CUDA or not (HAS_FLASHINFER or MUST_FLASHINFER), reason="needs CUDA and FlashInfer"
)
