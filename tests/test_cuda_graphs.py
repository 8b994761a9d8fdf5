"""CUDA-graph decode (pie.drivers.cuda_graphs).

CPU: bucketing, padding and eligibility (pure host logic); the FlashInfer graph-wrapper arguments against
0.6.3's signature; the runner with capture off (same static buffers, padding and scratch page, eager
forward) against the plain executor; the flag plumbing (executor, factory, bench).

GPU (marked `gpu`, skipped without CUDA; without FlashInfer they skip too unless PIE_REQUIRE_FLASHINFER=1,
where they fail): graph-mode decode against the eager executor on the same inputs, bf16, FlashInfer, for the
CUDA-core (GQA group 2) and tensor-core (group 4) decode kernels. Tolerance: the two paths run the same
kernels except that padding changes the matmuls' M and graph-mode FlashInfer always splits the KV, so
logits may differ by a bf16 ulp or two (0.016-0.03 at these magnitudes): cosine >= 0.9999 per row, and the
same argmax wherever the eager top-2 margin exceeds MARGIN = 0.125. A wrong row, page, slot or stale buffer
breaks rows far beyond that. With PIE_PARITY_LOG set, each comparison's min cosine and max |diff| is appended
to that file (as tests/test_gpu.py does).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os

import numpy as np
import pytest
import torch
from gpu_marks import HAS_CUDA, HAS_FLASHINFER, MUST_FLASHINFER, needs_cuda, needs_flashinfer  # noqa: F401
from test_moe_gpu import FAMILIES

from pie.attention.base import AttentionMetadata
from pie.attention.flashinfer_backend import graph_decode_wrapper_kwargs, graph_workspace_bytes
from pie.attention.torch_backend import TorchBackend
from pie.bench.runner import BenchOptions, decode_batch, executor_spec
from pie.drivers.cuda_graphs import (
    DEFAULT_BUCKETS,
    MAX_PAGE_INDICES,
    DecodeGraphRunner,
    bucket_for,
    decode_buckets,
    flashinfer_graph_runner,
    ineligible_reason,
    pad_decode,
)
from pie.drivers.executor import ModelExecutor
from pie.drivers.protocol import BatchError, ForwardBatch, make_batch
from pie.drivers.spec import ExecutorSpec


class Seqs:
    """Test-side paging: pages from a shuffled pool of `num_pages`; request() appends tokens to a sequence."""

    def __init__(self, num_pages: int, page_size: int, seed: int) -> None:
        self.ps, self.free = page_size, [int(p) for p in np.random.default_rng(seed).permutation(num_pages)]
        self.pages: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def request(self, sid: int, ids, output: bool = True, **sampler) -> dict:
        old = self.lens.get(sid, 0)
        new = old + len(ids)
        pages = self.pages.setdefault(sid, [])
        while len(pages) * self.ps < new:
            pages.append(self.free.pop())
        self.lens[sid] = new
        outs = list(range(len(ids))) if output else []
        return dict(token_ids=[int(t) for t in ids], positions=list(range(old, new)), pages=list(pages),
                    last_page_len=new - (len(pages) - 1) * self.ps, outputs=outs, return_logits=True,
                    **sampler)  # fmt: skip


# Prompt lengths around page boundaries (page sizes 4 and 16 below): decode steps cross them.
PROMPTS = [14, 15, 16, 17, 31, 32, 33, 1, 2, 5, 47, 48, 63, 64, 8, 20, 3]


# ---- pure host logic -------------------------------------------------------------------------------


def test_decode_buckets():
    assert decode_buckets(512) == DEFAULT_BUCKETS
    assert decode_buckets(4096) == DEFAULT_BUCKETS  # larger batches run eagerly
    assert decode_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert decode_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert decode_buckets(1) == (1,)
    with pytest.raises(ValueError):
        decode_buckets(0)


@pytest.mark.parametrize(
    "n,b", [(1, 1), (2, 2), (3, 4), (17, 32), (64, 64), (65, 128), (512, 512), (513, None)]
)
def test_bucket_for(n, b):
    assert bucket_for(n, DEFAULT_BUCKETS) == b


def _decode_batch(R: int, page_size: int, num_pages: int, seed: int) -> ForwardBatch:
    rng = np.random.default_rng(seed)
    seqs = Seqs(num_pages, page_size, seed)
    reqs = []
    for r in range(R):
        seqs.request(r, [0] * int(rng.integers(1, 40)))  # existing KV
        reqs.append(seqs.request(r, [int(rng.integers(0, 300))], output=bool(r % 3)))
    return make_batch(reqs, page_size)


@pytest.mark.parametrize("R,B", [(1, 1), (3, 4), (17, 32), (5, 5)])
def test_pad_decode_matches_the_metadata_and_is_a_valid_batch(R, B):
    ps, N = 4, 200
    batch = _decode_batch(R, ps, N, seed=R)
    p = pad_decode(batch, B, ps, scratch_page=N)
    meta = AttentionMetadata.from_batch(batch, ps, torch.device("cpu"))
    assert np.array_equal(p.append_pages[:R], meta.append_pages.numpy())
    assert np.array_equal(p.append_offsets[:R], meta.append_offsets.numpy())
    assert np.array_equal(p.kv_lens[:R], meta.kv_lens_host)
    assert np.array_equal(p.input_ids[:R], batch.token_ids) and np.array_equal(
        p.positions[:R], batch.positions
    )
    # padding rows: one-token requests on slot 0 of the scratch page
    assert (p.append_pages[R:] == N).all() and (p.append_offsets[R:] == 0).all()
    assert (p.input_ids[R:] == 0).all() and (p.positions[R:] == 0).all() and (p.kv_lens[R:] == 1).all()
    shapes = [a.shape for a in (p.input_ids, p.positions, p.append_pages, p.append_offsets, p.kv_lens)]
    assert shapes == [(B,)] * 5 and p.kv_page_indptr.shape == (B + 1,)
    padded = make_batch([dict(token_ids=[int(t)], positions=[int(x)], pages=p.kv_page_indices[a:b].tolist(),
                              last_page_len=int(last)) for t, x, a, b, last in
                         zip(p.input_ids, p.positions, p.kv_page_indptr[:-1], p.kv_page_indptr[1:],
                             p.kv_last_page_len, strict=True)], ps)  # fmt: skip
    padded.validate(ps, N + 1)  # a valid batch over num_pages + 1 pages
    with pytest.raises(BatchError, match="out of range") if B > R else contextlib.nullcontext():
        padded.validate(ps, N)  # ... that names the scratch page exactly when it is padded
    assert np.array_equal(AttentionMetadata.from_batch(padded, ps, torch.device("cpu")).append_pages.numpy(),
                          p.append_pages)  # fmt: skip


def test_ineligible_reasons():
    ps, cap = 4, (lambda B: B * 10)
    buckets = decode_buckets(32)
    assert ineligible_reason(_decode_batch(17, ps, 200, 0), buckets, cap) is None
    seqs = Seqs(200, ps, 1)
    prefill = make_batch([seqs.request(0, [1, 2, 3])], ps)
    assert "more than one new token" in ineligible_reason(prefill, buckets, cap)
    mixed = make_batch([seqs.request(0, [4]), seqs.request(1, [5, 6])], ps)
    assert "more than one new token" in ineligible_reason(mixed, buckets, cap)
    masked = make_batch([dict(seqs.request(0, [7]), mask=np.ones((1, 5), bool))], ps)
    assert "custom mask" in ineligible_reason(masked, buckets, cap)
    assert "exceed the largest" in ineligible_reason(_decode_batch(33, ps, 400, 2), buckets, cap)
    assert "KV page indices exceed" in ineligible_reason(_decode_batch(3, ps, 200, 3), buckets, lambda B: 4)
    # what `pie bench` feeds the executor is eligible
    bench = decode_batch(
        np.full(64, 129), pages_per_seq=5, page_size=32, vocab=300, rng=np.random.default_rng(0)
    )
    assert ineligible_reason(bench, decode_buckets(256), lambda B: B * 5) is None


def test_graph_workspace_bytes():
    # Llama-3.1-8B (32 q / 8 kv heads, D 128, tensor cores) on an H100 (132 SMs): padded grid
    # max(264 // 8, ceil(512 * 4 / 16) + 511) = 639 tiles of 16 rows -> beyond the 128 MiB default
    assert graph_workspace_bytes(32, 8, 128, 512, True, 132) == 32 * 639 * 16 * 129 * 4 + (1 << 20)
    assert graph_workspace_bytes(32, 8, 128, 512, True, 132) > 128 << 20
    assert graph_workspace_bytes(32, 8, 128, 256, True, 132) < 128 << 20
    assert graph_workspace_bytes(32, 8, 128, 1, True, 132) == 32 * 33 * 16 * 129 * 4 + (1 << 20)
    # CUDA-core decode: at most 32 resident blocks per SM bound the split grid
    assert graph_workspace_bytes(16, 8, 128, 512, False, 132) == 16 * (32 * 132 // 8) * 129 * 4 + (1 << 20)


def fi_decode_wrapper_init(
    float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
    paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None,
    backend="auto", jit_args=None,
):  # fmt: skip
    """BatchDecodeWithPagedKVCacheWrapper.__init__ of FlashInfer 0.6.3 (flashinfer/decode.py), body omitted."""


def test_graph_wrapper_kwargs_bind_to_flashinfer_063():
    ws, ip, ix, lp = torch.zeros(8, dtype=torch.uint8), torch.zeros(5), torch.zeros(40), torch.zeros(4)
    kw = graph_decode_wrapper_kwargs(ws, True, ip, ix, lp)
    bound = inspect.signature(fi_decode_wrapper_init).bind(**kw).arguments
    assert bound["use_cuda_graph"] is True and bound["use_tensor_cores"] is True and bound["backend"] == "fa2"
    assert bound["kv_layout"] == "NHD" and bound["paged_kv_indices_buffer"] is ix
    # graph mode takes the batch size from these buffers: last_page_len [B], indptr [B + 1]
    assert bound["paged_kv_indptr_buffer"].numel() == bound["paged_kv_last_page_len_buffer"].numel() + 1


# ---- the runner with capture off, on CPU -----------------------------------------------------------


def _cpu_pair(path, ps: int, N: int):
    """Two identical fp32 CPU executors with N + 1 pages; the second decodes through a runner (capture off)
    whose scratch page is N (no batch names it)."""

    def make():
        return ModelExecutor(
            ExecutorSpec(model_path=str(path), page_size=ps, num_pages=N + 1, attention_backend="torch")
        )

    eager, graphed = make(), make()
    cfg = graphed.model_config
    runner = DecodeGraphRunner(
        graphed.model,
        graphed.kv_caches,
        lambda B, P: TorchBackend(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, ps, torch.float32, torch.device("cpu")),
        page_size=ps, scratch_page=N, max_batch_size=32, max_position=cfg.max_position_embeddings,
        device=torch.device("cpu"), capture=False,
    )  # fmt: skip
    graphed.graphs = runner
    return eager, graphed, runner


def test_runner_without_capture_equals_the_eager_executor(tiny_checkpoint):
    ps, N = 4, 256
    eager, graphed, runner = _cpu_pair(tiny_checkpoint("qwen3"), ps, N)
    V, rng = eager.model_config.vocab_size, np.random.default_rng(0)
    seqs = Seqs(N, ps, seed=0)
    graphed.kv_cache[:, N] = 7.0  # a sentinel: padding rows write slot 0 of the scratch page only
    prompts = [rng.integers(0, V, n).tolist() for n in PROMPTS]
    batch = make_batch([seqs.request(i, p, output=False) for i, p in enumerate(prompts)], ps)
    eager.execute(batch), graphed.execute(batch)
    assert runner.stats.replays == 0  # prefill: eager
    last = [int(rng.integers(V)) for _ in PROMPTS]
    steps = 0
    for R in (1, 3, 17, 3, 17, 1):  # buckets 1, 4, 32, replayed again after re-plans
        for rnd in range(2):
            reqs = [seqs.request(i, [last[i]]) for i in range(R)]
            if R == 17 and rnd == 0:  # outputs for some rows only, and seeded sampling on others
                reqs = [dict(r, outputs=[] if i % 4 == 1 else [0], temperature=0.9 if i % 2 else 0.0,
                             seed=1000 + i, top_k=50) for i, r in enumerate(reqs)]  # fmt: skip
            batch = make_batch(reqs, ps)
            want, got = eager.execute(batch), graphed.execute(batch)
            steps += 1
            assert runner.stats.replays == steps
            np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=0)
            assert np.array_equal(got.tokens, want.tokens)
            for i, tok in zip(np.flatnonzero([bool(r["outputs"]) for r in reqs]), want.tokens, strict=True):
                last[i] = int(tok)
    assert sorted(runner.stats.captured) == [1, 4, 32] and runner.stats.disabled is None
    # a mixed batch (decode + prefill) in the same executor runs eagerly, and right
    batch = make_batch([seqs.request(0, [last[0]]), seqs.request(20, [5, 6, 7])], ps)
    want, got = eager.execute(batch), graphed.execute(batch)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=0)
    assert runner.stats.replays == steps and runner.stats.eager_decode == 0
    # the same KV in every real page; padding wrote slot 0 of the scratch page, nothing else
    np.testing.assert_allclose(graphed.kv_cache[:, :N], eager.kv_cache[:, :N], atol=1e-5, rtol=0)
    scratch = graphed.kv_cache[:, N]  # [L, 2, ps, Hkv, D]
    assert (scratch[:, :, 0] != 7.0).all() and (scratch[:, :, 1:] == 7.0).all()


def test_page_capacity(tiny_checkpoint):
    ex = ModelExecutor(ExecutorSpec(model_path=str(tiny_checkpoint("llama")), page_size=4, num_pages=9))

    def runner(num_pages: int, max_position: int, page_size: int = 4) -> DecodeGraphRunner:
        return DecodeGraphRunner(ex.model, ex.kv_caches, None, page_size=page_size, scratch_page=num_pages,
                                 max_batch_size=8, max_position=max_position, device=torch.device("cpu"),
                                 capture=False)  # fmt: skip

    assert runner(1000, 512).page_capacity(8) == 8 * 128  # 8 requests of max_position tokens
    assert runner(100, 512).page_capacity(8) == 8 * 100  # each naming at most every page once
    assert runner(10**9, 2**20, page_size=1).page_capacity(8) == MAX_PAGE_INDICES  # hard cap


def test_runner_refuses_and_counts_large_decode_batches(tiny_checkpoint):
    ps, N = 4, 400
    eager, graphed, runner = _cpu_pair(tiny_checkpoint("llama"), ps, N)
    batch = _decode_batch(33, ps, N, seed=4)  # > the 32 of max_batch_size
    assert not runner.accepts(batch) and runner.stats.eager_decode == 1
    np.testing.assert_allclose(graphed.execute(batch).logits, eager.execute(batch).logits, atol=1e-4, rtol=0)
    assert runner.stats.replays == 0 and "exceed the largest" in runner.stats.last_refusal


def test_runner_plans_the_flashinfer_graph_wrapper_with_the_padded_batch(tiny_checkpoint):
    """FlashInferDecodeGraph.plan as the runner drives it, its wrapper replaced by a recorder that binds
    FlashInfer 0.6.3's plan signature (attention output is garbage here; only the plan arguments count)."""
    from test_flashinfer_plan import fi_decode_plan

    from pie.attention.base import AttentionBackend
    from pie.attention.flashinfer_backend import FlashInferDecodeGraph

    class Recorder:
        def __init__(self):
            self.calls = []

        def plan(self, *a, **k):
            self.calls.append(inspect.signature(fi_decode_plan).bind(*a, **k).arguments)

        def run(self, q, kv):
            return q.clone()

    made: dict = {}

    def make_attention(B: int, max_pages: int):
        attn = object.__new__(FlashInferDecodeGraph)
        AttentionBackend.__init__(attn, 4, 2, 16, 4, torch.bfloat16, torch.device("cpu"))
        attn.batch_size, attn._wrappers = B, {attn.default_params: Recorder()}
        attn.kv_indptr, attn.kv_last_page_len = (
            torch.zeros(B + 1, dtype=torch.int32),
            torch.ones(B, dtype=torch.int32),
        )
        attn.kv_indices = torch.zeros(max_pages, dtype=torch.int32)
        made[B] = attn
        return attn

    ps, N = 4, 200
    ex = ModelExecutor(ExecutorSpec(model_path=str(tiny_checkpoint("llama")), page_size=ps, num_pages=N + 1,
                                    attention_backend="torch"))  # fmt: skip
    runner = DecodeGraphRunner(ex.model, ex.kv_caches, make_attention, page_size=ps, scratch_page=N,
                               max_batch_size=64, max_position=512, device=torch.device("cpu"), capture=False)  # fmt: skip
    for R, B in ((3, 4), (17, 32), (2, 2), (4, 4)):
        batch = _decode_batch(R, ps, N, seed=R)
        assert runner.accepts(batch)
        runner.run(batch)
        p = pad_decode(batch, B, ps, N)
        call = made[B]._wrappers[made[B].default_params].calls[-1]
        assert call["indptr"].device.type == "cpu" and np.array_equal(
            call["indptr"].numpy(), p.kv_page_indptr
        )
        assert call["last_page_len"].device.type == "cpu"
        assert np.array_equal(call["last_page_len"].numpy(), p.kv_last_page_len)
        assert np.array_equal(call["indices"].numpy(), p.kv_page_indices)  # the runner's static device buffer
        assert call["indices"].data_ptr() == runner._i32[runner._bmax :].data_ptr()
        assert (call["num_qo_heads"], call["num_kv_heads"], call["head_dim"], call["page_size"]) == (
            4,
            2,
            16,
            ps,
        )
        assert call["pos_encoding_mode"] == "NONE" and call["q_data_type"] == torch.bfloat16
        meta = runner._graphs[B].meta  # the layers' metadata: the wrapper's own buffers, the static inputs
        assert meta.kv_page_indptr is made[B].kv_indptr and meta.kv_last_page_len is made[B].kv_last_page_len
        assert np.array_equal(meta.append_pages.numpy(), p.append_pages)
    assert len(made[4]._wrappers[made[4].default_params].calls) == 1 + 2  # capture plan + two steps
    with pytest.raises(ValueError, match="for 4 requests got 32"):
        made[4].plan(runner._graphs[32].meta)


