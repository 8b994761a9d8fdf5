"""Gemma 4 on CUDA (bf16, FlashInfer) against transformers fp32, and CUDA-graph decode against eager. Marked gpu;
skipped without CUDA and FlashInfer (tests/gpu_marks.py).

Tiny checkpoints of tests/gemma4_tiny.py (every quirk on: KV sharing, per-layer embeddings, k_eq_v, double-wide
MLP, MoE with the grouped-GEMM expert path, proportional rope, windows of 6) with FlashInfer-sized heads
(sliding head_dim 64, global 128, hidden 256), so every layer runs on FlashInfer. Bar (tests/test_gpu.py's
rule): cosine >= 0.999 per logit row, the same top-1 wherever the fp32 top-2 margin exceeds 0.3, and >= 99% top-1
agreement over all rows. The real-shape test cuts the bundled gemma-4-e2b config to 10 layers (4 shared); its
global layers (head_dim 512, beyond FlashInfer 0.6.3's 64/128/256) run on the torch fallback.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gemma4_tiny import GEMMA4_ARCHS, make_gemma4_checkpoint
from gpu_marks import needs_flashinfer
from test_cuda_graphs import _cuda_executor
from test_gpu import Seqs, assert_logits_close
from test_gpu_families import check_bf16_against_hf, check_graph_decode_matches_eager

from pie.drivers.protocol import make_batch

GPU_SHAPES = dict(hidden_size=256, head_dim=64, global_head_dim=128, initializer_range=0.075)
_HF: dict[str, torch.nn.Module] = {}


@pytest.fixture(scope="module")
def g4gpu(tmp_path_factory):
    cache: dict = {}

    def make(arch: str):
        if arch not in cache:
            cache[arch] = make_gemma4_checkpoint(tmp_path_factory.mktemp(arch), arch, **GPU_SHAPES)
        return cache[arch]

    return make


def hf_logits(path, ids) -> np.ndarray:
    import transformers

    if str(path) not in _HF:
        cfg = transformers.AutoConfig.from_pretrained(str(path))
        cls = (
            transformers.AutoModelForImageTextToText
            if cfg.model_type == "gemma4"
            else transformers.AutoModelForCausalLM
        )
        _HF[str(path)] = cls.from_pretrained(str(path), dtype=torch.float32).to("cuda:0").eval()
    with torch.no_grad():
        return _HF[str(path)](torch.tensor([list(ids)], device="cuda:0")).logits[0].float().cpu().numpy()


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("arch", GEMMA4_ARCHS)
def test_gemma4_bf16_flashinfer_matches_hf_fp32(g4gpu, arch, page_size):
    path = g4gpu(arch)
    ex = _cuda_executor(path, False, ps=page_size, num_pages=512)
    assert ex.capabilities.extra["attention_backend"] == "flashinfer" and not ex.backend.has_fallback
    check_bf16_against_hf(ex, path, arch, page_size, hf_logits)


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("arch", GEMMA4_ARCHS)
def test_gemma4_graph_decode_matches_eager(g4gpu, arch):
    """Shared-KV layers read their source's pages inside the graph; the MoE grouped path has no host sync."""
    check_graph_decode_matches_eager(g4gpu(arch), arch)


@pytest.mark.gpu
@needs_flashinfer
def test_gemma4_real_shape_bf16_matches_hf_fp32(tmp_path):
    """gemma-4-e2b's real head dims (256 sliding, 512 global), 8 heads over 1 KV head, PLE 256 and the
    double-wide shared layers, cut to 10 layers [s s s s f] x 2 with the last 4 KV-shared and the window
    shortened to 64; transformers' own random init."""
    import transformers

    from pie.bench import load_model_config

    cfg, _ = load_model_config("gemma-4-e2b")
    kinds = (["sliding_attention"] * 4 + ["full_attention"]) * 2
    cfg = dict(cfg, num_hidden_layers=10, layer_types=kinds, num_kv_shared_layers=4, sliding_window=64)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf_cfg = transformers.AutoConfig.from_pretrained(str(tmp_path))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    model.save_pretrained(str(tmp_path))
    model = model.to("cuda:0").eval()
    ex = _cuda_executor(tmp_path, False, ps=16, num_pages=128)
    seqs, rng = Seqs(ex.num_pages, 16, seed=1), np.random.default_rng(3)
    prompts = [rng.integers(0, ex.model_config.vocab_size, n).tolist() for n in (7, 90, 200)]
    batch = make_batch([seqs.request(i, p) for i, p in enumerate(prompts)], 16)
    res = ex.execute(batch)
    for i, (p, ours) in enumerate(zip(prompts, np.split(res.logits, batch.qo_indptr[1:-1]), strict=True)):
        with torch.no_grad():
            ref = model(torch.tensor([p], device="cuda:0")).logits[0].float().cpu().numpy()
        assert_logits_close(ours, ref, f"gemma-4-e2b real shape seq {i}")
