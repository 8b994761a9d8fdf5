"""Quantized weights under tensor parallelism on CPU: 2 ranks (this process as rank 0, one worker), gloo.

Each rank quantizes its own shard of every projection (layers/quant.py over layers/parallel.py). tp 2 is
compared with tp 1 in the same format, over test_tensor_parallel's prefill + greedy decode steps:
  * column-parallel layers (qkv, gate_up) quantize whole output rows: the per-channel scales of a rank's rows
    are exactly the whole matrix's, and int4's groups run along the (unsplit) input dim, so these layers hold
    bit-identical codes at tp 1 and tp 2;
  * row-parallel layers (o_proj, down_proj) split the input dim: int8's per-output-channel scale of a rank's
    half is the amax of that half, not of the whole row, so the codes differ (each half is rounded on its
    own, finer grid). int4's groups of 128 inputs sit inside one rank (enforced), so its codes are identical.
So int4 must match tp 1 to the fp32 tolerance of the unquantized tp test (and give the same greedy tokens).
int8 is checked exactly where it can be (rank 0's column-parallel codes and scales equal tp 1's rows) and,
end to end, on the prefill logits (same inputs on both sides): tp 2's int8 model is another int8 rounding of
the same weights, so its distance from tp 1's int8 logits must stay within tp 1 int8's own distance from the
full-precision logits (measured: 0.14 against 0.26, max |logit| 7.6, i.e. ~2% of the logit range on this
random tiny model, whose logits swing more than a trained model's). A wrong shard or scale would be off by
O(the logits). Decode steps are not compared for int8: a near-tie may pick another greedy token, after which
the inputs differ.

The checkpoint is a tiny Llama wide enough for int4 at tp 2 (hidden 128, 8 heads of 32, intermediate 256:
every rank's row-parallel inputs are whole groups of 128); the default tiny Llama (intermediate 128) cannot
split down_proj's groups over 2 ranks, which the executor refuses with a config error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_tensor_parallel import run_steps, spec
from tiny_models import make_tiny_checkpoint

from pie.drivers.executor import ModelExecutor
from pie.errors import DriverError
from pie.layers.quant import QuantLinear

ATOL = 1e-4  # test_tensor_parallel's fp32 tolerance
WIDE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32)
FORMATS = ("int8", "int4")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpq")
    return {
        "wide": make_tiny_checkpoint(root / "wide", "llama", **WIDE),
        "narrow": make_tiny_checkpoint(root / "narrow", "llama"),
    }


def quantized_layers(executor: ModelExecutor) -> dict[str, str]:
    """{layer name: format} of the executor's quantized projections."""
    return {n: m.fmt for n, m in executor.model.named_modules() if isinstance(m, QuantLinear)}


@pytest.fixture(scope="module")
def references(checkpoints):
    """tp 1 results per format, and the full-precision ones (computed before the group forms: a process in
    a group builds shards); the int8 executor is kept for its codes."""
    out = {"auto": run_steps(ModelExecutor(spec(checkpoints["wide"], 1)))}
    for fmt in FORMATS:
        executor = ModelExecutor(spec(checkpoints["wide"], 1, weight_dtype=fmt))
        layers = quantized_layers(executor)
        # every projection of both layers: qkv, o, gate_up, down
        assert len(layers) == 8 and set(layers.values()) == {fmt}, layers
        out[fmt] = run_steps(executor)
        if fmt == "int8":
            out["int8_executor"] = executor
    return out


@pytest.fixture(scope="module")
def group(references):
    from pie.drivers.tp import TPGroup

    g = TPGroup(["cpu", "cpu"], timeout_s=60)
    yield g
    g.close()


