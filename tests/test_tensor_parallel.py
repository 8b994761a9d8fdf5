"""Tensor parallelism on CPU: 2 ranks (this process as rank 0, one worker process), gloo.

Every family's tiny checkpoint gives logits within fp32 tolerance of tensor_parallel_size 1 and the same
greedy tokens, over a prefill of two sequences and decode steps whose input ids are the previous step's
sampled tokens (prev_token_rows: rank 0 samples, the worker must receive the tokens). One group serves all
families (a "build" message per model), so the worker process starts once. The tp 1 references are computed
before the group forms (a process in a group of 2 builds shards).

Also: a killed rank fails the pass with an error naming it (no hang), page reads/writes round-trip the
ranks' slices, the dev driver runs tp 2, and the sharding arithmetic.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest
from test_parity_hf import PagedSeqs
from tiny_models import make_tiny_checkpoint

from pie.drivers.executor import ModelExecutor
from pie.drivers.protocol import PageOps, make_batch
from pie.drivers.spec import ExecutorSpec
from pie.errors import DriverError

ATOL = 1e-4
PAGE = 4
PAGES = 48
DECODE_STEPS = 5
# every family built from the shared layers (gemma4 refuses tp > 1); mistral3 / phi3_longrope add nothing
# beyond ministral3 / phi3 here
FAMILIES = ("llama", "llama_tied", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gemma2", "gemma3", "gpt_oss",
            "phi3", "olmo3", "ministral3")  # fmt: skip


def spec(path, tp: int, **kw) -> ExecutorSpec:
    kw = {"tp_timeout_s": 60, **kw}
    return ExecutorSpec(
        model_path=str(path), page_size=PAGE, num_pages=PAGES, attention_backend="torch",
        tensor_parallel_size=tp, devices=["cpu"] * tp, **kw,
    )  # fmt: skip


def run_steps(executor) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Prefill two sequences (17 and 9 tokens), then DECODE_STEPS greedy steps fed from the last step's
    tokens. Returns (logits per step, tokens per step)."""
    seqs = PagedSeqs(PAGES, PAGE)
    first = [seqs.request(0, list(range(5, 22))), seqs.request(1, list(range(30, 39)))]
    res = executor.execute(make_batch(first, PAGE))
    logits, tokens = [res.logits], [res.tokens]
    last_rows = [16, 25]  # each sequence's last prefill row: its next token
    for _ in range(DECODE_STEPS):
        reqs = [dict(seqs.request(s, [0]), return_logits=True) for s in (0, 1)]
        batch = make_batch(reqs, PAGE)
        batch.prev_token_rows = np.asarray(last_rows, dtype=np.int32)
        res = executor.execute(batch)
        logits.append(res.logits)
        tokens.append(res.tokens)
        last_rows = [0, 1]
    return logits, tokens


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {arch: make_tiny_checkpoint(root / arch, arch) for arch in FAMILIES}


@pytest.fixture(scope="module")
def references(checkpoints):
    """tp 1 logits and tokens per family (computed before any group forms in this process)."""
    return {arch: run_steps(ModelExecutor(spec(path, 1))) for arch, path in checkpoints.items()}


@pytest.fixture(scope="module")
def group(references):
    from pie.drivers.tp import TPGroup

    g = TPGroup(["cpu", "cpu"], timeout_s=60)
    yield g
    g.close()


