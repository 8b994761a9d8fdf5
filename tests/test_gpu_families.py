"""The attention-side families on CUDA (bf16, FlashInfer with per-kind plans: sliding windows, soft-caps,
query_pre_attn_scalar scales, YaRN tables) against transformers fp32, and their CUDA-graph decode against the
eager executor. Marked gpu; skipped without CUDA and FlashInfer (tests/gpu_marks.py).

Tiny checkpoints of tests/tiny_models.py with FlashInfer-sized heads (head_dim 64, hidden 256), windows of 6
against prompts of 5-33 tokens. Bar: cosine >= 0.999 per logit row and the same top-1 wherever the fp32
top-2 margin exceeds 0.3 (tests/test_gpu.py's rule), plus >= 99% top-1 agreement over all rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gpu_marks import needs_flashinfer
from test_cuda_graphs import _cuda_executor, assert_same_logits
from test_gpu import TINY, Seqs, assert_logits_close
from tiny_models import FAMILY_ARCHS, hf_model_class, make_tiny_checkpoint

from pie.drivers.protocol import make_batch

_HF: dict[str, torch.nn.Module] = {}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    cache: dict = {}

    def make(arch: str):
        if arch not in cache:
            cache[arch] = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, **TINY)
        return cache[arch]

    return make


def hf_logits(path, ids) -> np.ndarray:
    import transformers

    if str(path) not in _HF:
        cls = hf_model_class(transformers.AutoConfig.from_pretrained(str(path)))
        _HF[str(path)] = cls.from_pretrained(str(path), dtype=torch.float32).to("cuda:0").eval()
    with torch.no_grad():
        return _HF[str(path)](torch.tensor([list(ids)], device="cuda:0")).logits[0].float().cpu().numpy()


def check_bf16_against_hf(ex, path, arch: str, page_size: int, hf_logits) -> None:
    """Prefill 3 sequences then 8 pure decode steps (the decode wrappers of every kind) on ex; each row's
    logits against hf_logits(path, tokens): cosine and top-1 bars of assert_logits_close."""
    seqs, rng = Seqs(ex.num_pages, page_size, seed=page_size), np.random.default_rng(7)
    prompts = [rng.integers(0, ex.model_config.vocab_size, n).tolist() for n in (5, 17, 33)]
    batch = make_batch([seqs.request(i, p) for i, p in enumerate(prompts)], page_size)
    res = ex.execute(batch)
    got = [[rows] for rows in np.split(res.logits, batch.qo_indptr[1:-1])]
    tokens = [list(p) for p in prompts]
    last = [int(t[-1]) for t in np.split(res.tokens, batch.qo_indptr[1:-1])]
    for _ in range(8):  # pure decode batches: the decode wrappers of every kind
        batch = make_batch([seqs.request(i, [t]) for i, t in enumerate(last)], page_size)
        res = ex.execute(batch)
        for i, t in enumerate(last):
            tokens[i].append(t)
            got[i].append(res.logits[i : i + 1])
        last = [int(t) for t in res.tokens]
    agree, rows = 0, 0
    for i in range(3):
        ours, ref = np.concatenate(got[i]), hf_logits(path, tokens[i])
        assert_logits_close(ours, ref, f"{arch} ps={page_size} seq {i}")
        agree, rows = agree + int((ours.argmax(-1) == ref.argmax(-1)).sum()), rows + len(ref)
    assert agree / rows >= 0.99, f"{arch}: top-1 agreement {agree / rows:.3f}"


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
    check_bf16_against_hf(ex, path, arch, page_size, hf_logits)


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "olmo3", "ministral3"])
def test_family_graph_decode_matches_eager(fam, arch):
    check_graph_decode_matches_eager(fam(arch), arch)


# ---- real shapes (the bundled bench configs, fewer layers), random weights ------------------------------


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-3-1b", "olmo-3-7b", "ministral-8b", "ministral-3-8b"])
def test_real_shape_family_bf16_matches_hf_fp32(tmp_path, name):
    """A bundled config's real head dims, heads and rope, cut to 4 layers (2 of each kind where the family
    has two) with the window shortened to 64 so prompts of up to 200 tokens cross it; transformers' own
    random init (std 0.02, so logits are small: the top-1 rule applies only where the margin is clear)."""
    import json

    import transformers

    from pie.bench import load_model_config

    cfg, _ = load_model_config(name)
    cfg = dict(cfg, num_hidden_layers=4)
    if cfg.get("layer_types"):
        kinds = sorted(set(cfg["layer_types"]))
        cfg["layer_types"] = (kinds * 2)[:4] if len(kinds) == 2 else cfg["layer_types"][:4]
    if cfg.get("sliding_window"):
        cfg["sliding_window"] = 64
    if cfg.get("sliding_window_pattern"):
        cfg["sliding_window_pattern"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf_cfg = transformers.AutoConfig.from_pretrained(str(tmp_path))
    torch.manual_seed(0)
    model = hf_model_class(hf_cfg).from_config(hf_cfg, dtype=torch.float32)
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
        assert_logits_close(ours, ref, f"{name} real shape seq {i}")
