"""Gemma 4 (gemma4_text and the gemma4 wrapper) against transformers on tiny random checkpoints with every
quirk on (tests/gemma4_tiny.py: KV sharing, per-layer embeddings, heterogeneous head dims and KV heads,
attention_k_eq_v, double-wide MLP, MoE block, proportional partial rope, windows of 6 that bite, final
soft-cap), fp32 on the CPU with the torch attention backend.

Per arch and page size (1, 16): three sequences of 5, 17 and 33 tokens prefilled in one batch, then four
batched decode steps; every logit row within 1e-4 of transformers. Greedy: 16 tokens of the three prompts
decoded together equal transformers' generate. Shared-KV layers get no KV memory (bytes counted).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gemma4_tiny import GEMMA4_ARCHS, LAYERS, NUM_SHARED, make_gemma4_checkpoint
from safetensors.torch import load_file
from test_families_hf import assert_window_bites
from test_parity_hf import (
    PagedSeqs,
    assert_close,
    assert_greedy_matches_generate,
    hf_logits,
    make_executor,
    paged_prefill_decode,
    split_rows,
)
from test_run_cli import assert_dev_driver_matches_in_process
from tiny_models import WINDOW

from pie.drivers.kv_plan import page_bytes
from pie.drivers.protocol import make_batch
from pie.errors import ModelError
from pie.layers.rotary import rope_inv_freq
from pie.models.config import ModelConfig, read_model_config
from pie.models.hub import inspect_dir

LENGTHS = (5, 17, 33)  # 17 and 33 cross page boundaries at page size 16 and exceed the window


@pytest.fixture(scope="module")
def g4(tmp_path_factory):
    cache: dict = {}

    def make(arch: str):
        if arch not in cache:
            cache[arch] = make_gemma4_checkpoint(tmp_path_factory.mktemp(arch), arch)
        return cache[arch]

    return make


def _prompts(vocab: int, seed: int = 7) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in LENGTHS]


def test_config_normalization(g4):
    cfg = read_model_config(g4("gemma4_text"))
    kinds = ["full" if t == "full_attention" else "sliding" for t in LAYERS]
    assert [s.attention for s in cfg.layers] == kinds
    # full layers: global head dim 32, one KV head (k_eq_v); sliding: 16 and 2
    assert [(s.head_dim, s.num_kv_heads) for s in cfg.layers] == [
        (32, 1) if k == "full" else (16, 2) for k in kinds
    ]
    # the last 4 layers read the last non-shared layer of their kind: sliding 4, full 5
    assert [s.kv_source for s in cfg.layers] == [None] * 6 + [4, 5, 4, 5]
    assert cfg.layer_intermediate == (96,) * 6 + (192,) * 4  # double-wide on shared layers
    assert all(s.sm_scale == 1.0 and s.logit_softcap is None for s in cfg.layers)
    assert {s.sliding_window for s in cfg.layers if s.attention == "sliding"} == {WINDOW}
    full = cfg.layers[2].rope
    assert (full.rope_type, full.partial_rotary_factor, full.factor) == ("proportional", 0.25, 2.0)
    assert (cfg.ple_dim, cfg.num_experts, cfg.top_k_experts, cfg.attention_k_eq_v) == (8, 4, 2, True)
    assert cfg.final_logit_softcap == 5.0 and cfg.tie_word_embeddings
    # the wrapper's hub layout (global_head_dim, no per_layer_config, no k_eq_v: 2 KV heads on full layers)
    w = read_model_config(g4("gemma4"))
    assert w.model_type == "gemma4" and w.num_experts == 0 and not w.attention_k_eq_v
    assert [(s.head_dim, s.num_kv_heads) for s in w.layers] == [
        (32, 2) if k == "full" else (16, 2) for k in kinds
    ]


def test_proportional_rope_equals_transformers():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.Gemma4TextConfig(head_dim=16, global_head_dim=64, num_hidden_layers=6,
                                        rope_parameters={"full_attention": {"rope_type": "proportional",
                                                         "partial_rotary_factor": 0.25, "rope_theta": 1e6},
                                                         "sliding_attention": {"rope_type": "default",
                                                                               "rope_theta": 1e4}})  # fmt: skip
    ref, _ = ROPE_INIT_FUNCTIONS["proportional"](cfg, layer_type="full_attention")
    spec = read_model_config_dict(cfg.to_dict()).layers[5].rope
    ours, scale = rope_inv_freq(64, spec)
    assert scale == 1.0 and torch.equal(ours, ref) and int((ours != 0).sum()) == 8


def read_model_config_dict(d: dict) -> ModelConfig:
    return ModelConfig.from_hf(json.loads(json.dumps(d)))


@pytest.mark.parametrize(
    "change,msg",
    [
        ({"num_kv_shared_layers": 10}, "num_kv_shared_layers"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "nested by layer type"),
        ({"use_bidirectional_attention": "all"}, "encoder"),
        ({"per_layer_config": {"2": {"intermediate_size": 7}}}, "not supported"),
        ({"vocab_size_per_layer_input": 10}, "vocab_size_per_layer_input"),
    ],
)
def test_bad_configs_fail_clearly(g4, change, msg):
    d = json.loads((g4("gemma4_text") / "config.json").read_text())
    with pytest.raises(ModelError, match=msg):
        ModelConfig.from_hf({**d, **change})


@pytest.mark.parametrize("arch,page_size", [(a, ps) for a in GEMMA4_ARCHS for ps in (1, 16)])
def test_prefill_and_paged_decode_match_hf(g4, arch, page_size):
    path = g4(arch)
    ex = make_executor(path, page_size, num_pages=200 if page_size == 1 else 16)
    assert ex.model_config.attention_kinds == ("full", "sliding")
    got, tokens = paged_prefill_decode(ex, _prompts(ex.model_config.vocab_size), page_size)
    for i in range(3):
        assert_close(got[i], hf_logits(path, tokens[i]))


@pytest.mark.parametrize("arch", GEMMA4_ARCHS)
def test_batched_greedy_generation_matches_hf_generate(g4, arch):
    path = g4(arch)
    page_size = 3  # odd size: decode steps cross page boundaries often
    ex = make_executor(path, page_size)
    assert_greedy_matches_generate(ex, path, _prompts(ex.model_config.vocab_size, seed=3), page_size)


def test_shared_kv_layers_get_no_kv_memory(g4):
    path, ps, pages = g4("gemma4_text"), 4, 32
    ex = make_executor(path, ps, num_pages=pages)
    cfg = ex.model_config
    owners = [i for i, s in enumerate(cfg.layers) if s.kv_source is None]
    assert len(owners) == len(LAYERS) - NUM_SHARED
    # bytes: exactly the owning layers' K and V (fp32), nothing for the 4 shared ones
    want = sum(2 * ps * cfg.layers[i].num_kv_heads * cfg.layers[i].head_dim * 4 for i in owners) * pages
    assert ex.capabilities.extra["kv_cache_bytes"] == want
    assert page_bytes(cfg, ps, torch.float32) * pages == want
    every = sum(2 * ps * s.num_kv_heads * s.head_dim * 4 for s in cfg.layers) * pages
    assert want < every
    assert ex.page_mover.page_nbytes * pages == want  # page moves copy each owned cache once
    # a shared layer's cache is its source's (same memory), so the attention call reads the source
    for i, s in enumerate(cfg.layers):
        if s.kv_source is not None:
            assert ex.kv_caches[i] is ex.kv_caches[s.kv_source]
    # and writes none: a shared layer's module has no k/v projections
    shared = ex.model.model.layers[len(LAYERS) - 1].self_attn
    assert shared.k_proj is None and shared.v_proj is None


def test_window_bites(g4, tmp_path):
    """The same weights with the window widened change the logits past the window."""
    assert_window_bites(g4("gemma4_text"), _prompts(400)[2], tmp_path)


def test_wrapper_loads_text_tower(g4):
    path = g4("gemma4")
    keys = load_file(str(path / "model.safetensors")).keys()
    assert any("vision_tower" in k for k in keys) and any(k.startswith("model.language_model.") for k in keys)
    ex = make_executor(path, 4)
    names = {n for n, _ in ex.model.named_parameters()}
    assert "model.embed_tokens_per_layer.weight" in names
    assert not any("vision" in n or "embed_vision" in n for n in names)
    row = inspect_dir("gemma4", "local", path)  # `pie model list` marks the wrapper supported
    assert row.supported and row.model_type == "gemma4" and row.drivers
    row = inspect_dir("gemma4_text", "local", g4("gemma4_text"))
    assert row.supported and row.model_type == "gemma4_text"


def test_moe_grouped_path_equals_loop():
    """The grouped (CUDA) expert path equals the per-expert loop (run here on the CPU: torch._grouped_mm has
    a CPU kernel), including experts that receive no token."""
    from pie.layers.gemma4_moe import Gemma4Experts, Gemma4Router

    torch.manual_seed(0)
    router, experts = Gemma4Router(16, 6, 2, 1e-6), Gemma4Experts(16, 12, 6, "gelu_tanh")
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.3), experts.down_proj.normal_(0, 0.3)
        router.proj.weight.normal_(0, 0.5)
        router.per_expert_scale.uniform_(0.5, 1.5)
        x = torch.randn(9, 16)
        w, ids = router(x)
        ids[:, :] = ids % 4  # experts 4 and 5 get nothing
        a, b = experts.grouped(x, w, ids), experts.loop(x, w, ids)
    assert torch.allclose(a, b, atol=1e-6), float((a - b).abs().max())
    # top-k renormalized to 1 before the per-expert scale
    w2, ids2 = router(x)
    assert torch.allclose((w2 / router.per_expert_scale[ids2]).sum(-1), torch.ones(9))


def test_bundled_e2b_config_builds_transformers_parameter_count():
    """The bundled real-shape config (gemma-4-e2b: 35 layers, 20 KV-shared, PLE 256, global head dim 512)
    builds on the meta device with transformers' own parameter count (+1 per layer: pie loads layer_scalar,
    a buffer in transformers, as a parameter), and only the 15 producing layers hold KV."""
    import transformers

    from pie.bench import load_model_config
    from pie.models.registry import get_model_class

    d, _ = load_model_config("gemma-4-e2b")
    mc = ModelConfig.from_hf(d)
    hf_cfg = transformers.Gemma4TextConfig(
        **{k: v for k, v in d.items() if k not in ("model_type", "architectures")}
    )
    with torch.device("meta"):
        ours = sum(p.numel() for p in get_model_class(mc.model_type)(mc).parameters())
        ref = sum(p.numel() for p in transformers.Gemma4ForCausalLM(hf_cfg).parameters())
    assert ours == ref + mc.num_layers
    assert sum(s.kv_source is None for s in mc.layers) == 15
    # bf16 page of 16 tokens: 12 sliding layers (1 x 256) and 3 full (1 x 512), K and V
    assert page_bytes(mc, 16, torch.bfloat16) == 2 * 16 * 2 * (12 * 256 + 3 * 512)


def test_pie_run_in_process_and_dev_driver(g4, tmp_path, monkeypatch, capsys):
    """`pie run text-completion` on the gemma4 wrapper: the in-process driver and the dev driver (a
    subprocess) print the same greedy completion."""

    monkeypatch.setenv("PIE_HOME", str(tmp_path / "pie-home"))
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[[model]]\nname = "g4"\nhf_repo = "{g4("gemma4")}"\n[model.driver]\ntype = "dev"\ndevice = ["cpu"]\n'
        'activation_dtype = "float32"\n[model.driver.options]\nkv_page_size = 4\nmax_batch_tokens = 64\n'
    )
    prompt = ["--", "--prompt", "Hello there", "--max-tokens", "8", "--temperature", "0"]
    args = ["text-completion", *prompt]
    in_process = assert_dev_driver_matches_in_process(cfg, args, capsys, PIE_HOME=str(tmp_path / "pie-home"))
    assert in_process.endswith("\n")


def test_older_and_wrapper_layouts_of_the_hub_config():
    """No layer_types: every 6th layer full and the last layer forced full (Gemma4TextConfig's rule); no
    rope_parameters: θ 10k default on sliding layers, proportional 0.25 at θ 1M on full ones; the wrapper's
    eos ids at the top level reach the text config."""
    from pie.bench import load_model_config

    d, _ = load_model_config("gemma-4-e2b")
    d = {k: v for k, v in d.items() if k not in ("layer_types", "rope_parameters", "eos_token_id")}
    text = dict(d, num_hidden_layers=8, num_kv_shared_layers=2)
    mc = ModelConfig.from_hf({"model_type": "gemma4", "eos_token_id": [1, 106], "text_config": text})
    assert mc.model_type == "gemma4" and mc.eos_token_ids == (1, 106)
    assert [s.attention for s in mc.layers] == ["sliding"] * 5 + ["full", "sliding", "full"]
    assert [s.kv_source for s in mc.layers] == [None] * 6 + [4, 5]
    full, local = mc.layers[5].rope, mc.layers[0].rope
    assert (full.rope_type, full.theta, full.partial_rotary_factor) == ("proportional", 1e6, 0.25)
    assert (local.rope_type, local.theta) == ("default", 1e4)
    assert (mc.layers[5].head_dim, mc.layers[0].head_dim) == (512, 256)


def test_no_ple_no_sharing_variant_matches_hf(tmp_path):
    """The 26B/31B shape of the family: no per-layer embeddings, no KV sharing (every layer owns its cache),
    MoE and k_eq_v on; one batched prefill within 1e-4 of transformers."""
    path = make_gemma4_checkpoint(tmp_path / "g4", "gemma4_text", hidden_size_per_layer_input=0,
                                  num_kv_shared_layers=0)  # fmt: skip
    ex = make_executor(path, 4, num_pages=40)
    cfg = ex.model_config
    assert cfg.ple_dim == 0 and all(s.kv_source is None for s in cfg.layers)
    assert not hasattr(ex.model.model, "embed_tokens_per_layer")
    seqs = PagedSeqs(ex.num_pages, 4)
    prompts = _prompts(cfg.vocab_size, seed=5)
    batch = make_batch([seqs.request(i, p) for i, p in enumerate(prompts)], 4)
    for rows, p in zip(split_rows(ex.execute(batch), batch), prompts, strict=True):
        assert_close(rows, hf_logits(path, p))