# ---- flag plumbing ---------------------------------------------------------------------------------


def test_cuda_graphs_flag_is_ignored_off_cuda(tiny_checkpoint):
    spec = ExecutorSpec(model_path=str(tiny_checkpoint("llama")), page_size=16, num_pages=8, cuda_graphs=True)
    ex = ModelExecutor(spec)
    assert ex.graphs is None and ex.kv_cache.shape[1] == 8 and ex.capabilities.num_pages == 8
    assert ex.capabilities.extra["cuda_graphs"] is False
    assert flashinfer_graph_runner(ex) is None  # torch attention: no graphs


def test_factory_turns_graphs_on_for_cuda_native_only(tiny_checkpoint):
    from pie.config import CudaNativeOptions, DevOptions, DriverConfig, ModelEntry
    from pie.drivers.factory import executor_spec as factory_spec

    path = str(tiny_checkpoint("llama"))
    native = ModelEntry(
        "a", path, DriverConfig("cuda_native", ["cuda:0"], 1, "bfloat16", CudaNativeOptions())
    )
    dev = ModelEntry("b", path, DriverConfig("dev", ["cpu"], 1, "float32", DevOptions()))
    assert factory_spec(native).cuda_graphs is True and factory_spec(dev).cuda_graphs is False


def test_bench_graph_flag():
    from pie.cli import bench_cmd

    common = argparse.ArgumentParser(add_help=False)
    parser = argparse.ArgumentParser(prog="pie")
    bench_cmd.register(parser.add_subparsers(), common)
    on = bench_cmd.parse_options(parser.parse_args(["bench"]), "cuda:0", "bfloat16")
    off = bench_cmd.parse_options(parser.parse_args(["bench", "--no-cuda-graphs"]), "cuda:0", "bfloat16")
    assert on.cuda_graphs is True and off.cuda_graphs is False
    assert (
        executor_spec("/m", on, True).cuda_graphs is True
        and executor_spec("/m", off, True).cuda_graphs is False
    )


