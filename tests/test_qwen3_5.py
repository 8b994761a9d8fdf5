"""Qwen 3.5 (hybrid: Gated DeltaNet + gated attention) against HF transformers on tiny random checkpoints
(fp32, CPU, torch attention backend), at the executor: logits of batched prefill and paged decode, greedy
generation, concurrency, state-slot copies, and the errors for what recurrent layers cannot honour.

The runtime side (state slots owned by sequences, fork, snapshots, preemption, `pie run`) is in
tests/test_qwen3_5_runtime.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_parity_hf import (
    PagedSeqs,
    assert_greedy_matches_generate,
    hf_logits,
    make_executor,
    paged_prefill_decode,
    split_rows,
)
from tiny_models import HYBRID_ARCHS

from pie.drivers.kv_plan import kv_layer_groups, page_bytes
from pie.drivers.protocol import BatchError, PageOps, make_batch
from pie.layers.gated_deltanet import chunk_gated_delta_rule, l2norm, recurrent_step
from pie.models.config import read_model_config
from pie.models.hub import inspect_dir

# fp32 tolerance of this family: transformers' own fp32 logits differ from its fp64 ones by up to 1.9e-4 on
# these tiny checkpoints (the delta rule's triangular solves amplify rounding), so pie's fp32 is held to 2e-4
# of transformers' fp32 rather than the 1e-4 of the attention-only families
ATOL = 2e-4
# 17 and 70 cross page boundaries at page size 16; 70 crosses the delta rule's 64-token chunk
LENGTHS = (5, 17, 70)


def _prompts(vocab: int, seed: int = 7, lengths=LENGTHS) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    err = float(np.abs(ours - ref).max())
    assert err <= ATOL, f"max abs logit diff {err:.3g} > {ATOL}"


def test_config_layers_and_kv(tiny_checkpoint):
    cfg = read_model_config(tiny_checkpoint("qwen3_5_text"))
    assert [layer.mixer for layer in cfg.layers] == ["gated_deltanet", "gated_deltanet", "attention"] * 2
    assert cfg.recurrent_layers == (0, 1, 3, 4)
    assert cfg.rope.rotary_dim(cfg.head_dim) == 8  # partial_rotary_factor 0.5 of 16
    g = cfg.gated_deltanet
    assert (g.num_k_heads, g.num_v_heads, g.head_k_dim, g.head_v_dim, g.conv_kernel) == (2, 4, 16, 8, 4)
    # only the two attention layers have KV pages
    assert kv_layer_groups(cfg) == [((2, 16), [2, 5])]
    assert page_bytes(cfg, 16, torch.float32) == 2 * (2 * 16 * 2 * 16 * 4)


@pytest.mark.parametrize("arch", HYBRID_ARCHS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_prefill_and_paged_decode_match_hf(tiny_checkpoint, arch, page_size):
    path = tiny_checkpoint(arch)
    ex = make_executor(path, page_size, num_pages=200 if page_size == 1 else 16)
    assert ex.kv_caches[0] is None and ex.kv_caches[2] is not None
    got, tokens = paged_prefill_decode(ex, _prompts(ex.model_config.vocab_size), page_size)
    for i in range(3):
        assert_close(got[i], hf_logits(path, tokens[i]))


@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_greedy_32_tokens_match_hf_generate(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    ex = make_executor(path, 3)  # odd page size: decode steps cross page boundaries often
    prompts = _prompts(ex.model_config.vocab_size, seed=3, lengths=(4, 19, 33))
    assert_greedy_matches_generate(ex, path, prompts, 3, n=32)


def _greedy(ex, seqs: PagedSeqs, prompts: dict[int, list[int]], n: int) -> dict[int, list[int]]:
    """n greedy tokens of each prompt (sid -> prompt), all sequences in every batch."""
    batch = make_batch([seqs.request(s, p) for s, p in prompts.items()], seqs.page_size)
    res = ex.execute(batch)
    out = {s: [int(r[-1])] for s, r in zip(prompts, np.split(res.tokens, batch.qo_indptr[1:-1]), strict=True)}
    for _ in range(n - 1):
        batch = make_batch([seqs.request(s, out[s][-1:]) for s in prompts], seqs.page_size)
        for s, t in zip(prompts, ex.execute(batch).tokens, strict=True):
            out[s].append(int(t))
    return out


def test_eight_concurrent_sequences_equal_one_at_a_time(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_5_text")
    ex = make_executor(path, 4, num_pages=300)
    prompts = dict(enumerate(_prompts(400, seed=11, lengths=(3, 9, 14, 21, 30, 2, 41, 16))))
    together = _greedy(ex, PagedSeqs(ex.num_pages, 4, seed=1), prompts, 12)
    alone = {}
    for s, p in prompts.items():  # slot s reused after a fresh start: the old state must not leak in
        alone.update(_greedy(ex, PagedSeqs(ex.num_pages, 4, seed=s), {s: p}, 12))
    assert together == alone


def test_state_copy_continues_identically(tiny_checkpoint):
    """A sequence's KV pages and its state slot copied (what a fork does): both copies decode the same
    tokens, equal to the original continuing alone."""
    path = tiny_checkpoint("qwen3_5_text")
    ex = make_executor(path, 4, num_pages=64)
    seqs = PagedSeqs(ex.num_pages, 4)
    prompt = _prompts(400, seed=5, lengths=(13,))[0]
    first = _greedy(ex, seqs, {0: prompt}, 1)[0][0]
    # child 1: copies of sequence 0's pages and state slot (its partial last page included)
    pages = seqs.pages[0]
    child = [seqs.free.pop() for _ in pages]
    ex.page_ops(
        PageOps(
            copy=np.array(list(zip(pages, child, strict=True)), np.int32),
            state_copy=np.array([[0, 1]], np.int32),
        )
    )
    seqs.pages[1], seqs.lens[1] = child, seqs.lens[0]
    both = {0: [first], 1: [first]}
    for _ in range(10):
        batch = make_batch([seqs.request(s, both[s][-1:]) for s in (0, 1)], 4)
        for s, t in zip((0, 1), ex.execute(batch).tokens, strict=True):
            both[s].append(int(t))
    assert both[0] == both[1]
    ref = hf_model_greedy(path, prompt, 11)
    assert both[0] == ref


def hf_model_greedy(path, prompt: list[int], n: int) -> list[int]:
    from test_parity_hf import hf_model

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model(path).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def test_state_read_write_round_trip(tiny_checkpoint):
    """A slot's bytes read and written into another slot continue like the original (disk snapshots)."""
    ex = make_executor(tiny_checkpoint("qwen3_5_text"), 16, num_pages=16)
    seqs = PagedSeqs(ex.num_pages, 16)
    ex.execute(make_batch([seqs.request(0, [5, 6, 7, 8, 9])], 16))
    data = ex.page_ops(PageOps(state_read=np.array([0], np.int32))).state_data
    assert data.shape == (1, ex.capabilities.state_nbytes) and data.any()
    ex.page_ops(PageOps(state_write=np.array([3], np.int32), state_write_data=data))
    again = ex.page_ops(PageOps(state_read=np.array([3], np.int32))).state_data
    assert np.array_equal(again, data)


