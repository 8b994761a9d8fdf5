"""The CUDA fast path: FlashInfer attention against an fp32 reference, the executor on CUDA (bf16, FlashInfer)
against transformers (fp32) on tiny checkpoints, sampling on CUDA against CPU, and the cuda_native driver.

GPU tests are marked `gpu` and skipped without CUDA; without FlashInfer they skip too, unless
PIE_REQUIRE_FLASHINFER=1 (scripts/gpu_check.sh sets it), where they fail. The tests at the end check
cuda_native's refusals and time limits on CPU.

Tolerances (bf16): attention outputs are averages of N(0, 1) values; bf16 rounding of q, K, V, the
probabilities and the output gives errors ~1e-2 at most, so max |err| <= 3e-2 and mean |err| <= 3e-3.
Model logits (tiny models with hidden 256, head_dim 64, init std 0.075, logits std ~1.2): transformers' own
bf16 forward reaches cosine >= 0.9995 per row and max |err| ~0.13 against fp32 on these; we require the
project's bar, cosine >= 0.999 per row, and the same argmax wherever the fp32 top-2 margin exceeds 0.3. A wrong slot, page,
mask or causal alignment breaks whole rows far beyond that.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest
import torch
import transformers
from gpu_marks import HAS_CUDA, HAS_FLASHINFER, MUST_FLASHINFER, needs_cuda, needs_flashinfer  # noqa: F401

from pie.attention.base import AttentionMetadata
from pie.drivers.protocol import make_batch
from pie.drivers.spec import ExecutorSpec
from pie.errors import DriverError

DEV = torch.device("cuda:0") if HAS_CUDA else None
# FlashInfer needs head_dim 64/128/256; init std halved from tiny_models' 0.15 for the 4x wider hidden size
TINY = dict(
    hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, initializer_range=0.075
)


# ---- attention: FlashInfer vs an fp32 reference --------------------------------------------------------


KINDS = ["decode", "mixed", "masked", "masked_decode"]


def random_batch(kind: str, page_size: int, num_pages: int, rng):
    """A batch of 5 requests over a shuffled page pool. kind: decode | mixed | masked | masked_decode."""
    free = list(rng.permutation(num_pages))
    reqs = []
    for r in range(5):
        n = (
            1
            if kind in ("decode", "masked_decode") or (kind == "mixed" and r % 2)
            else int(rng.integers(2, 40))
        )
        kv = n + int(rng.integers(0, 70))
        pages = [int(free.pop()) for _ in range(-(-kv // page_size))]
        req = dict(
            token_ids=[0] * n,
            positions=list(range(kv - n, kv)),
            pages=pages,
            last_page_len=kv - (len(pages) - 1) * page_size,
        )
        if kind.startswith("masked"):
            m = rng.random((n, kv)) < 0.6
            m[np.arange(n), kv - n + np.arange(n)] = True  # every row attends somewhere
            req["mask"] = m
        reqs.append(req)
    return make_batch(reqs, page_size)


def reference_attention(q, kv_cache, batch, page_size, sm_scale):
    """fp32 dense attention per request (slow, obvious): q [T, Hq, D] -> [T, Hq, D]."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    kv_lens, Hq, Hkv = batch.kv_lens(page_size), q.shape[1], kv_cache.shape[3]
    for r in range(batch.num_requests):
        t0, t1 = int(batch.qo_indptr[r]), int(batch.qo_indptr[r + 1])
        n, L = t1 - t0, int(kv_lens[r])
        pages = torch.as_tensor(
            batch.kv_page_indices[batch.kv_page_indptr[r] : batch.kv_page_indptr[r + 1]], device=q.device
        )
        kv = kv_cache[pages].float()  # [p, 2, ps, Hkv, D]
        k = kv[:, 0].reshape(-1, Hkv, kv.shape[-1])[:L].repeat_interleave(Hq // Hkv, dim=1)  # [L, Hq, D]
        v = kv[:, 1].reshape(-1, Hkv, kv.shape[-1])[:L].repeat_interleave(Hq // Hkv, dim=1)
        if batch.mask is not None:
            allow = torch.as_tensor(
                batch.mask[batch.mask_indptr[r] : batch.mask_indptr[r + 1]], device=q.device
            ).view(n, L)
        else:
            i, j = torch.meshgrid(
                torch.arange(n, device=q.device), torch.arange(L, device=q.device), indexing="ij"
            )
            allow = j <= i + L - n
        s = torch.einsum("nhd,lhd->hnl", q[t0:t1].float(), k) * sm_scale
        p = torch.softmax(s.masked_fill(~allow, float("-inf")), dim=-1)
        out[t0:t1] = torch.einsum("hnl,lhd->nhd", p, v)
    return out


def assert_attention_close(got, ref, what=""):
    err = (got.float() - ref).abs()
    assert float(err.max()) <= 3e-2 and float(err.mean()) <= 3e-3, (
        f"{what}: max {err.max():.3g}, mean {err.mean():.3g}"
    )


def _fi_backend(hq, hkv, d, ps):
    from pie.attention import create_backend

    return create_backend(
        "flashinfer",
        num_qo_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        page_size=ps,
        dtype=torch.bfloat16,
        device=DEV,
    )


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("heads", [(4, 2, 64), (8, 2, 64), (16, 8, 128)], ids=["g2d64", "g4d64-tc", "g2d128"])
@pytest.mark.parametrize("page_size", [1, 16, 32])
@pytest.mark.parametrize("kind", KINDS)
def test_flashinfer_matches_fp32_reference_and_torch_backend(kind, page_size, heads):
    from pie.attention.torch_backend import TorchBackend

    hq, hkv, d = heads
    rng = np.random.default_rng(KINDS.index(kind) * 1000 + page_size * 10 + d)
    num_pages = 600 // page_size + 40  # >= 5 requests x 109 slots
    batch = random_batch(kind, page_size, num_pages, rng)
    meta = AttentionMetadata.from_batch(batch, page_size, DEV)
    assert meta.is_decode == (kind == "decode")
    fi, tb = _fi_backend(hq, hkv, d, page_size), TorchBackend(hq, hkv, d, page_size, torch.bfloat16, DEV)
    fi.plan(meta)
    tb.plan(meta)
    for layer in range(2):  # one plan, several layers
        q = torch.randn(batch.num_tokens, hq, d, device=DEV, dtype=torch.bfloat16)
        kv_cache = torch.randn(num_pages, 2, page_size, hkv, d, device=DEV, dtype=torch.bfloat16)
        got = fi.run(q, kv_cache, layer)
        assert got.shape == q.shape and got.dtype == torch.bfloat16
        ref = reference_attention(q, kv_cache, batch, page_size, d**-0.5)
        assert_attention_close(got, ref, f"flashinfer {kind} layer {layer}")
        assert_attention_close(tb.run(q, kv_cache, layer), ref, f"torch {kind} layer {layer}")


@pytest.mark.gpu
@needs_flashinfer
def test_one_backend_serves_a_sequence_of_batch_kinds():
    fi, rng, ps = _fi_backend(8, 2, 64, 16), np.random.default_rng(1), 16
    kv_cache = torch.randn(80, 2, ps, 2, 64, device=DEV, dtype=torch.bfloat16)
    for kind in ["mixed", "decode", "masked", "decode", "masked_decode", "mixed"]:
        batch = random_batch(kind, ps, 80, rng)
        fi.plan(AttentionMetadata.from_batch(batch, ps, DEV))
        q = torch.randn(batch.num_tokens, 8, 64, device=DEV, dtype=torch.bfloat16)
        assert_attention_close(
            fi.run(q, kv_cache, 0), reference_attention(q, kv_cache, batch, ps, 64**-0.5), kind
        )


# ---- the executor on CUDA (bf16, FlashInfer) vs transformers (fp32) -----------------------------------


class Seqs:
    """Test-side paging: a shuffled free list; request() appends tokens to a sequence, all rows output logits."""

    def __init__(self, num_pages: int, page_size: int, seed: int) -> None:
        self.ps, self.free = page_size, [int(p) for p in np.random.default_rng(seed).permutation(num_pages)]
        self.pages: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def request(self, sid: int, ids, positions=None, mask=None) -> dict:
        old = self.lens.get(sid, 0)
        new = old + len(ids)
        pages = self.pages.setdefault(sid, [])
        while len(pages) * self.ps < new:
            pages.append(self.free.pop())
        self.lens[sid] = new
        req = dict(state_slot=sid,  # hybrid models' recurrent-state slot (ignored by the others)
                   token_ids=list(map(int, ids)), positions=list(range(old, new)) if positions is None else positions,
                   pages=list(pages), last_page_len=new - (len(pages) - 1) * self.ps, outputs=list(range(len(ids))),
                   return_logits=True)  # fmt: skip
        if mask is not None:
            req["mask"] = mask
        return req


_HF: dict[str, torch.nn.Module] = {}
# transformers' reference runs its plainest code: eager attention (on CUDA it may pick sdpa or a hub kernel,
# which drop Gemma 2's attention soft-cap and GPT-OSS's sinks: gemma2 / gpt_oss "failed" at cos 0.3 / 0.6) and
# the per-expert loop (its default grouped_mm experts on CUDA are suspect for GPT-OSS)
EAGER = {"attn_implementation": "eager", "experts_implementation": "eager"}


def hf_logits(path, ids) -> np.ndarray:
    if str(path) not in _HF:
        _HF[str(path)] = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, **EAGER
        ).eval()
    with torch.no_grad():
        return _HF[str(path)](torch.tensor([list(ids)])).logits[0].numpy()


def hf_cuda_logits(path, ids, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """transformers on CUDA (eager attention), one full forward over ids: [len(ids), V] float32 logits."""
    from tiny_models import hf_model_class

    key = f"{path}:{dtype}"
    if key not in _HF:
        cls = hf_model_class(transformers.AutoConfig.from_pretrained(str(path)))
        _HF[key] = cls.from_pretrained(str(path), dtype=dtype, **EAGER).to("cuda:0").eval()
    with torch.no_grad():
        return _HF[key](torch.tensor([list(ids)], device="cuda:0")).logits[0].float().cpu().numpy()


def hf_cuda_cached_logits(path, prompt, steps, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """transformers on CUDA (eager): `prompt` with a cache, then each of `steps` one token at a time, the
    rows pie outputs for the same calls (LongRoPE switches sets mid-sequence only this way)."""
    from test_parity_moe import _CACHE_ARG, _cache_of

    hf_cuda_logits(path, prompt[:1], dtype)  # loads and caches the model
    model = _HF[f"{path}:{dtype}"]
    with torch.no_grad():
        out = model(torch.tensor([list(prompt)], device="cuda:0"), use_cache=True)
        rows, cache = [out.logits[0]], _cache_of(out)
        for t in steps:
            out = model(torch.tensor([[t]], device="cuda:0"), **{_CACHE_ARG: cache}, use_cache=True)
            rows.append(out.logits[0])
            cache = _cache_of(out)
    return torch.cat(rows).float().cpu().numpy()


def logit_stats(got: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(min cosine, mean cosine, top-1 agreement) of got's rows against ref's."""
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    return float(cos.min()), float(cos.mean()), float((got.argmax(-1) == ref.argmax(-1)).mean())


def assert_logits_close(got: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    assert got.shape == ref.shape, what
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    if os.environ.get("PIE_PARITY_LOG"):  # scripts/gpu_check.sh collects the figures for the notes
        with open(os.environ["PIE_PARITY_LOG"], "a") as f:
            f.write(f"{what}\tmin_cos={cos.min():.6f}\tmax_abs_err={np.abs(got - ref).max():.4f}\n")
    assert cos.min() >= 0.999, f"{what}: min cosine {cos.min():.5f}"
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.3
    assert np.array_equal(got.argmax(-1)[clear], ref.argmax(-1)[clear]), f"{what}: top-1 differs"


def assert_bf16_parity(ours: np.ndarray, ref: np.ndarray, hf16: np.ndarray, what: str) -> None:
    """pie in bf16 against transformers fp32 (ref), judged beside transformers' own bf16 run (hf16) on the
    same tokens (rows: [N, V]).

    - Cosine: min >= 0.999 (the issue's bar) where transformers' bf16 reaches it. Tiny random checkpoints of
      some families are chaotic in bf16 (Gemma 3/4: transformers' own bf16 run reaches min cosine 0.6-0.97,
      measured on an H200); there pie's min must be within 0.03 of transformers' and its mean within 0.002.
    - Top-1: >= 99% agreement on the rows whose fp32 top-2 margin is clear (> 0.1; a closer race is decided
      by bf16 rounding, for transformers' bf16 as for pie's), or within 5 points of transformers' bf16 there
      where it misses 99% itself (MoE routing flips and the chaotic tiny Gemma 4); overall within 5 points.
    Exactness of the GPU code itself is judged in fp32 (check_fp32_against_hf in test_gpu_families.py)."""
    mine, theirs = logit_stats(ours, ref), logit_stats(hf16, ref)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.1
    clear_top1 = float((ours.argmax(-1) == ref.argmax(-1))[clear].mean()) if clear.any() else 1.0
    their_clear = float((hf16.argmax(-1) == ref.argmax(-1))[clear].mean()) if clear.any() else 1.0
    if os.environ.get("PIE_PARITY_LOG"):
        with open(os.environ["PIE_PARITY_LOG"], "a") as f:
            f.write(f"{what}\tpie min/mean cos, top1 = {mine[0]:.6f} {mine[1]:.6f} {mine[2]:.3f}"
                    f" (clear rows {clear_top1:.3f} of {int(clear.sum())}, hf-bf16 {their_clear:.3f})"
                    f"\thf-bf16 = {theirs[0]:.6f} {theirs[1]:.6f} {theirs[2]:.3f}\n")  # fmt: skip
    detail = f"{what}: pie (min cos, mean cos, top-1) {mine}, top-1 on clear rows {clear_top1:.3f}; transformers bf16 {theirs}"
    assert mine[0] >= min(0.999, theirs[0] - 0.03), detail
    assert mine[1] >= min(0.9995, theirs[1] - 0.002), detail
    assert clear_top1 >= min(0.99, their_clear - 0.05) and mine[2] >= theirs[2] - 0.05, detail


@pytest.fixture(scope="module")
def tiny_fi(tmp_path_factory):
    """tiny_fi(arch, **overrides): a tiny checkpoint with FlashInfer-sized heads (head_dim 64), cached."""
    from tiny_models import make_tiny_checkpoint

    cache: dict = {}

    def make(arch: str, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, **{**TINY, **overrides})
        return cache[key]

    return make


def cuda_executor(
    path, page_size: int, backend: str = "flashinfer", num_pages: int = 256, dtype: str = "bfloat16"
):
    from pie.drivers.executor import ModelExecutor

    spec = ExecutorSpec(model_path=str(path), device="cuda:0", activation_dtype=dtype, page_size=page_size,
                        num_pages=num_pages, attention_backend=backend)  # fmt: skip
    ex = ModelExecutor(spec)
    assert ex.capabilities.extra["attention_backend"] == backend
    return ex


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("arch,overrides", [("qwen3", {}), ("qwen2", {}), ("llama", {}), ("llama", {"num_attention_heads": 8})],
                         ids=["qwen3", "qwen2", "llama", "llama-g4"])  # fmt: skip
def test_prefill_then_paged_decode_matches_hf(tiny_fi, arch, overrides, page_size):
    path = tiny_fi(arch, **overrides)
    ex = cuda_executor(path, page_size)
    seqs, rng = Seqs(ex.num_pages, page_size, seed=page_size), np.random.default_rng(7)
    prompts = [rng.integers(0, ex.model_config.vocab_size, n).tolist() for n in (5, 17, 33)]
    batch = make_batch([seqs.request(i, p) for i, p in enumerate(prompts)], page_size)
    res = ex.execute(batch)
    got = [[rows] for rows in np.split(res.logits, batch.qo_indptr[1:-1])]
    tokens = [list(p) for p in prompts]
    last = [int(t[-1]) for t in np.split(res.tokens, batch.qo_indptr[1:-1])]
    for _ in range(6):  # greedy decode, all three sequences in one batch (pure decode: the decode wrapper)
        batch = make_batch([seqs.request(i, [t]) for i, t in enumerate(last)], page_size)
        res = ex.execute(batch)
        for i, t in enumerate(last):
            tokens[i].append(t)
            got[i].append(res.logits[i : i + 1])
        last = [int(t) for t in res.tokens]
    for i in range(3):
        assert_logits_close(np.concatenate(got[i]), hf_logits(path, tokens[i]), f"{arch} seq {i}")


@pytest.mark.gpu
@needs_flashinfer
def test_mixed_batch_and_custom_mask_match_hf(tiny_fi):
    path, ps = tiny_fi("qwen3"), 16
    ex = cuda_executor(path, ps)
    seqs, rng = Seqs(ex.num_pages, ps, seed=3), np.random.default_rng(11)
    V = ex.model_config.vocab_size
    a, b, c = (rng.integers(0, V, n).tolist() for n in (9, 26, 40))
    ex.execute(make_batch([seqs.request(0, a), seqs.request(1, b)], ps))
    a2, b2 = [int(rng.integers(V))], [int(rng.integers(V))]
    batch = make_batch(
        [seqs.request(0, a2), seqs.request(2, c), seqs.request(1, b2)], ps
    )  # decode, prefill, decode
    rows = np.split(ex.execute(batch).logits, batch.qo_indptr[1:-1])
    assert_logits_close(rows[0], hf_logits(path, a + a2)[-1:], "decode 0")
    assert_logits_close(rows[1], hf_logits(path, c), "prefill 2")
    assert_logits_close(rows[2], hf_logits(path, b + b2)[-1:], "decode 1")
    # a custom mask hiding slot 4 (later positions shifted down) equals HF on the sequence without it
    ids, hidden = rng.integers(0, V, 30).tolist(), 4
    mask = np.tril(np.ones((30, 30), dtype=bool))
    mask[hidden + 1 :, hidden] = False
    positions = [i if i <= hidden else i - 1 for i in range(30)]
    got = ex.execute(
        make_batch([seqs.request(3, ids, positions=positions, mask=mask), seqs.request(0, [5])], ps)
    )
    keep = [i for i in range(30) if i != hidden]
    without = ids[:hidden] + ids[hidden + 1 :]
    assert_logits_close(got.logits[:30][keep], hf_logits(path, without), "masked prefill")
    assert_logits_close(got.logits[30:], hf_logits(path, a + a2 + [5])[-1:], "decode beside a mask")


@pytest.mark.gpu
@needs_flashinfer
def test_flashinfer_executor_equals_torch_backend_executor(tiny_fi):
    path, ps = tiny_fi("llama"), 16
    outs = []
    for backend in ("flashinfer", "torch"):
        ex = cuda_executor(path, ps, backend)
        seqs = Seqs(ex.num_pages, ps, seed=5)
        prompt = np.random.default_rng(2).integers(0, ex.model_config.vocab_size, 50).tolist()
        first = ex.execute(make_batch([seqs.request(0, prompt[:20])], ps)).logits
        second = ex.execute(make_batch([seqs.request(0, prompt[20:])], ps)).logits  # chunked prefill
        outs.append(np.concatenate([first, second]))
    assert_logits_close(outs[0], outs[1], "flashinfer vs torch backend")


# ---- sampling on CUDA vs CPU ---------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_seeded_sampling_on_cuda_matches_cpu():
    from test_sampling import SEEDED_CROSS_DEVICE_AGREEMENT

    from pie.drivers.sampling import SamplingParams, sample

    n_out, V = 64, 5000
    rng = np.random.default_rng(0)
    fields = dict(
        temperature=[0.0 if i % 8 == 0 else float(t) for i, t in enumerate(rng.uniform(0.5, 1.5, n_out))],
        top_k=[[0, 40, 400][i % 3] for i in range(n_out)],
        top_p=[[1.0, 0.9, 0.6][i % 3 - 1] for i in range(n_out)],
        min_p=[[0.0, 0.02][i % 2] for i in range(n_out)],
        seed=list(range(1000, 1000 + n_out)),
    )
    batch = make_batch([dict(token_ids=[0] * n_out, positions=list(range(n_out)), pages=[0], last_page_len=n_out,
                             outputs=list(range(n_out)), **fields)], page_size=n_out)  # fmt: skip
    logits = torch.randn(n_out, V, generator=torch.Generator().manual_seed(3)) * 3
    cpu = sample(logits, SamplingParams.from_batch(batch, "cpu"), True)
    gpu = sample(logits.to(DEV), SamplingParams.from_batch(batch, DEV), True)
    # not torch.equal: exact equality across devices is not guaranteed (near-ties; pie.drivers.sampling)
    assert (gpu.tokens.cpu() == cpu.tokens).float().mean() >= SEEDED_CROSS_DEVICE_AGREEMENT
    assert torch.allclose(gpu.logprobs.cpu(), cpu.logprobs, atol=1e-4)
    assert torch.allclose(gpu.entropies.cpu(), cpu.entropies, atol=1e-4)


# ---- the cuda_native driver ----------------------------------------------------------------------


@pytest.mark.gpu
@needs_flashinfer
def test_cuda_native_driver_runs_flashinfer_and_matches_the_executor(tiny_fi):
    from pie.drivers.cuda_native import CudaNativeDriver

    path, ps = tiny_fi("qwen3"), 32
    spec = ExecutorSpec(model_path=str(path), device="cuda:0", activation_dtype="bfloat16", page_size=ps,
                        num_pages=64, kv_policy="cuda_native")  # fmt: skip
    batch = make_batch([Seqs(64, ps, 0).request(0, list(range(3, 40)))], ps)

    async def go():
        drv = CudaNativeDriver(spec, ready_timeout_s=300, shutdown_timeout_s=30)
        caps = await drv.start()
        res = await drv.forward(batch)
        await drv.shutdown()
        return caps, res

    caps, res = asyncio.run(go())
    assert caps.extra["attention_backend"] == "flashinfer" and caps.page_size == ps
    direct = cuda_executor(path, ps, num_pages=64).execute(batch)
    assert np.array_equal(res.tokens, direct.tokens)
    assert np.allclose(res.logits, direct.logits, atol=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_cuda_native_auto_falls_back_to_torch_for_float32(tiny_fi):
    from pie.drivers.cuda_native import resolve_attention_backend

    spec = ExecutorSpec(model_path=str(tiny_fi("llama")), device="cuda:0", activation_dtype="float32")
    assert resolve_attention_backend(spec) == "torch"


# ---- cuda_native on CPU: refusals and time limits ------------------------------------------------


def test_cuda_native_refuses_a_cpu_device():
    from pie.drivers.cuda_native import CudaNativeDriver

    with pytest.raises(DriverError, match="dev driver"):
        CudaNativeDriver(ExecutorSpec(model_path="/nonexistent", device="cpu"))


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA message")
def test_cuda_native_without_cuda_says_so():
    from pie.drivers.cuda_native import CudaNativeDriver

    with pytest.raises(DriverError, match="sees no CUDA device"):
        CudaNativeDriver(ExecutorSpec(model_path="/nonexistent", device="cuda:0"))


def test_explicit_backend_is_kept_and_auto_needs_flashinfer(monkeypatch, caplog):
    import pie.attention
    from pie.drivers import cuda_native

    assert (
        cuda_native.resolve_attention_backend(ExecutorSpec(model_path="/x", attention_backend="torch"))
        == "torch"
    )
    monkeypatch.setattr(pie.attention, "flashinfer_available", lambda: False)
    monkeypatch.setattr(cuda_native, "_warned", set())
    with caplog.at_level("WARNING"):
        assert cuda_native.resolve_attention_backend(ExecutorSpec(model_path="/x")) == "torch"
        assert cuda_native.resolve_attention_backend(ExecutorSpec(model_path="/x")) == "torch"
    assert sum("FlashInfer is not installed" in r.message for r in caplog.records) == 1  # warned once


def _cpu_driver(monkeypatch, **timeouts):
    """A CudaNativeDriver on CPU (device check bypassed) whose executor build and release are stubbed."""
    from pie.drivers import cuda_native

    monkeypatch.setattr(cuda_native, "check_cuda", lambda device: None)
    return cuda_native.CudaNativeDriver(ExecutorSpec(model_path="/x", attention_backend="torch"), **timeouts)


def test_start_timeout_is_a_driver_error(monkeypatch):
    drv = _cpu_driver(monkeypatch, ready_timeout_s=0.2)
    monkeypatch.setattr(drv, "_build", lambda: time.sleep(1.5))
    t0 = time.perf_counter()
    with pytest.raises(DriverError, match="not ready within 0.2 s"):
        asyncio.run(drv.start())
    assert time.perf_counter() - t0 < 1.4


def test_shutdown_gives_up_after_its_timeout(monkeypatch):
    drv = _cpu_driver(monkeypatch, shutdown_timeout_s=0.2)
    monkeypatch.setattr(drv, "_release", lambda: time.sleep(1.5))
    t0 = time.perf_counter()
    asyncio.run(drv.shutdown())
    assert time.perf_counter() - t0 < 1.4