def test_bench_records_the_graph_setting(tmp_path, capsys):
    import json

    from pie.cli import bench_cmd

    tiny = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-6}  # fmt: skip
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=None)
    parser = argparse.ArgumentParser(prog="pie")
    bench_cmd.register(parser.add_subparsers(), common)
    argv = ["bench", "--model-config", str(tmp_path / "tiny.json"), "--device", "cpu", "--dtype", "float32",
            "--context", "4", "--batch-sizes", "2", "--prefill", "none", "--steps", "1", "--repeats", "1",
            "--warmup", "0", "--page-size", "4", "--json", "--no-cuda-graphs"]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["settings"]["cuda_graphs"] is False and rec["cuda_graphs"] is None


# ---- GPU: graphs against the eager executor (bf16, FlashInfer) --------------------------------------

DEV = torch.device("cuda:0") if HAS_CUDA else None
# FlashInfer needs head_dim 64/128/256 (as in tests/test_gpu.py); 8 q heads over 2 kv heads = tensor-core decode
TINY = dict(
    hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, initializer_range=0.075
)
ARCHS = {
    "qwen3-g2": ("qwen3", {}),
    "llama-g4-tc": ("llama", {"num_attention_heads": 8}),
    # the fused Triton MoE inside the graph, and phi3's LongRoPE table rows chosen per decode position
    **{name: FAMILIES[name] for name in ("mixtral", "qwen3_moe", "phi3_longrope")},
}


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    cache: dict = {}

    def make(name: str):
        if name not in cache:
            arch, over = ARCHS[name]
            cache[name] = make_tiny_checkpoint(tmp_path_factory.mktemp(name), arch, **{**TINY, **over})
        return cache[name]

    return make