def test_capabilities_name_the_state_pool(tiny_checkpoint):
    caps = make_executor(tiny_checkpoint("qwen3_5_text"), 16, num_pages=8).capabilities
    assert caps.num_state_slots == 128 and caps.state_nbytes == 4 * (
        96 * 3 * 4 + 4 * 16 * 8 * 4
    )  # conv_dim 2 * 32 + 32


def test_what_recurrent_layers_cannot_honour_fails_clearly(tiny_checkpoint):
    ex = make_executor(tiny_checkpoint("qwen3_5_text"), 16, num_pages=16)
    seqs = PagedSeqs(ex.num_pages, 16)
    req = seqs.request(0, [1, 2, 3])
    req["mask"] = np.tril(np.ones((3, 3), dtype=bool))
    with pytest.raises(BatchError, match="custom attention masks cannot be honoured"):
        ex.execute(make_batch([req], 16))
    with pytest.raises(BatchError, match="positions must be consecutive"):
        ex.execute(make_batch([seqs.request(1, [1, 2, 3], positions=[0, 1, 5])], 16))
    req = seqs.request(2, [1, 2])
    del req["state_slot"]
    with pytest.raises(BatchError, match="must name each request's state_slots"):
        ex.execute(make_batch([req], 16))
    a, b = seqs.request(3, [1]), seqs.request(4, [2])
    b["state_slot"] = 3
    with pytest.raises(BatchError, match="same state slot"):
        ex.execute(make_batch([a, b], 16))
    with pytest.raises(BatchError, match="state_copy"):
        ex.page_ops(PageOps(state_copy=np.array([[0, 500]], np.int32)))


