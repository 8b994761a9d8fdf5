"""GPT-OSS against HF transformers on a tiny random checkpoint with its quirks on (fp32, CPU, torch attention
backend): sink logits per head, sliding (window 6) and full layers alternating (3 + 2), MoE on every layer
(router bias, top-k then softmax, expert biases, clamped SwiGLU with swiglu_limit 1 so the clamps bite),
YaRN without truncation, attention bias; both config layouts (rope_parameters / layer_types, and the hub's
rope_theta / rope_scaling / num_experts without layer_types) and both model_type spellings; an MXFP4
expert checkpoint.

Per layout and page size (1, 16): three sequences of 5, 17 and 33 tokens prefilled in one batch, then four
batched decode steps; every logit row within 1e-4 of transformers. Greedy: 16 tokens of the three prompts
decoded together equal transformers' generate.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from gpu_marks import needs_flashinfer
from safetensors.torch import load_file, save_file
from test_parity_hf import (
    PagedSeqs,
    assert_close,
    assert_greedy_matches_generate,
    hf_logits,
    make_executor,
    paged_prefill_decode,
)
from tiny_models import WINDOW

from pie.drivers.protocol import make_batch
from pie.errors import ModelError
from pie.kernels.moe import moe_reference, swiglu_oai
from pie.models.config import ModelConfig, read_model_config
from pie.models.hub import inspect_dir
from pie.models.weights import FP4_VALUES, dequantize_mxfp4

LENGTHS = (5, 17, 33)  # 17 and 33 cross page boundaries at page size 16 and exceed the window


def _prompts(vocab: int, seed: int = 7) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in LENGTHS]


def _copy(src, dst, config_edit=None):
    shutil.copytree(src, dst)
    if config_edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config_edit(cfg)))
    return dst


@pytest.fixture(scope="module")
def gptoss_spelling(tiny_checkpoint, tmp_path_factory):
    """The same checkpoint with model_type "gptoss" (transformers knows only gpt_oss: the reference stays)."""
    return _copy(
        tiny_checkpoint("gpt_oss"),
        tmp_path_factory.mktemp("gptoss") / "m",
        lambda c: {**c, "model_type": "gptoss"},
    )


def _prefill_decode(path, page_size: int):
    ex = make_executor(path, page_size, num_pages=200 if page_size == 1 else 16)
    got, tokens = paged_prefill_decode(ex, _prompts(ex.model_config.vocab_size), page_size)
    return ex, got, tokens


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("arch", ["gpt_oss", "gpt_oss_legacy"])
def test_prefill_and_paged_decode_match_hf(tiny_checkpoint, arch, page_size):
    path = tiny_checkpoint(arch)
    ex, got, tokens = _prefill_decode(path, page_size)
    cfg = ex.model_config
    assert [layer.attention for layer in cfg.layers] == ["sliding", "full", "sliding", "full", "sliding"]
    assert all(layer.has_sinks and layer.mlp == "sparse" for layer in cfg.layers)
    assert cfg.rope.rope_type == "yarn" and not cfg.rope.truncate and cfg.rope.theta == 150000.0
    for i in range(3):
        assert_close(got[i], hf_logits(path, tokens[i]))


def test_gptoss_spelling_matches_hf(tiny_checkpoint, gptoss_spelling):
    ex, got, tokens = _prefill_decode(gptoss_spelling, 16)
    assert ex.model_config.model_type == "gptoss"
    for i in range(3):
        assert_close(got[i], hf_logits(tiny_checkpoint("gpt_oss"), tokens[i]))


def test_batched_greedy_generation_matches_hf_generate(tiny_checkpoint):
    path = tiny_checkpoint("gpt_oss")
    page_size = 3  # odd size: decode steps cross page boundaries often
    ex = make_executor(path, page_size)
    assert_greedy_matches_generate(ex, path, _prompts(ex.model_config.vocab_size, seed=3), page_size)


@pytest.mark.parametrize(
    "what,edit",
    [
        ("window", lambda c, t: (c | {"sliding_window": 4096}, t)),
        ("swiglu clamp", lambda c, t: (c | {"swiglu_limit": 1000.0}, t)),
        ("sinks", lambda c, t: (c, {k: (torch.full_like(v, -1e4) if k.endswith("sinks") else v) for k, v in t.items()})),
        ("router bias", lambda c, t: (c, {k: (v * 0 if k.endswith("router.bias") else v) for k, v in t.items()})),
        ("yarn truncate", lambda c, t: (c | {"rope_parameters": c["rope_parameters"] | {"truncate": True}}, t)),
    ],
)  # fmt: skip
def test_quirks_bite(tiny_checkpoint, tmp_path, what, edit):
    """Each quirk changes transformers' logits on the test checkpoint, so the parity above covers it."""
    path = tiny_checkpoint("gpt_oss")
    cfg = json.loads((path / "config.json").read_text())
    new_cfg, tensors = edit(cfg, load_file(str(path / "model.safetensors")))
    other = _copy(path, tmp_path / "m", lambda _: new_cfg)
    save_file(tensors, str(other / "model.safetensors"))
    ids = _prompts(400)[2]
    a, b = hf_logits(path, ids), hf_logits(other, ids)
    assert np.abs(a - b).max() > 1e-2, what
    if what == "window":  # only rows past the window differ
        assert np.abs(a[:WINDOW] - b[:WINDOW]).max() < 1e-5