def _cuda_executor(path, graphs: bool, ps: int = 16, num_pages: int = 256) -> ModelExecutor:
    spec = ExecutorSpec(model_path=str(path), device="cuda:0", activation_dtype="bfloat16", page_size=ps,
                        num_pages=num_pages, attention_backend="flashinfer", cuda_graphs=graphs)  # fmt: skip
    ex = ModelExecutor(spec)
    assert (ex.graphs is not None) == graphs
    return ex


MARGIN = 0.125


def assert_same_logits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, what
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > MARGIN
    diff = np.abs(got - want).max()
    if os.environ.get("PIE_PARITY_LOG"):
        with open(os.environ["PIE_PARITY_LOG"], "a") as f:
            f.write(f"graphs {what}\tmin_cos={cos.min():.7f}\tmax_abs_diff={diff:.4f}\n")
    assert cos.min() >= 0.9999, f"{what}: min cosine {cos.min():.6f}, max |diff| {diff:.4f}"
    assert np.array_equal(got.argmax(-1)[clear], want.argmax(-1)[clear]), f"{what}: argmax differs"


def _graph_stats(ex: ModelExecutor) -> str:
    return str(ex.graphs.stats.summary())


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("name", list(ARCHS))
def test_graph_decode_matches_eager(tiny_bf16, name):
    from pie.drivers.sampling import SamplingParams, sample

    path, ps = tiny_bf16(name), 16
    eager, graphed = _cuda_executor(path, False), _cuda_executor(path, True)
    assert graphed.capabilities.num_pages == 256 and graphed.kv_cache.shape[1] == 257  # + scratch page
    with pytest.raises(BatchError, match="out of range"):
        graphed.check_batch(
            make_batch([dict(token_ids=[1], positions=[0], pages=[256], last_page_len=1)], ps)
        )
    V, rng, seqs = eager.model_config.vocab_size, np.random.default_rng(1), Seqs(256, ps, seed=2)
    prompts = [rng.integers(0, V, n).tolist() for n in PROMPTS]
    batch = make_batch([seqs.request(i, p, output=False) for i, p in enumerate(prompts)], ps)
    eager.execute(batch), graphed.execute(batch)
    runner = graphed.graphs
    assert runner.stats.replays == 0, _graph_stats(graphed)
    last, steps = [int(rng.integers(V)) for _ in PROMPTS], 0
    for R in (1, 3, 17, 3, 1, 17):  # buckets 1, 4, 32; each replayed after re-plans with other lengths
        for _ in range(3):
            reqs = [seqs.request(i, [last[i]], output=i % 5 != 2 or R == 1) for i in range(R)]
            batch = make_batch(reqs, ps)
            want, got = eager.execute(batch), graphed.execute(batch)
            steps += 1
            assert runner.stats.replays == steps, _graph_stats(graphed)
            assert_same_logits(got.logits, want.logits, f"{name} R={R} step {steps}")
            clear = np.diff(np.sort(want.logits, -1)[:, -2:], axis=-1)[:, 0] > MARGIN
            assert np.array_equal(got.tokens[clear], want.tokens[clear]), f"{name} R={R}: greedy tokens"
            for i, tok in zip(np.flatnonzero([bool(r["outputs"]) for r in reqs]), want.tokens, strict=True):
                last[i] = int(tok)
    assert sorted(runner.stats.captured) == [1, 4, 32] and runner.stats.disabled is None, _graph_stats(
        graphed
    )

    # seeded sampling through the graph equals sample() on the logits it returned (same device, exact)
    reqs = [dict(seqs.request(i, [last[i]]), temperature=0.8, top_k=[0, 40][i % 2], top_p=[1.0, 0.9, 1.0][i % 3],
                 seed=100 + i) for i in range(17)]  # fmt: skip
    batch = make_batch(reqs, ps)
    want, got = eager.execute(batch), graphed.execute(batch)
    assert runner.stats.replays == steps + 1
    assert_same_logits(got.logits, want.logits, f"{name} sampled step")
    again = sample(torch.from_numpy(got.logits).to(DEV), SamplingParams.from_batch(batch, DEV), False)
    assert np.array_equal(got.tokens, again.tokens.cpu().numpy())
    agree = float((got.tokens == want.tokens).mean())
    assert agree >= 0.8, f"{name}: seeded tokens agree with eager on {agree:.0%} of rows only"

    # a mixed batch (decode, prefill, decode) in the same executor runs eagerly, and right
    batch = make_batch([seqs.request(0, [5]), seqs.request(30, rng.integers(0, V, 21).tolist()),
                        seqs.request(1, [7])], ps)  # fmt: skip
    want, got = eager.execute(batch), graphed.execute(batch)
    assert runner.stats.replays == steps + 1 and runner.stats.eager_decode == 0
    assert_same_logits(got.logits, want.logits, f"{name} mixed batch")