def test_doctor_reports_the_layout(tmp_path):
    """pie doctor's tensor-parallel line: the ranks, their devices, each rank's shard bytes; a model whose
    heads do not split fails with the reason. (Before the group forms: sizing a shard simulates a rank.)"""
    from pie.cli.doctor_cmd import _tensor_parallel
    from pie.config import load_or_default
    from pie.drivers.tp import layout_estimate
    from pie.paths import embedded_model_dir

    whole = layout_estimate(str(embedded_model_dir()), 1, "float32")[0]
    halves = layout_estimate(str(embedded_model_dir()), 2, "float32")
    assert halves[0]["weights_bytes"] == halves[1]["weights_bytes"] < whole["weights_bytes"]
    assert halves[0]["kv_page_bytes"] * 2 == whole["kv_page_bytes"]
    cfg = tmp_path / "config.toml"
    model = '[[model]]\nname = "{}"\nhf_repo = "pie/embedded-default"\n[model.driver]\ntype = "dev"\n'
    cfg.write_text(
        model.format("two") + 'device = ["cpu", "cpu"]\ntensor_parallel_size = 2\n'
        + model.format("four") + 'device = ["cpu", "cpu", "cpu", "cpu"]\ntensor_parallel_size = 4\n'
    )  # fmt: skip
    config, _ = load_or_default(str(cfg))
    two, four = _tensor_parallel(config)
    assert two.ok and "2 ranks" in two.detail and "rank 1 cpu: weights" in two.detail
    assert not four.ok and "num_attention_heads = 6 is not divisible by tensor_parallel_size 4" in four.detail


@pytest.mark.parametrize("arch", FAMILIES)
def test_tp2_matches_tp1(arch, checkpoints, references, group):
    executor = group.build(spec(checkpoints[arch], 2))
    try:
        assert executor.capabilities.extra["tensor_parallel_size"] == 2
        logits, tokens = run_steps(executor)
    finally:
        executor.close()
    ref_logits, ref_tokens = references[arch]
    for step, (a, b) in enumerate(zip(logits, ref_logits, strict=True)):
        diff = float(np.abs(a - b).max())
        assert diff <= ATOL, f"{arch} step {step}: max |logit diff| {diff:.2e} > {ATOL}"
    for step, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)):
        assert np.array_equal(a, b), f"{arch} step {step}: greedy tokens {a} != tp 1's {b}"


def test_page_bytes_are_the_ranks_slices(checkpoints, group):
    """A page read at tp 2 has tp 1's size; written to another page and read back, it is unchanged, and
    decoding from the copy gives the original's logits (each rank got its own slice back)."""
    path = checkpoints["llama"]
    executor = group.build(spec(path, 2))
    try:
        caps = executor.capabilities
        seqs = PagedSeqs(PAGES, PAGE)
        executor.execute(make_batch([seqs.request(0, list(range(5, 9)))], PAGE))  # fills one page
        page = seqs.pages[0][0]
        data = executor.page_ops(PageOps(read=np.array([page], np.int32))).data
        assert data.shape == (1, caps.page_nbytes) and data.any()
        free = next(p for p in range(PAGES) if p != page)
        executor.page_ops(PageOps(write=np.array([free], np.int32), write_data=data))
        back = executor.page_ops(PageOps(read=np.array([free], np.int32))).data
        assert np.array_equal(back, data)
        # the same next-token logits from the original page and from the written copy
        probe = [dict(token_ids=[3], positions=[4], pages=[p, seqs.free[0]], last_page_len=1, outputs=[0],
                      return_logits=True) for p in (page, free)]  # fmt: skip
        a = executor.execute(make_batch(probe[:1], PAGE)).logits
        b = executor.execute(make_batch(probe[1:], PAGE)).logits
        assert np.abs(a - b).max() <= ATOL
    finally:
        executor.close()


def test_page_nbytes_match_tp1(checkpoints, references, group):
    """The KV fingerprint says tp 2 (pages are not interchangeable with tp 1's), page_nbytes is the whole
    page (every rank's KV heads)."""
    path = checkpoints["qwen3"]
    executor = group.build(spec(path, 2))
    try:
        caps = executor.capabilities
        # tiny: 2 KV heads of 16, 2 layers, page 4, fp32: 2 * 4 * 2 * 16 * 4 * 2 layers
        assert caps.page_nbytes == 2 * PAGE * 2 * 16 * 4 * 2
        assert "tp2" in caps.kv_fingerprint
        layout = caps.extra["tp_layout"]
        assert [r["rank"] for r in layout] == [0, 1] and layout[0]["weights_bytes"] == layout[1][
            "weights_bytes"
        ]
    finally:
        executor.close()