# ---- MXFP4 ---------------------------------------------------------------------------------------------------


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An HF-layout expert tensor [E, K, R] (used as x @ W) -> MXFP4 (blocks [E, R, K/32, 16] uint8, scales
    [E, R, K/32] uint8), as the hub's gpt-oss checkpoints store it: per row r of W.T, groups of 32 values
    share a power-of-two scale (exponent + 127); values round to the nearest E2M1 number, two per byte with
    the even element in the low nibble."""
    m = w.transpose(1, 2).float()  # [E, R, K]
    E, R, K = m.shape
    g = m.reshape(E, R, K // 32, 32)
    exp = torch.floor(torch.log2(g.abs().amax(-1).clamp(min=1e-12))) - 2  # amax / 2^exp in [4, 8)
    q = g / torch.exp2(exp)[..., None]
    lut = torch.tensor(FP4_VALUES)
    idx = (q[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # [E, R, G, 32]
    blocks = idx[..., 0::2] | (idx[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


def test_dequantize_mxfp4_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 134, (3, 5, 2), dtype=torch.uint8, generator=g)
    ours = dequantize_mxfp4(blocks, scales)
    assert ours.shape == (3, 64, 5)
    assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    with pytest.raises(ValueError, match="uint8"):
        dequantize_mxfp4(blocks.float(), scales)


def test_mxfp4_checkpoint_is_dequantized_at_load(tiny_checkpoint, tmp_path):
    """The tiny model's experts quantized into MXFP4 `*_blocks` / `*_scales` (with the hub's
    quantization_config): pie loading that equals transformers running the dequantized experts."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src = tiny_checkpoint("gpt_oss")
    tensors = load_file(str(src / "model.safetensors"))
    quant, deq = {}, {}
    for k, t in tensors.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(t)
            quant[k + "_blocks"], quant[k + "_scales"] = blocks, scales
            deq[k] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            assert deq[k].shape == t.shape and float((deq[k] - t).abs().max()) < 0.25 * float(t.abs().max())
        else:
            quant[k] = deq[k] = t
    ref = _copy(src, tmp_path / "deq")
    save_file(deq, str(ref / "model.safetensors"))
    quant_cfg = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
    mx = _copy(src, tmp_path / "mxfp4", lambda c: c | {"quantization_config": quant_cfg})
    save_file(quant, str(mx / "model.safetensors"))
    ex = make_executor(mx, 4)
    seqs = PagedSeqs(ex.num_pages, 4)
    ids = _prompts(ex.model_config.vocab_size)[2]
    got = ex.execute(make_batch([seqs.request(0, ids)], 4)).logits
    assert_close(got, hf_logits(ref, ids))
    # a scale tensor that is not beside its blocks is named
    del quant["model.layers.0.mlp.experts.down_proj_scales"]
    save_file(quant, str(mx / "model.safetensors"))
    with pytest.raises(ModelError, match="down_proj_scales is not in the same file"):
        make_executor(mx, 4)


