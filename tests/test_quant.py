"""Quantized weights (pie.layers.quant) and the FP8 KV cache, on CPU.

Quantizers: round-trip error bounds. Kernels: each format's torch kernel equals its dequantized reference on
CPU (torch 2.x CPU builds ship int8pack, int4pack and _scaled_mm). Loading: fused shards quantize row by row
exactly as the whole matrix; tiny checkpoints load into every format and stay close to full precision; an
FP8 block checkpoint is kept as shipped (bytes equal). KV: FP8 pages hold e4m3, reading dequantizes, and the
page count planned for a byte budget doubles against bf16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_parity_hf import PagedSeqs, hf_logits
from tiny_models import make_tiny_checkpoint

import pie.drivers.executor as executor_mod
from pie.attention.base import AttentionMetadata, append_kv
from pie.attention.torch_backend import TorchBackend
from pie.drivers.executor import ModelExecutor
from pie.drivers.kv_plan import page_bytes, plan_num_pages
from pie.drivers.protocol import make_batch
from pie.drivers.spec import ExecutorSpec
from pie.layers.linear import QKVLinear
from pie.layers.quant import QuantLinear, is_quantizable, kernel_for
from pie.layers.quant_formats import (
    FP8,
    dequantize_fp8_blocks,
    quantize_fp8,
    quantize_fp8_blocks,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from pie.models.config import read_model_config

CPU = torch.device("cpu")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_quantizers_round_trip_within_their_precision():
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (96,)
    assert _rel(q.float() * s[:, None], w) < 0.01  # 8 bits: ~0.4% of a Gaussian row
    codes, s4, z4 = quantize_int4(w, 128)
    assert codes.shape == (96, 128) and s4.shape == z4.shape == (96, 2)
    c = unpack_int4(codes).float().view(96, 2, 128)
    assert int(c.min()) >= 0 and int(c.max()) <= 15
    assert _rel(((c - 8) * s4[..., None] + z4[..., None]).view(96, 256), w) < 0.12  # 16 levels per group
    q8, s8 = quantize_fp8(w)
    assert q8.dtype == FP8 and _rel(q8.float() * s8[:, None], w) < 0.05  # e4m3: 3 mantissa bits
    qb, sb = quantize_fp8_blocks(w[:, :200])  # shapes that are not multiples of the block
    assert sb.shape == (1, 2) and _rel(dequantize_fp8_blocks(qb, sb), w[:, :200]) < 0.05


def test_int4_packing_keeps_even_columns_in_the_high_nibble():
    w = torch.arange(16.0).repeat(2, 8)  # one group of 128 spanning 0..15: scale 1, codes = the values
    codes, s, z = quantize_int4(w, 128)
    assert float(s[0, 0]) == 1.0 and float(z[0, 0]) == 8.0
    assert int(codes[0, 0]) == 0x01 and int(codes[0, 7]) == 0xEF  # columns (0, 1) and (14, 15)
    assert torch.equal(unpack_int4(codes), w.to(torch.int32))


@pytest.mark.parametrize(
    ("fmt", "kernel", "dtype"),
    [
        ("int8", "int8pack", torch.float32),
        ("int8", "int8pack", torch.bfloat16),
        ("int4", "int4pack", torch.float32),
        ("int4", "int4pack", torch.bfloat16),
        ("float8", "scaled_mm", torch.float32),
        ("float8", "scaled_mm", torch.bfloat16),
    ],
)
def test_cpu_kernels_match_the_dequantized_reference(fmt, kernel, dtype):
    assert kernel_for(fmt, CPU, dtype) == kernel  # the maintained kernel, not the dequant fallback
    gen = torch.Generator().manual_seed(1)
    m = QuantLinear(256, 64, True, fmt, dtype)
    m.quantize_from_(torch.randn(64, 256, generator=gen) * 0.05)
    m.bias.data.copy_(torch.randn(64, generator=gen).to(dtype))
    ref_w = m.dequantized()
    x = torch.randn(2, 5, 256, generator=gen).to(dtype)
    m.finalize()
    assert m.kernel == kernel
    y = m(x)
    assert y.shape == (2, 5, 64) and y.dtype == dtype
    ref = x.float() @ ref_w.t() + m.bias.float()
    # weight-only kernels round only the output; FP8 also quantizes x per token (e4m3)
    tol = {"float8": 0.06}.get(fmt, 0.01 if dtype == torch.bfloat16 else 1e-4)
    assert _rel(y, ref) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_w8a8_kernel_matches_the_reference(dtype):
    """torch._int_mm (int8's CUDA kernel; CPU has it too), for a decode-sized batch (padded) and a prefill."""
    from pie.layers.quant import _check_kernel

    assert _check_kernel("int8", "int_mm", CPU, dtype) < 0.02


def test_fp8_block_layer_without_a_kernel_dequantizes_per_call():
    """fp8_block's kernel (cuBLAS block-scaled, sm90) does not exist on CPU: the layer still runs."""
    assert kernel_for("fp8_block", CPU, torch.float32) == "dequant"
    m = QuantLinear(200, 130, False, "fp8_block", torch.float32)
    w = torch.randn(130, 200)
    m.quantize_from_(w)
    m.finalize()
    x = torch.randn(3, 200)
    assert _rel(m(x), x @ m.dequantized().t()) < 1e-6 and _rel(m.dequantized(), w) < 0.05


@pytest.mark.parametrize("fmt", ["int8", "int4", "float8"])
def test_fused_shards_quantize_like_the_whole_matrix(fmt):
    """q, k, v loaded as separate checkpoint tensors give the same codes and scales as the concatenation:
    every format's scales are per output row (int4: per row and group)."""
    with torch.device("meta"):
        fused = QKVLinear(256, 4, 2, 32, bias=False)
    a = QuantLinear.from_linear(fused, fmt).to_empty(device=CPU)
    b = QuantLinear(256, 256, False, fmt, torch.float32)
    assert a.split_sizes == [128, 64, 64] and a.shard_slices == fused.shard_slices
    w = torch.randn(256, 256)
    for shard, (off, size) in fused.shard_slices.items():
        a.load_weight(w[off : off + size], shard)
    b.load_weight(w)
    assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))
    assert torch.equal(a.weight_scale, b.weight_scale)
    with pytest.raises(ValueError, match="shard 'k': expected 64 rows, got 128"):
        a.load_weight(w[:128], "k")


