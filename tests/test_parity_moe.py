"""MoE and fused-weight families (mixtral, qwen3_moe, phi3) against transformers on tiny random checkpoints
(fp32, CPU, torch attention backend), plus their config layouts, checkpoint layouts and MoE routing pieces.

Quirks switched on (tests/tiny_models.py): mixtral 6 experts top-2; qwen3_moe 8 experts top-3 with
decoder_sparse_step 2 and mlp_only_layers, norm_topk_prob False and True; phi3 partial rotary 0.75, and
phi3_longrope partial rotary 0.5 with LongRoPE factors switching at original_max_position_embeddings = 24,
crossed by prompts and by decode steps. Tolerance as test_parity_hf: max abs logit diff <= 1e-4.

Reference for decode steps: transformers' cached forward (prompt, then one token at a time with its KV
cache), which is what pie computes; for all but phi3_longrope it equals the uncached forward. For LongRoPE
across the switch, transformers' `generate` additionally re-encodes the whole sequence with the long factors
(Phi3ForCausalLM.prepare_inputs_for_generation); pie keeps cached keys (see models/phi3.py), so the greedy
test keeps phi3_longrope sequences on one side of the switch, and the crossing is checked against the
cached forward.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from test_parity_hf import PagedSeqs, assert_close, hf_model, make_executor
from tiny_models import MOE_ARCHS, PHI3_ORIGINAL_MAX

from pie.drivers.protocol import make_batch
from pie.errors import ModelError
from pie.models.config import ModelConfig, read_model_config

# transformers renamed the cache argument and output field (`past_key_values` until ~5.2x, `cache` after)
_CACHE_ARG = (
    "cache" if "cache" in __import__("inspect").signature(transformers.LlamaForCausalLM.forward).parameters
    else "past_key_values"
)  # fmt: skip


def _cache_of(out):
    """The KV cache of a transformers output: `past_key_values` (older 5.x, as on the GPU machine's 5.17) or
    `cache` (newer)."""
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else out.cache


def hf_cached_logits(path, prompt: list[int], steps: list[int]) -> np.ndarray:
    """transformers: forward over `prompt` with a cache, then each of `steps` one token at a time.
    Returns [len(prompt) + len(steps), V] logits (the rows pie outputs for the same calls)."""
    model = hf_model(path)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        rows, cache = [out.logits[0]], _cache_of(out)
        for t in steps:
            out = model(torch.tensor([[t]]), **{_CACHE_ARG: cache}, use_cache=True)
            rows.append(out.logits[0])
            cache = _cache_of(out)
    return torch.cat(rows).numpy()


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_prefill_then_decode_matches_hf(tiny_checkpoint, arch, page_size):
    path = tiny_checkpoint(arch)
    ex = make_executor(path, page_size)
    seqs = PagedSeqs(ex.num_pages, page_size, seed=page_size)
    rng = np.random.default_rng(7)
    # phi3_longrope: 5 stays short; 17 crosses the switch (24) on its 8th decode step; 30 is long throughout
    prompts = [rng.integers(0, ex.model_config.vocab_size, n).tolist() for n in (5, 17, 30)]
    batch = make_batch([seqs.request(i, p) for i, p in enumerate(prompts)], page_size)
    res = ex.execute(batch)
    got = [[rows] for rows in np.split(res.logits, batch.qo_indptr[1:-1])]
    steps: list[list[int]] = [[], [], []]
    nxt = [int(t[-1]) for t in np.split(res.tokens, batch.qo_indptr[1:-1])]
    for _ in range(8):  # all three sequences decode in one batch
        batch = make_batch([seqs.request(i, [t]) for i, t in enumerate(nxt)], page_size)
        res = ex.execute(batch)
        for i, t in enumerate(nxt):
            steps[i].append(t)
            got[i].append(res.logits[i : i + 1])
        nxt = [int(t) for t in res.tokens]
    assert 17 + 7 == PHI3_ORIGINAL_MAX  # the last decode of sequence 1 is at position 24: the first long one
    for i in range(3):
        ours = np.concatenate(got[i])
        ref = hf_cached_logits(path, prompts[i], steps[i])
        assert_close(ours, ref)
        assert np.array_equal(ours.argmax(-1)[len(prompts[i]) - 1 :], ref.argmax(-1)[len(prompts[i]) - 1 :])


_GENERATED: dict[tuple, list[int]] = {}


def hf_generate(path, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy `generate` continuation of `prompt` (cached: both page sizes compare to it)."""
    key = (str(path), tuple(prompt), new_tokens)
    if key not in _GENERATED:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf_model(path).generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
            )
        _GENERATED[key] = out[0, len(prompt) :].tolist()
    return _GENERATED[key]


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_greedy_generation_matches_hf_generate(tiny_checkpoint, arch, page_size):
    """3 sequences of different lengths in one batch, 16 greedy tokens each, crossing page boundaries."""
    path = tiny_checkpoint(arch)
    new_tokens = 16
    ex = make_executor(path, page_size)
    seqs = PagedSeqs(ex.num_pages, page_size, seed=2)
    eos = set(ex.model_config.eos_token_ids)
    rng = np.random.default_rng(3)
    # phi3_longrope: 3 + 16 and 4 + 16 stay below the switch (24), 26 starts above it
    prompts = [rng.integers(0, ex.model_config.vocab_size, n).tolist() for n in (3, 4, 26)]
    batch = make_batch([seqs.request(i, p, temperature=0.0) for i, p in enumerate(prompts)], page_size)
    res = ex.execute(batch)
    generated = [[int(t[-1])] for t in np.split(res.tokens, batch.qo_indptr[1:-1])]
    live = [i for i in range(3) if generated[i][-1] not in eos]
    while live:
        batch = make_batch([seqs.request(i, generated[i][-1:], temperature=0.0) for i in live], page_size)
        res = ex.execute(batch)
        for i, t in zip(live, res.tokens, strict=True):
            generated[i].append(int(t))
        live = [i for i in live if len(generated[i]) < new_tokens and generated[i][-1] not in eos]
    for p, gen in zip(prompts, generated, strict=True):
        assert gen == hf_generate(path, p, new_tokens)


