"""The attention-side families on CUDA (bf16, FlashInfer with per-kind plans: sliding windows, soft-caps,
query_pre_attn_scalar scales, YaRN tables) against transformers fp32, and their CUDA-graph decode against the
eager executor. Marked gpu; skipped without CUDA and FlashInfer (tests/gpu_marks.py).

Tiny checkpoints of tests/tiny_models.py with FlashInfer-sized heads (head_dim 64, hidden 256), windows of 6
against prompts of 5-33 tokens. Bar: cosine >= 0.999 per logit row and the same top-1 wherever the fp32
top-2 margin exceeds 0.3 (tests/test_gpu.py's rule), plus >= 99% top-1 agreement over all rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gpu_marks import needs_flashinfer
from test_cuda_graphs import _cuda_executor, assert_same_logits
from test_gpu import (
    TINY,
    Seqs,
    assert_bf16_parity,
    cuda_executor,
    hf_cuda_cached_logits,
    hf_cuda_logits,
    logit_stats,
)
from tiny_models import FAMILY_ARCHS, hf_model_class, make_tiny_checkpoint

from pie.drivers.protocol import make_batch


def checkpoint_cache(
    tmp_path_factory, make: Callable[..., Path] = make_tiny_checkpoint, **shapes
) -> Callable:
    """A module fixture's body: arch -> make(tmp dir, arch, **shapes), each checkpoint built once."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = make(tmp_path_factory.mktemp(arch), arch, **shapes)
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return checkpoint_cache(tmp_path_factory, **TINY)


def run_prefill_decode(
    ex, page_size: int, steps: int = 8, lengths: tuple[int, ...] = (5, 17, 33)
) -> tuple[list[np.ndarray], list[list[int]]]:
    """Prefill a sequence per prompt length (5, 17, 33 tokens) then `steps` pure decode steps (the decode wrappers of every
    kind) on ex, feeding back its own tokens. Returns each sequence's logit rows and its tokens (the prompt,
    then the `steps` fed tokens: a row per token)."""
    seqs, rng = Seqs(ex.num_pages, page_size, seed=page_size), np.random.default_rng(7)
    prompts = [rng.integers(0, ex.model_config.vocab_size, n).tolist() for n in lengths]
    batch = make_batch([seqs.request(i, p) for i, p in enumerate(prompts)], page_size)
    res = ex.execute(batch)
    got = [[rows] for rows in np.split(res.logits, batch.qo_indptr[1:-1])]
    tokens = [list(p) for p in prompts]
    last = [int(t[-1]) for t in np.split(res.tokens, batch.qo_indptr[1:-1])]
    for _ in range(steps):
        batch = make_batch([seqs.request(i, [t]) for i, t in enumerate(last)], page_size)
        res = ex.execute(batch)
        for i, t in enumerate(last):
            tokens[i].append(t)
            got[i].append(res.logits[i : i + 1])
        last = [int(t) for t in res.tokens]
    return [np.concatenate(g) for g in got], tokens


def check_bf16_against_hf(ex, path, arch: str, page_size: int, cached: bool = False) -> None:
    """ex (bf16) on run_prefill_decode against transformers fp32 on CUDA, beside transformers' own bf16 run
    (tests/test_gpu.py's assert_bf16_parity), all rows of the 3 sequences together. cached: transformers
    prefills and then decodes with its cache as pie does (LongRoPE's set switch depends on it)."""
    rows, tokens = run_prefill_decode(ex, page_size)
    n = [len(t) - 8 for t in tokens]  # prompt lengths: run_prefill_decode fed 8 tokens after each prompt

    def hf(t, k, dtype):
        return hf_cuda_cached_logits(path, t[:k], t[k:], dtype) if cached else hf_cuda_logits(path, t, dtype)

    ref = np.concatenate([hf(t, k, torch.float32) for t, k in zip(tokens, n, strict=True)])
    hf16 = np.concatenate([hf(t, k, torch.bfloat16) for t, k in zip(tokens, n, strict=True)])
    assert_bf16_parity(np.concatenate(rows), ref, hf16, f"{arch} ps={page_size}")


def check_fp32_against_hf(path, arch: str) -> None:
    """pie in fp32 on CUDA (torch attention backend, the Triton kernels on) against transformers fp32 on CUDA:
    the GPU code paths must be as exact as the CPU ones (no bf16 noise to hide a bug behind)."""
    ex = cuda_executor(path, 16, backend="torch", dtype="float32")
    rows, tokens = run_prefill_decode(ex, 16, steps=4)
    for i, (ours, t) in enumerate(zip(rows, tokens, strict=True)):
        ref = hf_cuda_logits(path, t)
        cos, _, _ = logit_stats(ours, ref)
        top2 = np.sort(ref, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-3
        diff = float(np.abs(ours - ref).max())
        assert cos >= 0.99999 and diff < 2e-2, (
            f"{arch} fp32 seq {i}: min cosine {cos:.7f}, max |diff| {diff:.5f}"
        )
        assert np.array_equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear]), f"{arch} fp32 seq {i}: top-1"