def _executor(path, **kw) -> ModelExecutor:
    return ModelExecutor(
        ExecutorSpec(model_path=str(path), page_size=4, num_pages=64, attention_backend="torch", **kw)
    )


def _prefill(ex: ModelExecutor, ids: list[int]) -> np.ndarray:
    seqs = PagedSeqs(ex.num_pages, 4)
    return ex.execute(make_batch([seqs.request(0, ids)], 4)).logits


def _kl(ref: np.ndarray, got: np.ndarray) -> float:
    lp, lq = (
        torch.log_softmax(torch.from_numpy(ref).double(), -1),
        torch.log_softmax(torch.from_numpy(got).double(), -1),
    )
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("q") / "llama", "llama")


@pytest.mark.parametrize(("fmt", "max_kl"), [("int8", 1e-3), ("float8", 0.05), ("int4", 0.25)])
def test_tiny_checkpoint_loads_quantized_and_stays_close(tiny_llama, fmt, max_kl):
    """Every projection is quantized (hidden 64: int4 groups of 128 do not fit the 64-wide inputs, so
    int4 quantizes only the 128-wide down_proj), the kernels are the CPU ones, and the logits stay close."""
    ids = list(range(3, 40))
    ref = _prefill(_executor(tiny_llama), ids)
    ex = _executor(tiny_llama, weight_dtype=fmt)
    layers = [m for m in ex.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == (2 if fmt == "int4" else 8)  # 2 layers x (qkv, o, gate_up, down)
    assert (
        ex.weight_kernels
        == {"int4": {"int4pack": 2}, "int8": {"int8pack": 8}, "float8": {"scaled_mm": 8}}[fmt]
    )
    assert ex.weights_bytes < _executor(tiny_llama).weights_bytes
    got = _prefill(ex, ids)
    kl = _kl(ref, got)
    assert 0 < kl < max_kl, kl


def test_random_weights_quantize(tiny_llama):
    """Benchmarks (random weights) build quantized models too; the seed fixes them."""
    a = _executor(tiny_llama, weight_dtype="int8", random_weights=True)
    b = _executor(tiny_llama, weight_dtype="int8", random_weights=True)
    assert np.array_equal(_prefill(a, [3, 4, 5]), _prefill(b, [3, 4, 5]))


# 128-wide heads and shards, so every projection is whole 128 x 128 blocks with fused shards on block edges
WIDE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128, intermediate_size=512,
            initializer_range=0.075)  # fmt: skip