def test_int4_refuses_a_split_that_cuts_its_groups(checkpoints, tmp_path):
    """(First: it runs before the group forms, as the config check runs in the server, outside any group.)
    down_proj of the default tiny Llama has 128 inputs: one int4 group, which 2 ranks would cut. The config
    is refused before any driver process starts (ConfigError naming the layer and the sizes that work)."""
    from pie.config import load_or_default
    from pie.drivers.factory import executor_spec
    from pie.errors import ConfigError

    cfg = tmp_path / "config.toml"
    model = '[[model]]\nname = "m"\nhf_repo = "{}"\n[model.driver]\ntype = "dev"\ndevice = ["cpu", "cpu"]\n'
    for fmt in ("int4", "int8"):
        cfg.write_text(
            model.format(checkpoints["narrow"])
            + f'tensor_parallel_size = 2\n[model.driver.options]\nweight_dtype = "{fmt}"\n'
        )
        config, _ = load_or_default(str(cfg))
        if fmt == "int8":  # per-channel: any split works
            assert executor_spec(config.models[0]).weight_dtype == "int8"
            continue
        with pytest.raises(
            ConfigError, match=r"int4 quantizes .*down_proj in groups of 128.*tensor_parallel_size 1,"
        ):
            executor_spec(config.models[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_tp2_quantized_matches_tp1(fmt, checkpoints, references, group):
    executor = group.build(spec(checkpoints["wide"], 2, weight_dtype=fmt))
    try:
        assert executor.capabilities.extra["weight_format"] == fmt
        local = quantized_layers(executor.local)
        assert len(local) == 8 and set(local.values()) == {fmt}  # rank 0 quantized its shard of each
        down = executor.local.model.model.layers[0].mlp.down_proj
        assert (down.in_features, down.out_features) == (128, 128)  # half of intermediate 256
        logits, tokens = run_steps(executor)
    finally:
        executor.close()
    ref_logits, ref_tokens = references[fmt]
    if fmt == "int4":  # identical codes: fp32 agreement and the same greedy tokens
        for step, (a, b) in enumerate(zip(logits, ref_logits, strict=True)):
            diff = float(np.abs(a - b).max())
            assert diff <= ATOL, f"{fmt} step {step}: max |logit diff| {diff:.2e} > {ATOL}"
        for step, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)):
            assert np.array_equal(a, b), f"{fmt} step {step}: greedy tokens {a} != tp 1's {b}"
        return
    # int8: another rounding of the row-parallel layers only (see the module doc)
    diff = float(np.abs(logits[0] - ref_logits[0]).max())
    noise = float(np.abs(ref_logits[0] - references["auto"][0][0]).max())
    assert diff <= noise, (
        f"int8 prefill: tp 2 vs tp 1 max |logit diff| {diff:.3f} > int8's own error {noise:.3f}"
    )


def test_int8_column_shards_equal_tp1_rows(checkpoints, references, group):
    """Per-output-channel quantization of a rank's rows is the whole matrix's, row for row: rank 0's qkv and
    gate_up codes and scales are exactly tp 1's rows of each part."""
    whole = references["int8_executor"].model.model.layers
    executor = group.build(spec(checkpoints["wide"], 2, weight_dtype="int8"))
    try:
        for layer, ref in zip(executor.local.model.model.layers, whole, strict=True):
            for shard, full in ((layer.self_attn.qkv_proj, ref.self_attn.qkv_proj), (layer.mlp.gate_up_proj, ref.mlp.gate_up_proj)):  # fmt: skip
                assert shard.parts is not None
                for part, (_, start, n) in shard.parts.items():
                    dst, src = shard.shard_slices[part][0], full.shard_slices[part][0] + start
                    assert torch.equal(shard.weight[dst : dst + n], full.weight[src : src + n])
                    assert torch.equal(shard.weight_scale[dst : dst + n], full.weight_scale[src : src + n])
    finally:
        executor.close()


def test_int4_split_problem_in_the_executor(checkpoints, group):
    """The executor refuses the same split itself (a spec built without the config check); last in this
    module, since a rank that fails to build stops the group."""
    with pytest.raises(DriverError, match=r"int4 quantizes .*down_proj in groups of 128"):
        group.build(spec(checkpoints["narrow"], 2, weight_dtype="int4"))


def test_fp8_blocks_kept_on_block_edges_else_dequantized():
    """A rank's slice of an FP8 block checkpoint (rank 1 of 2, no group: the layout is set by hand) keeps
    the shipped codes and scale blocks when it starts and ends on 128 edges; a slice that cuts blocks is
    dequantized and requantized into its own blocks."""
    from pie.layers.quant_formats import dequantize_fp8_blocks, quantize_fp8_blocks

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=gen)
    codes, scale = quantize_fp8_blocks(w)  # the checkpoint: [256, 512] e4m3, [2, 4] block scales

    row = QuantLinear(256, 256, False, "fp8_block", torch.float32)  # row-parallel: inputs [256, 512)
    row.row_parallel = (512, 256)
    row.load_weight(codes, None, scale)
    assert torch.equal(row.weight.view(torch.uint8), codes[:, 256:].contiguous().view(torch.uint8))
    assert torch.equal(row.weight_scale, scale[:, 2:])

    t_codes, t_scale = quantize_fp8_blocks(w.t().contiguous())  # [512, 256], [4, 2]
    col = QuantLinear(256, 128, False, "fp8_block", torch.float32, {0: (0, 128)})  # rows [128, 256) of part 0
    col.parts = {0: (512, 128, 128)}
    col.load_weight(t_codes, 0, t_scale)
    assert torch.equal(col.weight.view(torch.uint8), t_codes[128:256].view(torch.uint8))
    assert torch.equal(col.weight_scale, t_scale[1:2])

    cut = QuantLinear(192, 256, False, "fp8_block", torch.float32)  # inputs [192, 384): cuts blocks 1 and 2
    cut.row_parallel = (512, 192)
    cut.load_weight(codes, None, scale)
    want = dequantize_fp8_blocks(codes, scale)[:, 192:384]
    got = dequantize_fp8_blocks(cut.weight, cut.weight_scale)
    assert float((got - want).norm() / want.norm()) < 0.05  # requantized: e4m3 rounding, not a wrong slice