# ---- normalization, the expert math, the roster ----------------------------------------------------------


def _hub_config(**kw) -> dict:
    """gpt-oss-20b's config.json (the hub's layout: rope_scaling + rope_theta, experts_per_token)."""
    from pie.bench import load_model_config

    return {**load_model_config("gpt-oss-20b")[0], **kw}


def test_hub_config_normalizes():
    cfg = ModelConfig.from_hf(_hub_config())
    assert cfg.num_layers == 24 and [layer.attention for layer in cfg.layers[:4]] == ["sliding", "full"] * 2
    assert {layer.sliding_window for layer in cfg.layers if layer.attention == "sliding"} == {128}
    assert cfg.has_qkv_bias and cfg.has_o_bias and cfg.rms_norm_eps == 1e-5
    r = cfg.rope
    assert (r.rope_type, r.factor, r.theta, r.truncate, r.original_max_position_embeddings) == (
        "yarn", 32.0, 150000.0, False, 4096,
    )  # fmt: skip
    m = cfg.moe
    assert (m.num_experts, m.top_k, m.expert_intermediate_size, m.router, m.bias) == (
        32,
        4,
        2880,
        "topk_softmax",
        True,
    )
    assert (m.activation, m.swiglu_limit, m.swiglu_alpha) == ("swiglu_oai", 7.0, 1.702)
    # no rope keys: transformers' GptOssConfig default (the same YaRN, theta 150000)
    bare = {k: v for k, v in _hub_config().items() if k not in ("rope_scaling", "rope_theta")}
    assert ModelConfig.from_hf(bare).rope == r
    assert ModelConfig.from_hf(_hub_config(model_type="gptoss")).layers == cfg.layers
    with pytest.raises(ModelError, match="quantization_config 'bitsandbytes' is not supported"):
        ModelConfig.from_hf(_hub_config(quantization_config={"quant_method": "bitsandbytes"}))


def test_real_shape_builds_with_transformers_param_count():
    """gpt-oss-20b on the meta device: pie's parameter count equals transformers' for the same config."""
    import transformers as tf

    from pie.models.registry import get_model_class

    d = _hub_config()
    mc = ModelConfig.from_hf(d)
    with torch.device("meta"):
        ours = get_model_class("gpt_oss")(mc)
        hf_cfg = tf.GptOssConfig(
            **{k: v for k, v in d.items() if k not in ("quantization_config", "model_type")}
        )
        theirs = tf.AutoModelForCausalLM.from_config(hf_cfg)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs and n_ours > 20e9
    from pie.bench import floors

    assert floors.param_counts(d).total == n_ours  # the bench floors count the same parameters


def test_swiglu_oai_matches_transformers_experts():
    """moe_reference with GPT-OSS's activation and biases, on weights converted by the family's checkpoint
    transforms, equals transformers' GptOssExperts on the original layout."""
    import transformers as tf
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from pie.models.gpt_oss import GptOssForCausalLM

    cfg = tf.GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=4, swiglu_limit=0.5)
    hf = GptOssExperts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(7, 32, generator=g)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(7)])
    weights = torch.softmax(torch.randn(7, 2, generator=g), -1)
    with torch.no_grad():
        ref = hf(x, ids, weights)
    t = GptOssForCausalLM.checkpoint_transforms
    ours = moe_reference(
        x,
        t[".mlp.experts.gate_up_proj"](hf.gate_up_proj.data),
        t[".mlp.experts.down_proj"](hf.down_proj.data),
        weights,
        ids,
        t[".mlp.experts.gate_up_proj_bias"](hf.gate_up_proj_bias.data),
        hf.down_proj_bias.data,
        act=swiglu_oai(0.5, 1.702),
    )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the clamp matters at this limit
    loose = moe_reference(
        x,
        t[".mlp.experts.gate_up_proj"](hf.gate_up_proj.data),
        t[".mlp.experts.down_proj"](hf.down_proj.data),
        weights,
        ids,
        t[".mlp.experts.gate_up_proj_bias"](hf.gate_up_proj_bias.data),
        hf.down_proj_bias.data,
        act=swiglu_oai(None, 1.702),
    )
    assert float((loose - ref).abs().max()) > 0.1


