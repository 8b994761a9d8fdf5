"""`pie bench` on CPU: exact floors of public model shapes, the batches it builds, the record and table,
argument errors, and one end-to-end smoke run on a tiny random model (CPU, torch attention)."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
import torch

from pie.bench import bundled_configs, floors, load_model_config
from pie.bench.report import build_record, print_table
from pie.bench.runner import (
    BenchOptions,
    DecodeFigure,
    Measurements,
    PrefillFigure,
    decode_batch,
    fill_context,
    prefill_batch,
)
from pie.cli import bench_cmd
from pie.errors import ConfigError, DriverError


def cfg(name: str) -> dict:
    return load_model_config(name)[0]


# ---- floors ---------------------------------------------------------------------------------------


def test_bundled_configs():
    assert {
        "llama-3.1-8b",
        "llama-3.2-1b",
        "qwen3-0.6b",
        "mixtral-8x7b",
        "phi-3-mini-4k",
        "qwen3-30b-a3b",
    } <= set(bundled_configs())


# published parameter counts of the attention-side family configs (model cards / safetensors totals)
FAMILY_PARAMS = {"gemma-2-2b": 2_614_341_888, "gemma-3-1b": 999_885_952, "olmo-3-7b": 7_298_011_136,
                 "ministral-8b": 8_019_808_256, "mixtral-8x7b": 46_702_792_704, "qwen3-30b-a3b": 30_532_122_624,
                 "phi-3-mini-4k": 3_821_079_552}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FAMILY_PARAMS) + ["ministral-3-8b"])
def test_family_configs_build_their_model(name):
    """Every bundled family config normalizes and builds (on the meta device: no memory) with the
    published parameter count."""
    import torch

    from pie.models.config import ModelConfig
    from pie.models.registry import get_model_class

    mc = ModelConfig.from_hf(cfg(name))
    with torch.device("meta"):
        model = get_model_class(mc.model_type)(mc)
    total = sum(p.numel() for p in model.parameters())
    if name in FAMILY_PARAMS:
        assert total == FAMILY_PARAMS[name]


@pytest.mark.parametrize(
    "name,params",
    # published parameter counts of these checkpoints
    [("qwen3-0.6b", 596_049_920), ("llama-3.2-1b", 1_235_814_400), ("llama-3.1-8b", 8_030_261_248),
     ("mixtral-8x7b", 46_702_792_704), ("qwen3-30b-a3b", 30_532_122_624), ("phi-3-mini-4k", 3_821_079_552)],
)  # fmt: skip
def test_param_counts_match_published_totals(name, params):
    assert floors.param_counts(cfg(name)).total == params


@pytest.mark.parametrize("name,gb", [("qwen3-0.6b", 1.19), ("llama-3.2-1b", 2.47), ("llama-3.1-8b", 15.0)])
def test_decode_weight_bytes(name, gb):
    # bf16; tied models read the embedding once, as the LM head
    assert floors.decode_weight_bytes(cfg(name)) / 1e9 == pytest.approx(gb, abs=0.01)


def test_moe_decode_reads_the_experts_its_tokens_touch():
    c = cfg("mixtral-8x7b")
    pc = floors.param_counts(c)
    expert = 3 * 4096 * 14336
    assert (pc.num_sparse_layers, pc.num_experts, pc.experts_per_token, pc.expert_params) == (
        32,
        8,
        2,
        expert,
    )
    assert pc.experts_touched(1) == pytest.approx(2.0)  # batch 1: exactly the top-k
    assert pc.experts_touched(2) == pytest.approx(8 * (1 - 0.75**2))  # 3.5 expected distinct experts
    assert pc.experts_touched(256) == pytest.approx(8.0)  # large batches touch every expert
    one, many = floors.decode_weight_bytes(c, 2, 1), floors.decode_weight_bytes(c, 2, 256)
    assert many - one == pytest.approx(32 * 6 * expert * 2, rel=1e-9)  # the 6 experts batch 1 never reads
    assert floors.decode_step_bytes(c, 256, 0.0) == many
    # compute: router + k experts per token, not all E
    attn = pc.attention_per_layer
    assert pc.matmul_per_token == 32 * (attn + 8 * 4096 + 2 * expert)
    # qwen3_moe: the step / mlp_only rule picks the sparse layers; dense ones keep intermediate_size
    q = {**cfg("qwen3-30b-a3b"), "decoder_sparse_step": 2, "mlp_only_layers": [1]}
    qc = floors.param_counts(q)
    assert qc.num_sparse_layers == 23 and qc.mlp_per_layer == 3 * 2048 * 6144  # odd layers but layer 1
    assert floors.param_counts(cfg("phi-3-mini-4k")).num_sparse_layers == 0


def test_tied_lm_head_counted_once_untied_embedding_not_read():
    c = cfg("llama-3.2-1b")
    tied, untied = floors.param_counts(c), floors.param_counts({**c, "tie_word_embeddings": False})
    assert untied.total - tied.total == c["vocab_size"] * c["hidden_size"]
    # untied: the LM head is read, the embedding table is not (lookups touch only the batch's rows)
    assert untied.read_per_decode_step == tied.read_per_decode_step


def test_qwen2_biases_and_qwen3_qk_norms():
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "intermediate_size": 128, "vocab_size": 100, "num_hidden_layers": 1}  # fmt: skip
    llama = floors.param_counts({**base, "model_type": "llama"}).attention_per_layer
    assert floors.param_counts({**base, "model_type": "qwen2"}).attention_per_layer == llama + 64 + 2 * 32
    assert floors.param_counts({**base, "model_type": "qwen3"}).attention_per_layer == llama + 2 * 16
    assert llama == 64 * 64 + 2 * 64 * 32 + 64 * 64


def test_kv_bytes_and_decode_floor():
    c = cfg("qwen3-0.6b")
    assert floors.kv_bytes_per_token(c) == 2 * 28 * 8 * 128 * 2
    weights = floors.decode_weight_bytes(c)
    assert floors.decode_step_bytes(c, 64, 100.0) == weights + 64 * 100 * 114688
    # GPU.md: 0.40 ms per token at batch 1 on a 3.0 TB/s H100 (KV of 129 tokens adds 0.005 ms)
    assert floors.decode_floor_s(c, 1, 129, 3.0e12) * 1e3 == pytest.approx(0.402, abs=0.002)


def test_attention_and_prefill_flops():
    c = {"num_attention_heads": 2, "head_dim": 8, "hidden_size": 16, "num_hidden_layers": 3}
    # n=2 new tokens over kv=3 slots: query 0 sees 2 slots, query 1 sees 3 -> 5 pairs
    assert floors.attention_flops(c, [2], [3]) == 4 * 3 * 2 * 8 * 5
    q = cfg("qwen3-0.6b")
    pc = floors.param_counts(q)
    flops = floors.prefill_flops(q, [2048] * 4, [2048] * 4, 4)
    assert flops == 2 * pc.matmul_per_token * 8192 + 2 * pc.embedding * 4 + floors.attention_flops(
        q, [2048] * 4, [2048] * 4
    )
    compute = flops / 790e12
    assert floors.prefill_floor_s(q, [2048] * 4, [2048] * 4, 4, 790e12, 3e12) == pytest.approx(compute)
    # a 1-token "prefill" is memory bound
    tiny = floors.prefill_floor_s(q, [1], [1], 1, 790e12, 3e12)
    assert tiny == pytest.approx(floors.prefill_bytes(q, [1], [1]) / 3e12)


# ---- batches --------------------------------------------------------------------------------------


def test_prefill_and_decode_batches_are_valid_and_disjoint():
    rng = np.random.default_rng(0)
    pb = prefill_batch(np.array([5, 9, 1]), pages_per_seq=3, page_size=4, vocab=50, rng=rng)
    pb.validate(page_size=4, num_pages=9, vocab_size=50)
    assert pb.positions.tolist() == [0, 1, 2, 3, 4, *range(9), 0]
    assert pb.kv_page_indices.tolist() == [0, 1, 3, 4, 5, 6]
    assert pb.output_indices.tolist() == [4, 13, 14]
    db = decode_batch(np.array([6, 12, 2]), pages_per_seq=3, page_size=4, vocab=50, rng=rng)
    db.validate(page_size=4, num_pages=9, vocab_size=50)
    assert db.positions.tolist() == [5, 11, 1]
    assert db.kv_lens(4).tolist() == [6, 12, 2]
    assert db.kv_page_indices.tolist() == [0, 1, 3, 4, 5, 6]
    assert db.kv_last_page_len.tolist() == [2, 4, 2]
    assert np.all(db.temperature == 0) and db.num_outputs == 3


def test_fill_context_covers_each_sequence_pages_in_chunks():
    opts = BenchOptions(
        context=6, batch_sizes=(5,), page_size=4, steps=1, repeats=1, warmup=0, chunk_tokens=12
    )
    seen = []

    class Recorder:
        def execute(self, b):
            b.validate(opts.page_size, opts.num_pages())
            seen.append(b)

    fill_context(Recorder(), 5, opts, 50, np.random.default_rng(0))
    assert [b.num_requests for b in seen] == [2, 2, 1]  # 12 tokens per pass, 6 per sequence
    pps = opts.pages_per_seq()
    pages = np.concatenate([b.kv_page_indices for b in seen])
    assert pages.tolist() == [s * pps + p for s in range(5) for p in range(2)]


def test_options_size_pages_for_every_run():
    opts = BenchOptions(context=128, batch_sizes=(1, 64, 256), steps=16, repeats=3, warmup=3, page_size=32)
    assert opts.decode_steps_total == 3 + 48 + 1
    assert opts.pages_per_seq() == -(-(128 + 52) // 32)
    assert opts.num_pages() == 256 * 6


# ---- record and table -----------------------------------------------------------------------------


def _measurements():
    return Measurements(
        copy_bandwidth_bps=3.0e12,
        matmul_flops_per_s=790e12,
        decode=[DecodeFigure(1, 2e-3, 130.0, [2e-3]), DecodeFigure(64, 4e-3, 130.0, [4e-3])],
        prefill=PrefillFigure(4, 2048, 0.05, [0.05]),
        capabilities={"extra": {"attention_backend": "flashinfer"}},
    )


def test_record_figures_floors_and_ratios():
    c = cfg("qwen3-0.6b")
    opts = BenchOptions(device="cpu")
    rec = build_record(_measurements(), c, "qwen3-0.6b", opts, random_weights=True)
    json.dumps(rec)  # serializable
    by = {f["name"]: f for f in rec["figures"]}
    d1 = by["decode_ms_per_token"]
    floor1 = floors.decode_floor_s(c, 1, 130.0, 3.0e12)
    assert d1["value"] == pytest.approx(2.0) and d1["floor"] == pytest.approx(floor1 * 1e3)
    assert d1["ratio"] == pytest.approx(2e-3 / floor1)
    d64 = by["decode_tokens_per_s_b64"]
    assert d64["value"] == pytest.approx(16000) and d64["ratio"] == pytest.approx(d64["floor"] / d64["value"])
    pf = by["prefill_tokens_per_s"]
    assert pf["value"] == pytest.approx(8192 / 0.05) and pf["ratio"] == pytest.approx(
        pf["floor"] / pf["value"]
    )
    assert rec["ceilings"] == {"copy_bandwidth_GBps": 3000.0, "matmul_tflops": 790.0}
    assert rec["model"]["params"] == 596_049_920 and rec["settings"]["attention_backend"] == "flashinfer"
    buf = io.StringIO()
    print_table(rec, buf)
    text = buf.getvalue()
    assert "decode, batch 64" in text and "prefill, 4 x 2048" in text and "16,000" in text


# ---- the command ----------------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=None)
    parser = argparse.ArgumentParser(prog="pie")
    bench_cmd.register(parser.add_subparsers(), common)
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model-config", "no-such-model"], "bundled config"),
        (["--model-config", "qwen3-0.6b", "--batch-sizes", "1,x"], "comma-separated"),
        (["--model-config", "qwen3-0.6b", "--prefill", "4by2048"], "4x2048"),
        (["--model-config", "qwen3-0.6b", "--context", "40960"], "max_position_embeddings"),
        (["--model-config", "qwen3-0.6b", "--steps", "0"], "--steps"),
    ],
)
def test_bad_arguments_are_config_errors(argv, match):
    with pytest.raises(ConfigError, match=match):
        _run(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda_is_a_driver_error():
    with pytest.raises(DriverError, match="--device cpu"):
        _run(["--model-config", "qwen3-0.6b", "--random-weights"])


def test_smoke_run_on_cpu(tmp_path, capsys):
    # a tiny llama-shaped config: the whole pipeline (ceilings, executor, decode runs, prefill, profile, JSON)
    tiny = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}  # fmt: skip
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny))
    prof = tmp_path / "prof.txt"
    argv = ["--model-config", str(path), "--device", "cpu", "--dtype", "float32", "--context", "8",
            "--batch-sizes", "1,3", "--prefill", "2x16", "--steps", "2", "--repeats", "2", "--warmup", "1",
            "--page-size", "4", "--json", "--profile", str(prof)]  # fmt: skip
    assert _run(argv) == 0
    out, err = capsys.readouterr()
    rec = json.loads(out)
    assert rec["model"]["name"] == "tiny" and rec["model"]["random_weights"] is True
    assert rec["settings"]["attention_backend"] == "torch" and rec["card"].startswith("cpu")
    names = [f["name"] for f in rec["figures"]]
    assert names == ["decode_ms_per_token", "decode_tokens_per_s_b3", "prefill_tokens_per_s"]
    for f in rec["figures"]:
        assert f["value"] > 0 and f["floor"] > 0 and f["ratio"] > 0
    assert rec["figures"][0]["mean_kv_len"] == pytest.approx(8 + 1 + 1 + 1.5)  # steps 1..4 after warm-up
    assert "decode batch 3" in err and "prefill, 2 x 16" in err  # progress and the table on stderr
    assert "sorted by self_cpu_time_total" in prof.read_text()  # profile of the batch-3 step (no 64 here)


def test_configured_cpu_device_is_used(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    """A model configured on cpu (dev driver) benches on cpu without --device."""
    monkeypatch.setenv("PIE_HOME", str(tmp_path / "home"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[[model]]\nname = "tiny"\nhf_repo = "{tiny_checkpoint("qwen3")}"\n[model.driver]\ntype = "dev"\n'
    )
    argv = ["bench", "-c", str(cfg), "--random-weights", "--context", "8", "--batch-sizes", "1",
            "--prefill", "none", "--steps", "1", "--repeats", "1", "--warmup", "0", "--page-size", "4",
            "--json"]  # fmt: skip
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=None)
    parser = argparse.ArgumentParser(prog="pie")
    bench_cmd.register(parser.add_subparsers(), common)
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["card"].startswith("cpu") and rec["settings"]["dtype"] == "float32"