def test_chunked_rule_equals_the_recurrence():
    """The chunked (prefill) form equals token-by-token steps, from a non-zero state, across chunks."""
    gen = torch.Generator().manual_seed(0)
    H, T, dk, dv = 3, 150, 8, 5
    q = l2norm(torch.randn(H, T, dk, generator=gen)) * dk**-0.5
    k = l2norm(torch.randn(H, T, dk, generator=gen))
    v = torch.randn(H, T, dv, generator=gen)
    g = -torch.rand(H, T, generator=gen)
    beta = torch.rand(H, T, generator=gen)
    s0 = torch.randn(H, dk, dv, generator=gen)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, s0, chunk=16)
    state, outs = s0[None], []
    for t in range(T):
        ot, state = recurrent_step(
            q[None, :, t], k[None, :, t], v[None, :, t], g[None, :, t], beta[None, :, t], state
        )
        outs.append(ot[0])
    assert torch.allclose(o, torch.stack(outs, dim=1), atol=1e-5)
    assert torch.allclose(s, state[0], atol=1e-5)


def test_wrapper_loads_text_tower_only(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_5")
    cfg = read_model_config(path)
    assert cfg.model_type == "qwen3_5" and cfg.num_layers == 6
    ex = make_executor(path, 4)
    assert not any("visual" in n for n, _ in ex.model.named_parameters())
    row = inspect_dir("qwen3_5", "local", path)  # `pie model list` marks the wrapper supported
    assert row.supported and row.model_type == "qwen3_5" and row.drivers


def test_logits_of_one_request_split_over_passes(tiny_checkpoint):
    """A prompt prefilled in three passes (chunked prefill) equals one pass: the state carries over."""
    path = tiny_checkpoint("qwen3_5_text")
    ex = make_executor(path, 4, num_pages=64)
    prompt = _prompts(400, seed=9, lengths=(40,))[0]
    seqs = PagedSeqs(ex.num_pages, 4)
    rows = []
    for lo, hi in ((0, 7), (7, 8), (8, 40)):
        batch = make_batch([seqs.request(0, prompt[lo:hi])], 4)
        rows += split_rows(ex.execute(batch), batch)
    assert_close(np.concatenate(rows), hf_logits(path, prompt))


def test_decode_graph_runner_without_capture_equals_eager(tiny_checkpoint):
    """The CUDA-graph decode path (static slot and fresh-flag buffers, padding rows on a scratch slot), run
    with capture off on CPU, gives the eager executor's logits; a sequence whose first pass is one token
    (fresh state) rides in a decode batch."""
    from pie.attention.torch_backend import TorchBackend
    from pie.drivers.cuda_graphs import DecodeGraphRunner
    from pie.drivers.executor import ModelExecutor
    from pie.drivers.spec import ExecutorSpec
    from pie.drivers.state_pool import StatePool

    path, ps, N, cpu = tiny_checkpoint("qwen3_5_text"), 4, 128, torch.device("cpu")

    def make():
        return ModelExecutor(
            ExecutorSpec(model_path=str(path), page_size=ps, num_pages=N + 1, attention_backend="torch")
        )

    eager, graphed = make(), make()
    cfg = graphed.model_config
    graphed.state_pool = pool = StatePool(cfg, 16, torch.float32, cpu, scratch=1)
    graphed.graphs = runner = DecodeGraphRunner(
        graphed.model,
        graphed.kv_caches,
        lambda B, P: TorchBackend(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, ps, torch.float32, cpu),
        page_size=ps, scratch_page=N, max_batch_size=16, max_position=cfg.max_position_embeddings,
        device=cpu, capture=False, state_pool=pool,
    )  # fmt: skip
    pool.delta[pool.scratch_slot] = 7.0  # a sentinel: only padding rows may touch the scratch slot
    seqs = PagedSeqs(N, ps, seed=4)
    prompts = _prompts(400, seed=2, lengths=(3, 9, 20))
    batch = make_batch([seqs.request(i, p) for i, p in enumerate(prompts)], ps)
    want, got = eager.execute(batch), graphed.execute(batch)
    assert runner.stats.replays == 0
    last = {i: int(t[-1]) for i, t in enumerate(np.split(want.tokens, batch.qo_indptr[1:-1]))}
    last[9] = 17  # sequence 9 starts with a one-token pass inside a decode batch
    for step, sids in enumerate([[0], [0, 1, 2], [0, 1, 2, 9], [1, 9], [0, 1, 2, 9]]):
        batch = make_batch([seqs.request(s, [last[s]]) for s in sids], ps)
        want, got = eager.execute(batch), graphed.execute(batch)
        assert runner.stats.replays == step + 1
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=0)
        last.update({s: int(t) for s, t in zip(sids, want.tokens, strict=True)})
    assert sorted(runner.stats.captured) == [1, 2, 4] and not (pool.delta[pool.scratch_slot] == 7.0).all()
    np.testing.assert_allclose(pool.delta[:16].numpy(), eager.state_pool.delta[:16].numpy(), atol=1e-5)