def test_dev_driver_runs_tp2(checkpoints):
    """The dev driver's child is rank 0 of its own group; shutdown leaves no rank behind."""
    from pie.drivers.dev.client import DevDriver

    async def go():
        driver = DevDriver(spec(checkpoints["qwen3"], 2), ready_timeout_s=120, shutdown_timeout_s=20)
        caps = await driver.start()
        try:
            assert caps.extra["tensor_parallel_size"] == 2 and caps.device == "cpu,cpu"
            seqs = PagedSeqs(caps.num_pages, PAGE)
            res = await driver.forward(make_batch([seqs.request(0, list(range(5, 14)))], PAGE))
            assert res.tokens.shape == (9,)
        finally:
            await driver.shutdown()

    asyncio.run(go())


def test_sharding_arithmetic():
    from pie.layers.parallel import divide, kv_head_start, kv_heads_per_rank, kv_replicas

    assert [kv_head_start(8, 4, r) for r in range(4)] == [0, 2, 4, 6] and kv_heads_per_rank(8, 4) == 2
    # fewer KV heads than ranks: replicated beside the query heads that read them
    assert kv_heads_per_rank(2, 4) == 1 and [kv_head_start(2, 4, r) for r in range(4)] == [0, 0, 1, 1]
    assert kv_replicas(2, 4) == 2 and kv_replicas(8, 4) == 1
    with pytest.raises(
        ValueError, match="num_key_value_heads = 3 is not divisible by tensor_parallel_size 2"
    ):
        kv_heads_per_rank(3, 2)
    with pytest.raises(ValueError, match="must be a multiple of the KV head count"):
        kv_heads_per_rank(3, 4)
    with pytest.raises(ValueError, match="intermediate_size = 10 is not divisible by tensor_parallel_size 4"):
        divide(10, 4, "intermediate_size")


def test_tp_problem_messages(checkpoints):
    from pie.drivers.executor import tensor_parallel_problem
    from pie.models.config import read_model_config
    from pie.models.registry import get_model_class

    cfg = read_model_config(checkpoints["llama"])  # 4 heads, 2 KV heads, intermediate 128
    cls = get_model_class(cfg.model_type)
    assert tensor_parallel_problem(cfg, cls, 2) is None and tensor_parallel_problem(cfg, cls, 4) is None
    assert "num_attention_heads = 4 is not divisible by tensor_parallel_size 3" in tensor_parallel_problem(
        cfg, cls, 3
    )
    gemma4 = get_model_class("gemma4_text")
    assert "does not support tensor parallelism" in tensor_parallel_problem(cfg, gemma4, 2)


def test_killed_rank_fails_with_a_clear_error(checkpoints, group):
    """SIGKILL on rank 1: the next pass fails within seconds with a DriverError naming the rank, later
    calls fail the same way, and closing does not hang. It ends the shared group: keep it the file's last
    test (a process joins one group at a time, so no other group can form here while it lives)."""
    executor = group.build(spec(checkpoints["llama"], 2))
    executor.owns_group = True  # closing the executor closes the (failed) group
    try:
        seqs = PagedSeqs(PAGES, PAGE)
        executor.execute(make_batch([seqs.request(0, list(range(5, 12)))], PAGE))
        worker = executor.group.workers[0]
        os.kill(worker.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(DriverError, match=r"tensor-parallel rank 1 \(cpu\) was killed by signal 9"):
            executor.execute(make_batch([seqs.request(0, [3])], PAGE))
        assert time.monotonic() - t0 < 20
        with pytest.raises(DriverError, match="rank 1"):
            executor.execute(make_batch([seqs.request(0, [4])], PAGE))
    finally:
        t0 = time.monotonic()
        executor.close()
        assert time.monotonic() - t0 < 20
