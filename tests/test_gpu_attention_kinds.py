"""FlashInfer per-kind attention (sliding window, logit soft-cap, a non-default softmax scale) against pie's
torch backend in fp32, at the attention level, on CUDA. Marked gpu; skipped without CUDA and FlashInfer.

Why this file: the bf16 family tests (tests/test_gpu_families.py, tests/test_moe_gpu.py) fail for the
families with windows / soft-caps while the CPU parity tests pass, and the whole model sits between the
logits and the attention call. These tests isolate the one piece the families add on the GPU: the per-kind
plans of FlashInferBackend (eager decode / prefill wrappers) and FlashInferDecodeGraph (graph-mode decode
wrappers, run here without capture). If they pass, pie drives FlashInfer's windows and soft-caps correctly
and the family failures come from elsewhere (bf16 numerics, the Triton kernels, the HF reference or the
test bar); if they fail, the failing parameter names the culprit.

Shapes: the tiny families' heads (4 q / 2 kv heads of 64: CUDA-core decode) and a group of 4 (tensor-core
decode); windows of 6 (window_left 5) as in tests/tiny_models.py; Gemma 2's cap 2.0 with its
query_pre_attn_scalar scale 24 ** -0.5; a sliding and a full kind planned together, as Gemma 2 does.
Tolerance as tests/test_gpu.py's attention tests (bf16 inputs, fp32 reference): max |err| <= 3e-2, mean
<= 3e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gpu_marks import HAS_CUDA, needs_flashinfer
from test_gpu import assert_attention_close, random_batch

from pie.attention.base import AttentionMetadata, AttentionParams
from pie.drivers.protocol import make_batch

DEV = torch.device("cuda:0") if HAS_CUDA else None
GEMMA2_SCALE = 24**-0.5


def _kinds(hq: int, hkv: int, d: int, case: str) -> list[AttentionParams]:
    """The attention kinds of one model: case window | softcap | window_softcap (Gemma 2: sliding + full)."""
    if case == "window":  # Mistral / Mixtral / OLMo 3 style: sliding and full, default scale
        return [AttentionParams(hq, hkv, d, d**-0.5, window_left=5), AttentionParams(hq, hkv, d, d**-0.5)]
    if case == "softcap":
        return [AttentionParams(hq, hkv, d, GEMMA2_SCALE, logits_soft_cap=2.0)]
    return [  # Gemma 2
        AttentionParams(hq, hkv, d, GEMMA2_SCALE, window_left=5, logits_soft_cap=2.0),
        AttentionParams(hq, hkv, d, GEMMA2_SCALE, logits_soft_cap=2.0),
    ]


def _fresh_prefill_batch(page_size: int, num_pages: int, rng):
    """The family tests' first batch: fresh prompts of 5, 17 and 33 tokens (qo_len == kv_len)."""
    free = list(rng.permutation(num_pages))
    reqs = []
    for n in (5, 17, 33):
        pages = [int(free.pop()) for _ in range(-(-n // page_size))]
        reqs.append(dict(token_ids=[0] * n, positions=list(range(n)), pages=pages,
                         last_page_len=n - (len(pages) - 1) * page_size))  # fmt: skip
    return make_batch(reqs, page_size)


def _backends(kinds: list[AttentionParams], page_size: int):
    from pie.attention.flashinfer_backend import FlashInferBackend
    from pie.attention.torch_backend import TorchBackend

    hq, hkv, d = kinds[0].num_qo_heads, kinds[0].num_kv_heads, kinds[0].head_dim
    fi = FlashInferBackend(hq, hkv, d, page_size, torch.bfloat16, DEV, kinds[0].sm_scale, kinds)
    assert not fi.has_fallback, "every kind must run on FlashInfer here"
    ref = TorchBackend(hq, hkv, d, page_size, torch.float32, DEV, kinds[0].sm_scale, kinds)
    return fi, ref


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("heads", [(4, 2, 64), (8, 2, 64)], ids=["g2-cudacore", "g4-tensorcore"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("case", ["window", "softcap", "window_softcap"])
@pytest.mark.parametrize("kind", ["fresh", "decode", "mixed", "masked"])
def test_flashinfer_kinds_match_torch_backend_fp32(kind, case, page_size, heads):
    hq, hkv, d = heads
    kinds = _kinds(hq, hkv, d, case)
    rng = np.random.default_rng(page_size * 7 + hq)
    num_pages = 600 // page_size + 40
    batch = (
        _fresh_prefill_batch(page_size, num_pages, rng)
        if kind == "fresh"
        else random_batch(kind, page_size, num_pages, rng)
    )
    meta = AttentionMetadata.from_batch(batch, page_size, DEV)
    fi, ref = _backends(kinds, page_size)
    fi.plan(meta)
    ref.plan(meta)
    g = torch.Generator(device="cpu").manual_seed(page_size + hq)
    kv = torch.randn(num_pages, 2, page_size, hkv, d, generator=g).to(DEV, torch.bfloat16)
    q = torch.randn(batch.num_tokens, hq, d, generator=g).to(
        DEV, torch.bfloat16
    )  # scores ~N(0, 1.6): cap 2 bites
    for layer, p in enumerate(kinds):  # each layer on its kind's planned wrapper, one plan for all
        got = fi.run(q, kv, layer, p)
        want = ref.run(q.float(), kv.float(), layer, p)
        assert_attention_close(got, want, f"{kind} {case} ps={page_size} {heads} window={p.window_left}")


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("heads", [(4, 2, 64), (8, 2, 64)], ids=["g2-cudacore", "g4-tensorcore"])
@pytest.mark.parametrize("case", ["window", "window_softcap"])
def test_graph_decode_kinds_match_torch_backend_fp32(case, heads):
    """FlashInferDecodeGraph (graph-mode wrappers; run eagerly, which executes the same planned kernels)."""
    from pie.attention.flashinfer_backend import WORKSPACE_BYTES

    hq, hkv, d = heads
    kinds, ps = _kinds(hq, hkv, d, case), 16
    rng = np.random.default_rng(3)
    num_pages = 600 // ps + 40
    batch = random_batch("decode", ps, num_pages, rng)
    meta = AttentionMetadata.from_batch(batch, ps, DEV)
    fi, ref = _backends(kinds, ps)
    graph = fi.graph_decode(batch.num_requests, num_pages, WORKSPACE_BYTES)
    graph.plan(meta)
    ref.plan(meta)
    g = torch.Generator(device="cpu").manual_seed(5)
    kv = torch.randn(num_pages, 2, ps, hkv, d, generator=g).to(DEV, torch.bfloat16)
    q = torch.randn(batch.num_tokens, hq, d, generator=g).to(DEV, torch.bfloat16)
    for layer, p in enumerate(kinds):
        got = graph.run(q, kv, layer, p)
        want = ref.run(q.float(), kv.float(), layer, p)
        assert_attention_close(got, want, f"graph decode {case} {heads} window={p.window_left}")
