"""The attention-side families (Gemma 2, Gemma 3 text and wrapper, OLMo 3, Ministral, Ministral 3, Mistral 3
wrapper) against HF transformers on tiny random checkpoints with their quirks on and sliding windows of 6
that bite (fp32, CPU, torch attention backend), in both config layouts hub checkpoints carry.

Per arch and page size (1, 16): three sequences of 5, 17 and 33 tokens prefilled in one batch, then four
batched decode steps; every logit row within 1e-4 of transformers. Greedy: the three prompts decode 16
tokens together, each equal to transformers' generate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_parity_hf import (
    PagedSeqs,
    assert_close,
    assert_greedy_matches_generate,
    hf_logits,
    make_executor,
    paged_prefill_decode,
)
from tiny_models import FAMILY_ARCHS, LEGACY_ARCHS, WINDOW, make_tiny_checkpoint

from pie.drivers.protocol import make_batch
from pie.models.config import read_model_config
from pie.models.hub import inspect_dir
from pie.models.weights import dequantize_fp8

# windows on every layer: Ministral 3 (sliding_window set), Ministral's older layout (no layer_types)
ONLY_SLIDING = ("ministral3", "mistral3", "ministral3_legacy", "ministral_legacy")
LENGTHS = (5, 17, 33)  # 17 and 33 cross page boundaries at page size 16 and exceed the window


def _prompts(vocab: int, seed: int = 7) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in LENGTHS]


# the older layouts differ only in config.json: one page size suffices for them
CASES = [(a, ps) for a in FAMILY_ARCHS for ps in (1, 16)] + [(a, 16) for a in LEGACY_ARCHS]


@pytest.mark.parametrize("arch,page_size", CASES)
def test_prefill_and_paged_decode_match_hf(tiny_checkpoint, arch, page_size):
    path = tiny_checkpoint(arch)
    ex = make_executor(path, page_size, num_pages=200 if page_size == 1 else 16)
    cfg = ex.model_config
    assert cfg.attention_kinds == (("sliding",) if arch in ONLY_SLIDING else ("full", "sliding"))
    got, tokens = paged_prefill_decode(ex, _prompts(cfg.vocab_size), page_size)
    for i in range(3):
        assert_close(got[i], hf_logits(path, tokens[i]))


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_batched_greedy_generation_matches_hf_generate(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    page_size = 3  # odd size: decode steps cross page boundaries often
    ex = make_executor(path, page_size)
    assert_greedy_matches_generate(ex, path, _prompts(ex.model_config.vocab_size, seed=3), page_size)


def test_window_bites(tiny_checkpoint, tmp_path):
    """The same gemma2 weights with the window widened change the logits past the window: the test
    checkpoints' windows are small enough to matter."""
    assert_window_bites(tiny_checkpoint("gemma2"), _prompts(400)[2], tmp_path)


def assert_window_bites(path, ids: list[int], tmp_path) -> None:
    """transformers' logits of `ids` on the checkpoint at `path` and on a copy with the window widened to
    4096: equal inside the window, different past it."""
    wide = tmp_path / "wide"
    wide.mkdir()
    for f in path.iterdir():
        (wide / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "sliding_window": 4096}))
    a, b = hf_logits(path, ids), hf_logits(wide, ids)
    assert np.abs(a[:WINDOW] - b[:WINDOW]).max() < 1e-5
    assert np.abs(a[WINDOW + 1 :] - b[WINDOW + 1 :]).max() > 1e-2


@pytest.mark.parametrize("arch,vision", [("gemma3", "vision_tower"), ("mistral3", "vision_tower")])
def test_multimodal_wrapper_loads_text_tower(tiny_checkpoint, arch, vision):
    path = tiny_checkpoint(arch)
    keys = load_file(str(path / "model.safetensors")).keys()
    assert any(vision in k for k in keys) and any("language_model" in k for k in keys)
    cfg = read_model_config(path)
    assert cfg.model_type == arch and cfg.num_layers == len(cfg.layers)
    ex = make_executor(path, 4)
    names = {n for n, _ in ex.model.named_parameters()}
    assert not any(vision in n or "projector" in n for n in names)
    row = inspect_dir(arch, "local", path)  # `pie model list` marks the wrapper supported
    assert row.supported and row.model_type == arch and row.drivers


def _fp8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 (e4m3) quantization as FP8 hub checkpoints store it: (fp8 weight, scale_inv)."""
    rows, cols = w.shape
    bo, bi = -(-rows // block), -(-cols // block)
    pad = torch.zeros(bo * block, bi * block)
    pad[:rows, :cols] = w
    blocks = pad.view(bo, block, bi, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-8) / 448.0  # e4m3 max
    q = (blocks / scale[:, None, :, None]).view(bo * block, bi * block)[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_checkpoint_is_dequantized_at_load(tmp_path):
    """Ministral 3 with FP8 weights + weight_scale_inv (blocks of 32, shapes not multiples of it): pie
    equals transformers running the dequantized weights."""
    path = make_tiny_checkpoint(tmp_path / "fp8", "ministral3")
    tensors = load_file(str(path / "model.safetensors"))
    quant, deq = {}, {}
    for k, t in tensors.items():
        if k.endswith("proj.weight"):
            q, s = _fp8_blocks(t, 32)
            quant[k], quant[k.removesuffix("weight") + "weight_scale_inv"] = q, s
            quant[k.removesuffix("weight") + "activation_scale"] = torch.ones(())
            deq[k] = dequantize_fp8(q, s)
        else:
            quant[k] = deq[k] = t
    save_file(deq, str(path / "model.safetensors"))
    ref_dir = tmp_path / "deq"
    ref_dir.mkdir()
    for f in path.iterdir():
        (ref_dir / f.name).write_bytes(f.read_bytes())
    save_file(quant, str(path / "model.safetensors"))
    assert (
        float(
            (deq["model.layers.0.mlp.up_proj.weight"] - tensors["model.layers.0.mlp.up_proj.weight"])
            .abs()
            .max()
        )
        < 0.05
    )
    ex = make_executor(path, 4)
    seqs = PagedSeqs(ex.num_pages, 4)
    ids = _prompts(ex.model_config.vocab_size)[1]
    got = ex.execute(make_batch([seqs.request(0, ids)], 4)).logits
    assert_close(got, hf_logits(ref_dir, ids))


def test_dequantize_fp8_layouts():
    w = torch.randn(5, 7).to(torch.float8_e4m3fn)
    f = w.float()
    assert torch.equal(dequantize_fp8(w, torch.tensor(2.0)), f * 2)
    rows = torch.arange(1.0, 6.0)
    assert torch.equal(dequantize_fp8(w, rows), f * rows[:, None])
    blocks = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # blocks of 3 x 4
    want = f * torch.tensor([[1.0] * 4 + [2.0] * 3] * 3 + [[3.0] * 4 + [4.0] * 3] * 2)
    assert torch.equal(dequantize_fp8(w, blocks), want)