def test_config_and_model_list(tiny_checkpoint, gptoss_spelling):
    for path in (tiny_checkpoint("gpt_oss"), gptoss_spelling):
        cfg = read_model_config(path)
        row = inspect_dir(cfg.model_type, "local", path)  # `pie model list` marks it supported
        assert row.supported and row.drivers, row.reasons
    assert math.isclose(read_model_config(tiny_checkpoint("gpt_oss")).moe.swiglu_limit, 1.0)


# ---- GPU: FlashInfer's attention-sink wrapper --------------------------------------------------------------


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("window_left", [-1, 5])
def test_flashinfer_sink_wrapper_matches_torch_backend(window_left):
    """FlashInfer 0.6.3's BatchAttentionWithAttentionSinkWrapper (bf16) against pie's torch backend (fp32
    math) on the same paged cache: a prefill of 3 requests (5, 17, 33 new tokens, pages of 16) and a decode
    step; cosine >= 0.999 per head row and max abs error <= 2e-2. GPT-OSS's head shape (64 heads, 8 KV, dim
    64); sinks of +-3 so they take real probability mass."""
    from pie.attention.base import AttentionMetadata, AttentionParams
    from pie.attention.flashinfer_backend import FlashInferBackend
    from pie.attention.torch_backend import TorchBackend

    dev, ps, hq, hkv, d = torch.device("cuda:0"), 16, 64, 8, 64
    p = AttentionParams(hq, hkv, d, d**-0.5, window_left=window_left, has_sinks=True)
    fi = FlashInferBackend(hq, hkv, d, ps, torch.bfloat16, dev, d**-0.5, [p])
    assert p in fi._sink_wrappers, "the sink wrapper did not build (JIT); the layers would fall back to torch"
    ref = TorchBackend(hq, hkv, d, ps, torch.float32, dev, d**-0.5, [p])
    g = torch.Generator(device="cpu").manual_seed(0)
    kv = torch.randn(12, 2, ps, hkv, d, generator=g).to(dev, torch.bfloat16)
    sinks = (3 * torch.randn(hq, generator=g)).to(dev, torch.bfloat16)
    pages = [[0], [1, 2], [3, 4, 5]]
    for lens, n in (((5, 17, 33), None), ((6, 18, 34), 1)):  # prefill, then one decode token each
        reqs = [
            dict(
                token_ids=[0] * (n or L),
                positions=list(range(L - (n or L), L)),
                pages=pg,
                last_page_len=L - (len(pg) - 1) * ps,
            )  # fmt: skip
            for L, pg in zip(lens, pages, strict=True)
        ]
        meta = AttentionMetadata.from_batch(make_batch(reqs, ps), ps, dev)
        q = torch.randn(int(meta.qo_indptr_host[-1]), hq, d, generator=g).to(dev, torch.bfloat16)
        fi.plan(meta)
        ref.plan(meta)
        ours = fi.run(q, kv, 0, p, sinks).float()
        want = ref.run(q.float(), kv.float(), 0, p, sinks.float())
        cos = torch.nn.functional.cosine_similarity(ours, want, dim=-1)
        assert float(cos.min()) >= 0.999 and float((ours - want).abs().max()) <= 2e-2