# ---- config layouts ---------------------------------------------------------------------------------------


def legacy_layout(cfg: dict) -> dict:
    """The older config.json spellings hub checkpoints carry: rope_theta / rope_scaling (with `type`) instead
    of rope_parameters; qwen3_moe's `num_experts` instead of `num_local_experts`; phi3's top-level
    partial_rotary_factor."""
    out = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    rope = dict(cfg["rope_parameters"])
    out["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        out["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    if cfg["model_type"] == "phi3":
        rope.pop("original_max_position_embeddings", None)  # phi3 keeps it at the top level
    rope_type = rope.pop("rope_type")
    out["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    if cfg["model_type"] == "qwen3_moe":
        out["num_experts"] = out.pop("num_local_experts")
    return out


def copy_with_config(src, dst, cfg: dict):
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_legacy_config_layout_normalizes_the_same(tiny_checkpoint, arch):
    cfg = json.loads((tiny_checkpoint(arch) / "config.json").read_text())
    legacy = legacy_layout(cfg)
    assert legacy != cfg
    assert ModelConfig.from_hf(legacy) == ModelConfig.from_hf(cfg)  # raw (the input dict) is not compared


@pytest.mark.parametrize("arch", ["qwen3_moe", "phi3_longrope"])
def test_legacy_layout_checkpoint_matches_hf(tiny_checkpoint, tmp_path, arch):
    """transformers reads the old spellings too, and both agree with pie (a prefill past the LongRoPE switch)."""
    src = tiny_checkpoint(arch)
    path = copy_with_config(
        src, tmp_path / "legacy", legacy_layout(json.loads((src / "config.json").read_text()))
    )
    ex = make_executor(path, 4)
    seqs = PagedSeqs(ex.num_pages, 4)
    ids = np.random.default_rng(1).integers(0, ex.model_config.vocab_size, 29).tolist()
    got = ex.execute(make_batch([seqs.request(0, ids)], 4)).logits
    assert_close(got, hf_cached_logits(path, ids, []))


# ---- checkpoint layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_fused_expert_checkpoint_loads_like_per_expert(tiny_checkpoint, tmp_path, arch):
    """save_pretrained writes experts one by one (experts.{e}.w1 / gate_proj ...); transformers 5's in-memory
    state dict stacks them (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]). Both load."""
    from safetensors.torch import save_file

    src = tiny_checkpoint(arch)
    fused = tmp_path / "fused"
    shutil.copytree(src, fused)
    state = {k: v.contiguous() for k, v in hf_model(src).state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    (fused / "model.safetensors").unlink()
    save_file(state, str(fused / "model.safetensors"))
    ids = np.random.default_rng(0).integers(0, 300, 19).tolist()
    outs = []
    for path in (src, fused):
        ex = make_executor(path, 16)
        outs.append(ex.execute(make_batch([PagedSeqs(ex.num_pages, 16).request(0, ids)], 16)).logits)
    assert np.array_equal(outs[0], outs[1])


def test_missing_expert_tensor_is_named(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint("mixtral")
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.4.w3.weight"]
    save_file(state, str(dst / "model.safetensors"))
    with pytest.raises(
        ModelError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj: 1 expert slices, e\.g\. expert 4 up"
    ):
        make_executor(dst, 16)


def test_checkpoint_with_more_experts_than_the_config_is_rejected(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3_moe")
    cfg = json.loads((src / "config.json").read_text())
    path = copy_with_config(src, tmp_path / "fewer", {**cfg, "num_local_experts": 7})  # checkpoint has 8
    with pytest.raises(
        ModelError, match=r"experts\.7\.\w+_proj\.weight does not fit .*expert 7 is out of range"
    ):
        make_executor(path, 16)


# ---- normalization details --------------------------------------------------------------------------------


def test_qwen3_moe_sparse_layers_follow_step_and_mlp_only_layers(tiny_checkpoint):
    for arch, sparse in (("qwen3_moe", (3,)), ("qwen3_moe_norm", (1, 2, 3))):
        path = tiny_checkpoint(arch)
        cfg = read_model_config(path)
        assert cfg.sparse_layers == sparse and cfg.moe.renormalize == (arch == "qwen3_moe_norm")
        assert [layer.mlp for layer in cfg.layers] == ["sparse" if i in sparse else "dense" for i in range(4)]
        assert cfg.has_qk_norm and cfg.moe.weights_in_activation_dtype
        hf_sparse = tuple(
            i for i, layer in enumerate(hf_model(path).model.layers) if hasattr(layer.mlp, "experts")
        )
        assert hf_sparse == sparse


def test_mixtral_and_qwen3_moe_config_errors():
    base = dict(model_type="mixtral", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, num_local_experts=4)  # fmt: skip
    with pytest.raises(ModelError, match="num_experts_per_tok"):
        ModelConfig.from_hf(base)
    with pytest.raises(ModelError, match=r"must be in 1..4 \(the number of experts\)"):
        ModelConfig.from_hf({**base, "num_experts_per_tok": 5})
    qwen = {**base, "model_type": "qwen3_moe", "num_experts_per_tok": 2, "moe_intermediate_size": 4}
    with pytest.raises(ModelError, match="shared expert"):
        ModelConfig.from_hf({**qwen, "shared_expert_intermediate_size": 8})
    assert ModelConfig.from_hf({**qwen, "mlp_only_layers": [0]}).moe is None  # no sparse layer left


def test_phi3_longrope_fields_and_window():
    d = dict(model_type="phi3", vocab_size=10, hidden_size=64, intermediate_size=16, num_hidden_layers=1,
             num_attention_heads=2, max_position_embeddings=131072, original_max_position_embeddings=4096,
             rope_theta=10000.0, sliding_window=262144,
             rope_scaling={"type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16})  # fmt: skip
    cfg = ModelConfig.from_hf(d)
    assert ModelConfig.from_hf({**d, "rope_scaling": {**d["rope_scaling"], "type": "su"}}) == cfg  # old name
    r = cfg.rope
    assert r.rope_type == "longrope" and all(layer.rope == r for layer in cfg.layers)
    assert (r.rotary_dim(cfg.head_dim), r.original_max_position_embeddings) == (32, 4096)
    assert r.attention_factor == pytest.approx((1 + np.log(32) / np.log(4096)) ** 0.5)  # Phi-3.5: 1.1902
    # a window longer than the context is full attention
    assert cfg.max_position_embeddings == 131072 and cfg.attention_kinds == ("full",)
    # Phi-3-mini-4k: window 2047 < context 4096 -> every layer slides (as transformers' Phi3)
    mini = ModelConfig.from_hf(
        {**d, "max_position_embeddings": 4096, "sliding_window": 2047, "rope_scaling": None}
    )
    assert mini.max_position_embeddings == 4096 and mini.rope.rope_type == "default"
    assert [(layer.attention, layer.sliding_window) for layer in mini.layers] == [("sliding", 2047)]
    with pytest.raises(ModelError, match="short_factor"):
        ModelConfig.from_hf(
            {**d, "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": []}}
        )
    with pytest.raises(ModelError, match="not supported"):
        ModelConfig.from_hf({**d, "rope_scaling": {"type": "dynamic", "factor": 2.0}})


def test_phi3_rope_index_is_per_request():
    """Long rows for every token of a request whose largest position in the batch is >= the switch."""
    from pie.attention.base import AttentionMetadata
    from pie.layers.longrope import longrope_rows

    # requests: 3 tokens at 2..4 (short), 2 tokens at 9..10 (long: 10 >= 10), 1 token at 9 (short)
    reqs = [dict(token_ids=[0] * n, positions=list(range(p0, p0 + n)), pages=[0, 1, 2], last_page_len=1)
            for n, p0 in ((3, 2), (2, 9), (1, 9))]  # fmt: skip
    batch = make_batch(reqs, 4)
    meta = AttentionMetadata.from_batch(batch, 4, torch.device("cpu"))
    positions = torch.tensor([2, 3, 4, 9, 10, 9])
    assert longrope_rows(positions, meta, switch=10, long_offset=100).tolist() == [2, 3, 4, 109, 110, 9]


def test_model_list_marks_the_families_supported(tiny_checkpoint):
    from pie.models.hub import inspect_dir

    for arch in ("mixtral", "qwen3_moe", "phi3"):
        info = inspect_dir(arch, "local", tiny_checkpoint(arch))
        assert info.supported and info.drivers, info.reasons


def test_hf_generate_reencodes_at_the_longrope_switch(tiny_checkpoint):
    """Documents the one place pie departs from transformers' generate: at the crossing, generate re-encodes
    the prompt with the long factors, so its logits there equal an uncached forward, not the cached one."""
    path = tiny_checkpoint("phi3_longrope")
    ids = np.random.default_rng(5).integers(0, 300, PHI3_ORIGINAL_MAX + 1).tolist()  # last at 24: long
    cached = hf_cached_logits(path, ids[:-1], ids[-1:])[-1]
    with torch.no_grad():
        uncached = hf_model(path)(torch.tensor([ids])).logits[0, -1].numpy()
    assert float(np.abs(cached - uncached).max()) > 1e-3  # the two semantics really differ here
