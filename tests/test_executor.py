"""ModelExecutor behaviour beyond HF parity: build options, errors, result fields; ModelConfig; kv_plan."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_parity_hf import ATOL, hf_logits, make_executor

from pie.drivers.executor import ModelExecutor
from pie.drivers.kv_plan import activation_reserve, plan_num_pages
from pie.drivers.protocol import PROTOCOL_VERSION, BatchError, make_batch
from pie.drivers.spec import ExecutorSpec
from pie.errors import DriverError, ModelError
from pie.models.config import ModelConfig
from pie.models.registry import get_model_class, supported_model_types

MiB, GiB = 1 << 20, 1 << 30


def _req(ids, start=0, pages=(0, 1, 2, 3), page_size=16, **kw):
    n = len(ids)
    end = start + n
    used = list(pages[: -(-end // page_size)])
    return dict(
        token_ids=list(ids),
        positions=list(range(start, end)),
        pages=used,
        last_page_len=end - (len(used) - 1) * page_size,
        **kw,
    )


# ---- executor -------------------------------------------------------------------------------


def test_capabilities(tiny_checkpoint):
    ex = make_executor(tiny_checkpoint("qwen3"), page_size=16, num_pages=12)
    cap = ex.capabilities
    assert cap.protocol_version == PROTOCOL_VERSION and cap.architecture == "qwen3"
    assert (cap.num_pages, cap.page_size, cap.vocab_size, cap.num_layers) == (12, 16, 400, 2)
    assert cap.device == "cpu" and cap.dtype == "float32"
    assert cap.extra["attention_backend"] == "torch" and cap.extra["eos_token_ids"] == [2]
    assert ex.kv_cache.shape == (2, 12, 2, 16, 2, 16)
    assert ex.kv_caches[1].data_ptr() == ex.kv_cache[1].data_ptr()  # per-layer views, no copies
    assert ex.weights_bytes == sum(p.numel() * 4 for p in ex.model.parameters())
    # defaults: "auto" picks the torch backend on CPU; the host plan is capped at 64 * 512 tokens / 16
    ex = ModelExecutor(ExecutorSpec(model_path=str(tiny_checkpoint("qwen3"))))
    assert ex.capabilities.extra["attention_backend"] == "torch" and ex.num_pages == 2048


def test_no_outputs_then_decode(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    ex = make_executor(path, page_size=16, num_pages=8)
    ids = [5, 9, 40, 7, 300, 12, 1]
    res = ex.execute(make_batch([_req(ids, pages=(3, 1))], 16))
    assert res.tokens.shape == (0,) and res.logits is None
    res = ex.execute(make_batch([_req([77], start=7, pages=(3, 1), outputs=[0], return_logits=True)], 16))
    np.testing.assert_allclose(res.logits, hf_logits(path, ids + [77])[-1:], atol=ATOL, rtol=0)


def test_result_fields(tiny_checkpoint):
    ex = make_executor(tiny_checkpoint("llama"), page_size=16, num_pages=8)
    batch = make_batch([_req([1, 2, 3], outputs=[1, 2], dist_k=[4, 0], return_logits=[False, True])], 16)
    batch.return_logprobs = True
    res = ex.execute(batch)
    assert res.tokens.dtype == np.int64 and res.tokens.shape == (2,)
    assert res.logits.shape == (1, 400) and res.logprobs.shape == (2,) and res.entropies.shape == (2,)
    assert res.dist_ids.shape == (2, 4) and (res.dist_ids[1] == -1).all()
    assert res.tokens[1] == res.logits[0].argmax()  # temperature 0 -> argmax


def test_batch_errors(tiny_checkpoint):
    ex = make_executor(tiny_checkpoint("llama"), page_size=16, num_pages=8)
    with pytest.raises(BatchError, match="max_position_embeddings"):
        ex.execute(make_batch([_req([1], start=600, pages=tuple(range(8)) * 5)], 16))
    with pytest.raises(BatchError, match="token id out of range"):
        ex.execute(make_batch([_req([1, 400])], 16))
    with pytest.raises(BatchError, match="attends to no KV slot"):
        mask = np.tril(np.ones((3, 3), dtype=bool))
        mask[2] = False
        ex.execute(make_batch([_req([1, 2, 3], mask=mask)], 16))
    ex.spec.max_batch_tokens = 4
    with pytest.raises(BatchError, match="max_batch_tokens"):
        ex.execute(make_batch([_req([1, 2, 3, 4, 5])], 16))


def test_sharded_checkpoint_and_progress(tiny_checkpoint, tmp_path, capfd):
    src = tiny_checkpoint("qwen2")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    capfd.readouterr()
    ex = ModelExecutor(ExecutorSpec(model_path=str(tmp_path), page_size=16, num_pages=4), progress=True)
    assert "loading weights" in capfd.readouterr().err
    res = ex.execute(
        make_batch([_req([4, 8, 15, 16, 23, 42], outputs=list(range(6)), return_logits=True)], 16)
    )
    np.testing.assert_allclose(res.logits, hf_logits(src, [4, 8, 15, 16, 23, 42]), atol=ATOL, rtol=0)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint("llama"), tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match=r"lacks tensors: .*model\.layers\.1\.mlp\.up_proj\.weight") as e:
        make_executor(tmp_path, page_size=16, num_pages=4)
    assert "model.norm.weight" in str(e.value) and "gate_proj" not in str(e.value)


def test_unsupported_model_type_lists_supported(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint("llama"), tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ModelError, match="'gpt2' is not supported; supported types: gemma2, gemma3, .*llama"):
        make_executor(tmp_path, page_size=16, num_pages=4)
    assert {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3_text",
        "olmo3",
        "mistral3",
        "mixtral",
        "qwen3_moe",
        "phi3",
    } <= set(supported_model_types())
    assert get_model_class("mistral") is get_model_class("llama")


def test_random_weights_seeded(tmp_path):
    cfg = {"model_type": "qwen3", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
           "max_position_embeddings": 64}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # no safetensors: random_weights needs none

    def logits(seed):
        spec = ExecutorSpec(model_path=str(tmp_path), num_pages=2, random_weights=True, seed=seed)
        ex = ModelExecutor(spec)
        assert torch.equal(ex.model.model.layers[0].self_attn.q_norm.weight, torch.ones(16))
        return ex.execute(make_batch([_req([1, 2, 3], outputs=[2], return_logits=True)], 16)).logits

    a, b, c = logits(0), logits(0), logits(1)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_dtype_and_device_options(tiny_checkpoint):
    path = str(tiny_checkpoint("llama"))
    with pytest.raises(DriverError, match="is not one of auto, bfloat16"):
        ModelExecutor(ExecutorSpec(model_path=path, weight_dtype="int5"))
    with pytest.raises(DriverError, match="kv_cache_dtype 'fp16' is not one of auto, fp8_e4m3"):
        ModelExecutor(ExecutorSpec(model_path=path, kv_cache_dtype="fp16", num_pages=4))
    with pytest.raises(DriverError, match="mixed precision"):
        ModelExecutor(ExecutorSpec(model_path=path, weight_dtype="bfloat16"))
    if not torch.cuda.is_available():
        with pytest.raises(DriverError, match="CUDA is not available"):
            ModelExecutor(ExecutorSpec(model_path=path, device="cuda:0"))
    ex = ModelExecutor(ExecutorSpec(model_path=path, activation_dtype="bfloat16", num_pages=4))
    assert ex.kv_cache.dtype == torch.bfloat16 and ex.capabilities.dtype == "bfloat16"
    got = ex.execute(make_batch([_req([3, 1, 4, 1, 5], outputs=[4], return_logits=True)], 16)).logits
    assert float(np.abs(got - hf_logits(path, [3, 1, 4, 1, 5])[-1:]).max()) < 0.15  # bf16 rounding only


# ---- ModelConfig ----------------------------------------------------------------------------

BASE = {"model_type": "llama", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 8, "max_position_embeddings": 512}  # fmt: skip


def test_config_defaults_and_old_style_rope():
    c = ModelConfig.from_hf({**BASE, "rope_theta": 5e5, "eos_token_id": [1, 2],
                             "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})  # fmt: skip
    assert (c.num_kv_heads, c.head_dim, c.rope.theta, c.eos_token_ids) == (8, 8, 5e5, (1, 2))
    assert c.rope.rope_type == "llama3" and c.rope.factor == 8.0
    assert not c.has_qkv_bias and not c.tie_word_embeddings
    assert len(c.layers) == 2 and all(
        layer.rope == c.rope and layer.attention == "full" for layer in c.layers
    )
    q2 = ModelConfig.from_hf(
        {**BASE, "model_type": "qwen2", "sliding_window": 64, "use_sliding_window": False}
    )
    assert q2.has_qkv_bias and not q2.has_o_bias and not q2.has_qk_norm
    assert ModelConfig.from_hf({**BASE, "model_type": "qwen3"}).has_qk_norm


@pytest.mark.parametrize(
    "extra,msg",
    [
        (
            {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}},
            "rope type 'dynamic' is not supported",
        ),
        ({"rope_scaling": {"type": "longrope"}}, "rope type 'longrope' is not supported"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
        ({"model_type": "gemma2", "layer_types": ["chunked_attention"] * 2}, "'chunked_attention'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "not a multiple"),
    ],
)
def test_config_rejects(extra, msg):
    with pytest.raises(ModelError, match=msg):
        ModelConfig.from_hf({**BASE, **extra})


def test_mistral_window_applies_to_every_layer_unless_it_covers_the_context():
    c = ModelConfig.from_hf({**BASE, "model_type": "mistral", "sliding_window": 256})
    assert [(x.attention, x.sliding_window) for x in c.layers] == [("sliding", 256)] * 2
    c = ModelConfig.from_hf({**BASE, "model_type": "mistral", "sliding_window": 4096})
    assert c.attention_kinds == ("full",)


# ---- kv_plan --------------------------------------------------------------------------------


def test_page_bytes_sums_over_layers_of_different_kv_shapes():
    from dataclasses import replace

    from pie.drivers.kv_plan import kv_layer_groups, page_bytes

    layers = list(CFG.layers)
    layers[1] = replace(layers[1], num_kv_heads=2, head_dim=16)
    cfg = replace(CFG, layers=tuple(layers))
    assert page_bytes(cfg, 16, torch.float16) == 2 * 16 * (8 * 8 + 2 * 16) * 2
    assert kv_layer_groups(cfg) == [((8, 8), [0]), ((2, 16), [1])]


CFG = ModelConfig.from_hf({**BASE, "vocab_size": 400})


def _spec(**kw):
    base = dict(
        model_path="m", device="cuda:0", gpu_mem_utilization=0.5, max_batch_tokens=1000, max_batch_size=10
    )
    return ExecutorSpec(**{**base, **kw})


def test_plan_cuda_native():
    spec = _spec(kv_policy="cuda_native")
    # 1000 * (6*64 + 3*128) * 2 + 10 * 400 * 16 + 256 MiB
    assert activation_reserve(spec, CFG, act_bytes=2) == 1_536_000 + 64_000 + 268_435_456
    # (0.5 * 8 GiB - 1e9 - 270_035_456) // 1 MiB = 3_024_931_840 // 1_048_576
    assert plan_num_pages(spec, MiB, 10**9, 8 * GiB, 0, model_config=CFG) == 2884
    assert plan_num_pages(_spec(kv_policy="cuda_native", max_num_kv_pages=100), MiB, 10**9, 8 * GiB, 0,
                          model_config=CFG) == 100  # fmt: skip
    with pytest.raises(DriverError, match="raise gpu_mem_utilization"):
        plan_num_pages(spec, MiB, 4 * GiB, 8 * GiB, 0, model_config=CFG)


def test_plan_dev_cuda_cpu_and_explicit():
    assert plan_num_pages(_spec(kv_policy="dev"), MiB, 0, 0, 3 * GiB, model_config=CFG) == 1536
    # CPU: min(4 GiB, 25% of 8 GiB) / 1 MiB = 2048, cap 64 * 512 tokens / page 32 = 1024 pages
    assert plan_num_pages(_spec(device="cpu", page_size=32), MiB, 0, 0, 8 * GiB, model_config=CFG) == 1024
    # CPU with lots of RAM: the 4 GiB ceiling binds: 4 GiB / 4 MiB = 1024 (cap is 2048 at page 16)
    assert plan_num_pages(_spec(device="cpu"), 4 * MiB, 0, 0, 100 * GiB, model_config=CFG) == 1024
    assert plan_num_pages(_spec(num_pages=7), MiB, 0, 0, 0, model_config=CFG) == 7
    with pytest.raises(DriverError, match="free host memory"):
        plan_num_pages(_spec(device="cpu"), MiB, 0, 0, MiB, model_config=CFG)
    with pytest.raises(DriverError, match="unknown kv_policy"):
        plan_num_pages(_spec(kv_policy="turbo"), MiB, 0, 0, GiB, model_config=CFG)


def test_nan_logits_fail_the_pass_with_a_clear_error(tiny_checkpoint, monkeypatch):
    ex = make_executor(tiny_checkpoint("qwen3"), page_size=16, num_pages=8)
    batch = make_batch([_req([5, 9, 40], outputs=[2]), _req([7, 8], pages=(4,), outputs=[1])], page_size=16)
    ok = ex.execute(batch)
    assert ok.tokens.shape == (2,) and (ok.tokens >= 0).all()
    real = ex.model.compute_logits

    def poisoned(hidden):
        logits = real(hidden)
        logits[1, 3] = float("nan")  # one value of the second output row
        return logits

    monkeypatch.setattr(ex.model, "compute_logits", poisoned)
    with pytest.raises(DriverError, match=r"NaN logits for 1 of 2 output rows \(rows 1\)"):
        ex.execute(batch)


def test_out_of_pages_hint_names_keys_that_act_on_the_device():
    from pie.config import parse_config
    from pie.drivers.kv_plan import capacity_hint

    def entry(driver: str):
        return parse_config({"model": [{"name": "m", "driver": driver}]}, "c.toml").default_model

    cpu = capacity_hint(entry({"type": "dev", "device": "cpu"}), "c.toml")
    assert "gpu_mem_utilization has no effect on cpu" in cpu and "raise gpu_mem_utilization" not in cpu
    assert "min(4 GiB, 25% of available RAM)" in cpu
    dev_gpu = capacity_hint(entry({"type": "dev", "device": "cuda:0"}), "c.toml")
    assert dev_gpu.startswith("raise gpu_mem_utilization in the driver options of model 'm' in c.toml")
    native = capacity_hint(entry({"type": "cuda_native"}))
    assert native == "raise max_num_kv_pages or gpu_mem_utilization in the driver options of model 'm'"


def test_engine_uses_the_device_aware_hint():
    from pie.config import parse_config
    from pie.runtime.engine import Engine

    cfg = parse_config({"model": [{"name": "m", "driver": {"type": "dev"}}]}, "c.toml")
    assert "no effect on cpu" in Engine(cfg)._hint(cfg.default_model)


def test_sampler_tensors_are_reused_only_while_the_rows_are_the_same(tiny_checkpoint):
    """The executor keeps the last pass's sampler tensors on the device and reuses them for identical
    rows; any change (a temperature, a seed) rebuilds them, so a seeded draw equals a fresh executor's."""
    from pie.drivers.protocol import make_batch

    path = tiny_checkpoint("qwen3")
    ex, fresh = make_executor(path, 16), make_executor(path, 16)

    def batch(**sampler):
        reqs = [dict(token_ids=[1, 2, 3, 4], positions=[0, 1, 2, 3], pages=[i], last_page_len=4, outputs=[3], **sampler)
                for i in range(3)]  # fmt: skip
        return make_batch(reqs, 16)

    ex.execute(batch())
    first = ex._sampling
    ex.execute(batch())
    assert ex._sampling is first  # same rows: the device tensors are reused
    seeded = dict(temperature=1.0, seed=1234)
    got = ex.execute(batch(**seeded)).tokens
    assert ex._sampling is not first
    assert np.array_equal(got, fresh.execute(batch(**seeded)).tokens)