@pytest.mark.gpu
@needs_flashinfer
def test_capture_touches_only_the_scratch_page(tiny_bf16):
    ps = 16
    ex = _cuda_executor(tiny_bf16("qwen3-g2"), True)
    seqs, rng = Seqs(256, ps, seed=3), np.random.default_rng(3)
    ex.execute(
        make_batch([seqs.request(i, rng.integers(0, 300, n).tolist()) for i, n in enumerate(PROMPTS)], ps)
    )
    ex.kv_cache[:, 256] = 7.0  # a sentinel in the scratch page
    before = ex.kv_cache[:, :256].clone()
    assert ex.graphs.prepare(64) and 64 in ex.graphs.stats.captured, _graph_stats(ex)
    torch.cuda.synchronize()
    assert torch.equal(ex.kv_cache[:, :256], before)
    scratch = ex.kv_cache[:, 256]  # [L, 2, ps, Hkv, D]: the warm-up runs wrote slot 0 of it, nothing else
    assert (scratch[:, :, 0] != 7.0).all() and (scratch[:, :, 1:] == 7.0).all()


@pytest.mark.gpu
@needs_flashinfer
def test_bench_decode_runs_through_graphs(tiny_bf16):
    from pie.bench.runner import run_decode

    opts = BenchOptions(context=8, batch_sizes=(1, 3), prefill_requests=0, steps=2, repeats=2, warmup=1,
                        page_size=16, device="cuda:0", dtype="bfloat16", attention_backend="flashinfer")  # fmt: skip
    ex = ModelExecutor(executor_spec(str(tiny_bf16("llama-g4-tc")), opts, random_weights=False))
    assert ex.graphs is not None
    vocab = ex.model_config.vocab_size
    for b in opts.batch_sizes:
        run_decode(ex, b, opts, vocab, np.random.default_rng(b), lambda msg: None)
    # warm-up, timed steps, then one repeat of steps timing the launch host work alone
    per_batch = opts.warmup + opts.repeats * opts.steps + opts.steps
    stats = ex.graphs.stats
    assert stats.replays == 2 * per_batch and stats.eager_decode == 0, _graph_stats(ex)
    assert sorted(stats.captured) == [1, 3] and stats.disabled is None  # max_batch_size 3 is a bucket


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_torch_attention_on_cuda_keeps_graphs_off(tiny_bf16):
    spec = ExecutorSpec(model_path=str(tiny_bf16("qwen3-g2")), device="cuda:0", activation_dtype="bfloat16",
                        page_size=16, num_pages=32, attention_backend="torch", cuda_graphs=True)  # fmt: skip
    ex = ModelExecutor(spec)
    assert (
        ex.graphs is None
        and ex.capabilities.extra["cuda_graphs"] is False
        and ex.capabilities.num_pages == 32
    )