def check_graph_decode_matches_eager(path, arch: str) -> None:
    """12 decode steps of 4 sequences replayed from CUDA graphs give the eager executor's logits."""
    ps = 16
    eager, graphed = _cuda_executor(path, False), _cuda_executor(path, True)
    V, rng, seqs = eager.model_config.vocab_size, np.random.default_rng(1), Seqs(256, ps, seed=2)
    prompts = [rng.integers(0, V, n).tolist() for n in (3, 9, 20, 33)]
    batch = make_batch([seqs.request(i, p) for i, p in enumerate(prompts)], ps)
    eager.execute(batch), graphed.execute(batch)
    last = [int(rng.integers(V)) for _ in prompts]
    for step in range(12):  # crosses the window (6) and a page boundary for every sequence
        batch = make_batch([seqs.request(i, [last[i]]) for i in range(len(prompts))], ps)
        want, got = eager.execute(batch), graphed.execute(batch)
        assert_same_logits(got.logits, want.logits, f"{arch} step {step}")
        last = [int(t) for t in want.tokens]
    assert graphed.graphs.stats.replays == 12 and graphed.graphs.stats.disabled is None


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_family_bf16_flashinfer_matches_hf_fp32(fam, arch, page_size):
    path = fam(arch)
    ex = _cuda_executor(path, False, ps=page_size, num_pages=512)
    assert ex.capabilities.extra["attention_backend"] == "flashinfer" and not ex.backend.has_fallback
    check_bf16_against_hf(ex, path, arch, page_size)


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_family_fp32_cuda_matches_hf_fp32(fam, arch):
    check_fp32_against_hf(fam(arch), arch)


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "olmo3", "ministral3"])
def test_family_graph_decode_matches_eager(fam, arch):
    check_graph_decode_matches_eager(fam(arch), arch)


# ---- real shapes (the bundled bench configs, fewer layers), random weights ------------------------------


def real_shape_checkpoint(tmp_path, name: str, layers: int, **edits):
    """A bundled bench config (src/pie/bench/configs) cut to `layers` layers (alternating kinds where the
    family has two), sliding windows shortened to 64 so prompts of up to 200 tokens cross them, written with
    transformers' own random init (std 0.02) rounded to bf16 (so the bf16 checkpoint pie loads and the fp32
    reference hold the same weights). Returns (path, the fp32 transformers model on CUDA, eager attention)."""
    import json

    import transformers

    from pie.bench import load_model_config

    cfg, _ = load_model_config(name)
    cfg = dict(cfg, num_hidden_layers=layers, **edits)
    cfg.pop("quantization_config", None)  # GPT-OSS ships MXFP4 experts; random weights are plain bf16
    if cfg.get("layer_types") and "layer_types" not in edits:
        kinds = sorted(set(cfg["layer_types"]))
        cfg["layer_types"] = (kinds * layers)[:layers] if len(kinds) == 2 else cfg["layer_types"][:layers]
    if cfg.get("sliding_window"):
        cfg["sliding_window"] = 64
    if cfg.get("sliding_window_pattern"):
        cfg["sliding_window_pattern"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf_cfg = transformers.AutoConfig.from_pretrained(str(tmp_path))
    torch.manual_seed(0)
    model = hf_model_class(hf_cfg).from_config(
        hf_cfg, dtype=torch.bfloat16, attn_implementation="eager", experts_implementation="eager"
    )
    model.save_pretrained(str(tmp_path))
    return tmp_path, model.to("cuda:0", torch.float32).eval()


def check_real_shape(tmp_path, name: str, layers: int = 4, **edits) -> None:
    """pie bf16 (FlashInfer) prefill of 3 prompts (7, 90, 200 tokens) against transformers fp32, beside
    transformers' own bf16 run (assert_bf16_parity)."""
    path, model = real_shape_checkpoint(tmp_path, name, layers, **edits)
    ex = _cuda_executor(path, False, ps=16, num_pages=128)
    seqs, rng = Seqs(ex.num_pages, 16, seed=1), np.random.default_rng(3)
    prompts = [rng.integers(0, ex.model_config.vocab_size, n).tolist() for n in (7, 90, 200)]
    batch = make_batch([seqs.request(i, p) for i, p in enumerate(prompts)], 16)
    ours = ex.execute(batch).logits
    del ex
    with torch.no_grad():
        ref = [model(torch.tensor([p], device="cuda:0")).logits[0].float().cpu().numpy() for p in prompts]
        model.to(torch.bfloat16)
        hf16 = [model(torch.tensor([p], device="cuda:0")).logits[0].float().cpu().numpy() for p in prompts]
    del model
    torch.cuda.empty_cache()
    assert_bf16_parity(ours, np.concatenate(ref), np.concatenate(hf16), f"{name} real shape")


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-3-1b", "olmo-3-7b", "ministral-8b", "ministral-3-8b"])
def test_real_shape_family_bf16_matches_hf_fp32(tmp_path, name):
    check_real_shape(tmp_path, name)