def _fp8_checkpoint(tmp_path, block: int, declare: bool = False, **overrides):
    """A tiny Ministral 3 whose projections ship as FP8 with block scales (weight_scale_inv), and the same
    model with those weights dequantized (what HF would run). declare: config.json says 128 x 128 FP8 blocks
    (quantization_config), as hub FP8 checkpoints do."""
    import json

    path = make_tiny_checkpoint(tmp_path / "fp8", "ministral3", **overrides)
    tensors = load_file(str(path / "model.safetensors"))
    quant, deq = {}, {}
    for k, t in tensors.items():
        if k.endswith("proj.weight"):
            q, s = quantize_fp8_blocks(t, block)
            quant[k], quant[k.removesuffix("weight") + "weight_scale_inv"] = q, s
            deq[k] = dequantize_fp8_blocks(q, s, block).to(t.dtype)
        else:
            quant[k] = deq[k] = t
    ref = tmp_path / "deq"
    ref.mkdir()
    for f in path.iterdir():
        (ref / f.name).write_bytes(f.read_bytes())
    save_file(deq, str(ref / "model.safetensors"))
    save_file(quant, str(path / "model.safetensors"))
    if declare:
        cfg = json.loads((path / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [block, block]}
        (path / "config.json").write_text(json.dumps(cfg))
    return path, ref, quant


def test_fp8_block_checkpoint_is_kept_as_shipped(tmp_path, monkeypatch):
    """The fp8_block path (CUDA sm90 in production; forced here) stores the checkpoint's FP8 bytes and block
    scales unchanged, and the model equals transformers on the dequantized weights. Fused projections whose
    shards do not start on a 128-row block are dequantized at load instead."""
    path, ref, quant = _fp8_checkpoint(tmp_path, 128, **WIDE)
    monkeypatch.setattr(executor_mod, "weight_format", lambda *a: "fp8_block")
    ex = _executor(path)
    down = ex.model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(down, QuantLinear) and down.fmt == "fp8_block" and down.kernel == "dequant"
    shipped = quant["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(down.weight.view(torch.uint8), shipped.view(torch.uint8))
    assert torch.equal(down.weight_scale, quant["model.layers.0.mlp.down_proj.weight_scale_inv"])
    assert all(m.fmt == "fp8_block" for m in ex.model.modules() if isinstance(m, QuantLinear))
    assert sum(isinstance(m, QuantLinear) for m in ex.model.modules()) == 4 * ex.model_config.num_layers
    # a q/k/v of 64-row shards (the default tiny shape) cannot keep 128-row blocks: dequantized at load
    with torch.device("meta"):
        narrow = QKVLinear(64, 4, 2, 16, bias=False)
    assert not is_quantizable("qkv_proj", narrow, "fp8_block") and is_quantizable("qkv_proj", narrow, "int8")
    ids = list(range(3, 30))
    got = _prefill(ex, ids)
    assert float(np.abs(got - hf_logits(ref, ids)).max()) < 1e-3


def test_fp8_checkpoint_requantized_to_another_format(tmp_path):
    """weight_dtype int8 on an FP8 checkpoint: each weight is dequantized with its scale, then quantized."""
    path, ref, _ = _fp8_checkpoint(tmp_path, 32)
    ids = list(range(3, 30))
    got = _prefill(_executor(path, weight_dtype="int8"), ids)
    assert _kl(hf_logits(ref, ids), got) < 1e-3


def test_checkpoint_fp8_blocks_reads_config(tmp_path):
    from pie.drivers.quantization import checkpoint_fp8_blocks, weight_format

    (tmp_path / "config.json").write_text(
        '{"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}'
    )
    assert checkpoint_fp8_blocks(tmp_path)
    # on CPU the block kernel does not exist: full precision (dequantized at load) or the asked format
    assert weight_format("auto", tmp_path, CPU, torch.float32) is None
    assert weight_format("int4", tmp_path, CPU, torch.float32) == "int4"
    (tmp_path / "config.json").write_text("{}")
    assert not checkpoint_fp8_blocks(tmp_path)


# ---- FP8 KV cache ----------------------------------------------------------------------------------------


def test_fp8_kv_pages_store_e4m3_saturate_and_dequantize_on_read():
    ps, H, D = 4, 2, 8
    cache = torch.zeros(3, 2, ps, H, D, dtype=torch.float8_e4m3fn)
    batch = make_batch(
        [dict(token_ids=[1, 2, 3], positions=[0, 1, 2], pages=[2], last_page_len=3, outputs=[2])], ps
    )
    meta = AttentionMetadata.from_batch(batch, ps, CPU)
    k = torch.randn(3, H, D)
    k[0, 0, 0] = 1e4  # beyond e4m3's range: saturates instead of becoming NaN
    v = torch.randn(3, H, D)
    append_kv(cache, k, v, meta, (2.0, 0.5))
    stored = cache[2, 0, :3].float()
    assert float(stored[0, 0, 0]) == 448.0 and not stored.isnan().any()
    assert _rel(stored[1:] * 2.0, k[1:]) < 0.05 and _rel(cache[2, 1, :3].float() * 0.5, v) < 0.05
    # the torch backend reads value = stored * scale; scales of 1 are the identity (kv_scale None)
    be = TorchBackend(
        4, H, D, ps, torch.float32, CPU, kv_dtype=torch.float8_e4m3fn, kv_scales=[(2.0, 0.5), (1.0, 1.0)]
    )
    assert be.kv_scale(0) == (2.0, 0.5) and be.kv_scale(1) is None
    q = torch.randn(3, 4, D)
    be.plan(meta)
    out = be.run(q, cache, 0)
    ref_be = TorchBackend(4, H, D, ps, torch.float32, CPU)
    ref_be.plan(meta)
    deq = torch.zeros(3, 2, ps, H, D)
    deq[:, 0], deq[:, 1] = cache[:, 0].float() * 2.0, cache[:, 1].float() * 0.5
    assert torch.allclose(out, ref_be.run(q, deq, 0), atol=1e-5)


def test_fp8_kv_doubles_the_pages_of_a_budget(tiny_llama):
    """One page in e4m3 is half a bf16 page, so the same memory holds twice the pages (the planner divides
    the budget by page_bytes); the executor allocates e4m3 and reports its page size."""
    cfg = read_model_config(tiny_llama)
    assert page_bytes(cfg, 16, torch.bfloat16) == 2 * page_bytes(cfg, 16, torch.float8_e4m3fn)
    fp8 = ModelExecutor(
        ExecutorSpec(model_path=str(tiny_llama), kv_cache_dtype="fp8_e4m3", max_num_kv_pages=None)
    )
    bf16 = ModelExecutor(ExecutorSpec(model_path=str(tiny_llama), activation_dtype="bfloat16"))
    assert fp8.kv_cache.dtype == torch.float8_e4m3fn
    assert fp8.capabilities.page_nbytes * 2 == bf16.capabilities.page_nbytes
    # cuda_native's planner on an 8 GiB card: what is left after weights and activations, in pages
    spec = ExecutorSpec(model_path="", device="cuda:0", kv_policy="cuda_native", gpu_mem_utilization=0.9)
    free = 8 << 30
    n_fp8 = plan_num_pages(spec, page_bytes(cfg, 16, FP8), 1 << 30, free, free, model_config=cfg)
    n_bf16 = plan_num_pages(spec, page_bytes(cfg, 16, torch.bfloat16), 1 << 30, free, free, model_config=cfg)
    assert n_fp8 in (2 * n_bf16, 2 * n_bf16 + 1)


def test_fp8_kv_executor_stays_close(tiny_llama):
    ids = list(range(3, 40))
    ref = _prefill(_executor(tiny_llama), ids)
    got = _prefill(_executor(tiny_llama, kv_cache_dtype="fp8_e4m3"), ids)
    assert 0 < _kl(ref, got) < 0.02


def test_config_to_dev_driver_child_runs_quantized(tmp_path, monkeypatch):
    """The whole path: config.toml (dev, int4 weights, FP8 KV) -> validated config -> ExecutorSpec -> the
    dev driver's child process, which loads the embedded model quantized and answers like the in-process
    executor built from the same spec."""
    import asyncio
    import sys

    from pie.config.loader import parse_config
    from pie.drivers.dev.client import DevDriver
    from pie.drivers.factory import executor_spec

    monkeypatch.setenv("PIE_HOME", str(tmp_path / "home"))
    toml = {
        "model": [
            {
                "driver": {
                    "type": "dev",
                    "options": {"weight_dtype": "int4", "kv_cache_dtype": "fp8_e4m3", "max_num_kv_pages": 8},
                }
            }
        ]
    }
    spec = executor_spec(parse_config(toml, "test").default_model)
    assert (spec.weight_dtype, spec.kv_cache_dtype, spec.device) == ("int4", "fp8_e4m3", "cpu")
    batch = make_batch(
        [dict(token_ids=[3, 17, 42, 5, 9], positions=list(range(5)), pages=[1], last_page_len=5, outputs=[4],
              return_logits=True)],
        spec.page_size,
    )  # fmt: skip
    local = ModelExecutor(spec)
    expected = local.execute(batch)

    async def main():
        d = DevDriver(spec, python=sys.executable, ready_timeout_s=120)
        caps = await d.start()
        try:
            return caps, await d.forward(batch)
        finally:
            await d.shutdown()

    caps, got = asyncio.run(asyncio.wait_for(main(), 180))
    assert caps.extra["weight_format"] == "int4" and caps.extra["kv_cache_dtype"] == "float8_e4m3fn"
    assert (
        caps.page_nbytes
        == local.capabilities.page_nbytes
        == page_bytes(local.model_config, spec.page_size, FP8)
    )
    np.testing.assert_allclose(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