def test_bench_config_and_floors_of_the_real_shape():
    """The bundled Qwen3.5-0.8B text config: pie's normalization, transformers' parameter count (752,393,024,
    measured on the meta device) from the floors' formula, attention-only KV and the state traffic."""
    from pie.bench import load_model_config
    from pie.bench.floors import kv_bytes_per_token, param_counts, recurrent_state_bytes
    from pie.models.config import ModelConfig

    cfg, _ = load_model_config("qwen3.5-0.8b")
    mc = ModelConfig.from_hf(cfg)
    assert len(mc.recurrent_layers) == 18 and mc.rope.rotary_dim(mc.head_dim) == 64
    assert param_counts(cfg).total == 752_393_024
    assert kv_bytes_per_token(cfg) == 2 * 6 * 2 * 256 * 2  # 6 attention layers, 2 KV heads of 256, bf16
    assert recurrent_state_bytes(cfg) == 18 * (6144 * 3 * 2 + 16 * 128 * 128 * 4)


def test_state_ops_and_slots_cross_the_dev_wire():
    """The dev driver's channel carries state slots, state ops and state bytes (to_wire / from_wire)."""
    from pie.drivers.protocol import ForwardBatch, PageOpsResult

    ops = PageOps(
        state_copy=np.array([[0, 3]], np.int32),
        state_write=np.array([5], np.int32),
        state_read=np.array([3, 5], np.int32),
        state_write_data=np.arange(8, dtype=np.uint8).reshape(1, 8),
    )
    back = PageOps.from_wire(ops.to_wire())
    for name in ("state_copy", "state_write", "state_read", "state_write_data"):
        assert np.array_equal(getattr(back, name), getattr(ops, name))
    res = PageOpsResult.from_wire(PageOpsResult(state_data=np.ones((2, 8), np.uint8)).to_wire())
    assert res.data is None and res.state_data.shape == (2, 8)
    batch = make_batch([PagedSeqs(8, 4).request(6, [1, 2])], 4)
    assert ForwardBatch.from_wire(batch.to_wire()).state_slots.tolist() == [6]
