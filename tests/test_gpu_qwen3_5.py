"""Qwen 3.5 on CUDA: bf16 with FlashInfer on the attention layers and the torch Gated DeltaNet (chunked
prefill, batched recurrent decode) against transformers fp32. Marked gpu; skipped without CUDA and FlashInfer
(tests/gpu_marks.py).

Bar (tests/test_gpu.py's rule): cosine >= 0.999 per logit row, the same top-1 wherever the fp32 top-2 margin
is clear, and >= 99% top-1 agreement over all rows; CUDA-graph decode equal to eager.
"""

from __future__ import annotations

import json

import pytest
import torch
from gpu_marks import needs_flashinfer
from test_cuda_graphs import _cuda_executor
from test_gpu import TINY, assert_logits_close
from test_gpu_families import (
    check_bf16_against_hf,
    check_graph_decode_matches_eager,
    checkpoint_cache,
    run_prefill_decode,
)
from tiny_models import HYBRID_ARCHS, hf_model_class


@pytest.fixture(scope="module")
def q35(tmp_path_factory):
    return checkpoint_cache(tmp_path_factory, **TINY)


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_qwen3_5_bf16_flashinfer_matches_hf_fp32(q35, arch, page_size):
    path = q35(arch)
    ex = _cuda_executor(path, False, ps=page_size, num_pages=512)
    assert ex.capabilities.extra["attention_backend"] == "flashinfer" and ex.state_pool is not None
    check_bf16_against_hf(ex, path, arch, page_size)


@pytest.mark.gpu
@needs_flashinfer
def test_qwen3_5_real_shape_bf16_matches_hf_fp32(tmp_path):
    """The bundled Qwen3.5-0.8B shape (head_dim 256, partial rotary 0.25, 16 x 128 x 128 delta heads) cut to
    4 layers (3 Gated DeltaNet, 1 gated attention), transformers' own random init; prompts of up to 200
    tokens (several 64-token chunks of the delta rule), then 8 decode steps."""
    import transformers

    from pie.bench import load_model_config

    cfg, _ = load_model_config("qwen3.5-0.8b")
    cfg = dict(cfg, num_hidden_layers=4, layer_types=cfg["layer_types"][:4])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf_cfg = transformers.AutoConfig.from_pretrained(str(tmp_path))
    torch.manual_seed(0)
    model = hf_model_class(hf_cfg).from_config(hf_cfg, dtype=torch.float32)
    model.save_pretrained(str(tmp_path))
    model = model.to("cuda:0").eval()
    ex = _cuda_executor(tmp_path, False, ps=16, num_pages=128)
    got, tokens = run_prefill_decode(ex, 16, lengths=(7, 90, 200))
    agree = rows = 0
    for i in range(3):
        with torch.no_grad():
            ref = model(torch.tensor([tokens[i]], device="cuda:0")).logits[0].float().cpu().numpy()
        ours = got[i]
        assert_logits_close(ours, ref, f"qwen3.5-0.8b real shape seq {i}")
        agree, rows = agree + int((ours.argmax(-1) == ref.argmax(-1)).sum()), rows + len(ref)
    assert agree / rows >= 0.99, f"top-1 agreement {agree / rows:.3f}"


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_qwen3_5_graph_decode_matches_eager(q35, arch):
    """12 decode steps of 4 sequences replayed from CUDA graphs (state slots as static inputs, padding rows
    on the pool's scratch slot) give the eager executor's logits."""
    check_graph_decode_matches_eager(q35(arch), arch)
