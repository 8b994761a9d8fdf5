"""PageOps on CUDA (marked `gpu`; skipped without CUDA, and without FlashInfer unless PIE_REQUIRE_FLASHINFER=1):
the executor in bf16 with FlashInfer attention and CUDA-graph decode, through swap out / clobber / swap in,
copy-on-write copies and read/write; the cuda_native driver's ordering of page ops with forwards; the page
mover on a Llama-8B-sized layer set, byte-exact, with its swap bandwidth printed (run with -s to see it).

Page bytes are compared exactly (a movement either moves every byte or is wrong). Logits after a restore
are compared with the never-moved run's: same bytes, same batch shape, same kernels, so they agree to the
bit in practice; the assertion allows 1e-3 so that a nondeterministic reduction cannot fail a correct move,
and requires the same argmax.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from gpu_marks import needs_cuda, needs_flashinfer

from pie.drivers import page_mover
from pie.drivers.protocol import PageOps, make_batch
from pie.drivers.spec import ExecutorSpec

PS = 16
# FlashInfer needs head_dim 64/128/256 (as in test_gpu.py)
TINY = dict(
    hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, initializer_range=0.075
)
PROMPT = list(range(3, 43))  # 40 tokens: pages of 16, 16, 8
OTHER = list(range(100, 148))  # 48 tokens: 3 full pages


def pairs(*rows) -> np.ndarray:
    return np.array(rows, dtype=np.int32).reshape(-1, 2)


def ids(*xs) -> np.ndarray:
    return np.array(xs, dtype=np.int32)


def req(tokens, start, pages, **kw) -> dict:
    end = start + len(tokens)
    return dict(token_ids=list(tokens), positions=list(range(start, end)), pages=list(pages),
                last_page_len=end - (len(pages) - 1) * PS, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_fi(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen3_fi"), "qwen3", **TINY)


def cuda_spec(path, **kw) -> ExecutorSpec:
    base = dict(model_path=str(path), device="cuda:0", activation_dtype="bfloat16", page_size=PS, num_pages=64,
                swap_slots=16, attention_backend="flashinfer", cuda_graphs=True)  # fmt: skip
    return ExecutorSpec(**{**base, **kw})


def decode_logits(ex, token, start, pages) -> np.ndarray:
    return ex.execute(make_batch([req([token], start, pages, outputs=[0], return_logits=True)], PS)).logits[0]


def assert_same_logits(got, want) -> None:
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    assert got.argmax() == want.argmax()


@pytest.mark.gpu
@needs_flashinfer
def test_swap_copy_and_read_write_round_trips_on_cuda(tiny_fi, monkeypatch):
    from pie.drivers.executor import ModelExecutor

    ref = ModelExecutor(cuda_spec(tiny_fi))
    ref.execute(make_batch([req(PROMPT, 0, [0, 1, 2])], PS))
    want = decode_logits(ref, 7, 40, [0, 1, 2])

    monkeypatch.setattr(page_mover, "STAGING_BYTES", 1)  # one page per chunk: many chunks and runs
    ex = ModelExecutor(cuda_spec(tiny_fi))
    assert ex.page_mover.pool.pinned and ex.capabilities.extra["attention_backend"] == "flashinfer"
    assert ex.graphs is not None  # decode batches replay CUDA graphs, reading the moved pages
    ex.execute(make_batch([req(PROMPT, 0, [0, 1, 2])], PS))
    saved = ex.page_ops(PageOps(read=ids(0, 1, 2))).data
    # swap out (slots out of order), let another sequence overwrite the pages, swap in elsewhere: no host
    # sync between the steps, so this also checks that the stream orders the copies and the forward
    ex.page_ops(PageOps(swap_out=pairs(0, 9, 1, 3, 2, 4)))
    ex.execute(make_batch([req(OTHER, 0, [0, 1, 2])], PS))
    ex.page_ops(PageOps(swap_in=pairs(9, 20, 3, 31, 4, 22)))
    assert_same_logits(decode_logits(ex, 7, 40, [20, 31, 22]), want)
    # copy-on-write fork of the partial last page; both continue identically
    ex.page_ops(PageOps(copy=pairs(22, 40)))
    assert_same_logits(decode_logits(ex, 7, 40, [20, 31, 40]), want)
    # raw bytes out of one executor and into another
    other = ModelExecutor(cuda_spec(tiny_fi, swap_slots=0))
    assert other.capabilities.kv_fingerprint == ex.capabilities.kv_fingerprint
    other.page_ops(PageOps(write=ids(5, 6, 7), write_data=saved))
    assert np.array_equal(other.page_ops(PageOps(read=ids(5, 6, 7))).data, saved)
    assert_same_logits(decode_logits(other, 7, 40, [5, 6, 7]), want)
    ex.page_mover.close()
    assert not ex.page_mover.pool.pinned


@pytest.mark.gpu
@needs_flashinfer
def test_cuda_native_driver_page_ops(tiny_fi):
    from pie.drivers.cuda_native import CudaNativeDriver
    from pie.drivers.executor import ModelExecutor

    ref = ModelExecutor(cuda_spec(tiny_fi))
    ref.execute(make_batch([req(PROMPT, 0, [0, 1, 2])], PS))
    want = decode_logits(ref, 7, 40, [0, 1, 2])

    async def go():
        drv = CudaNativeDriver(cuda_spec(tiny_fi, kv_policy="cuda_native"), ready_timeout_s=300)
        caps = await drv.start()
        assert caps.num_swap_slots == 16 and caps.page_nbytes == ref.capabilities.page_nbytes
        try:
            *_, res = await asyncio.gather(
                drv.forward(make_batch([req(PROMPT, 0, [0, 1, 2])], PS)),
                drv.page_ops(PageOps(swap_out=pairs(0, 0, 1, 1, 2, 2))),
                drv.forward(make_batch([req(OTHER, 0, [0, 1, 2])], PS)),
                drv.page_ops(PageOps(swap_in=pairs(0, 10, 1, 11, 2, 12))),
                drv.forward(make_batch([req([7], 40, [10, 11, 12], outputs=[0], return_logits=True)], PS)),
            )
        finally:
            await drv.shutdown()
        return res

    assert_same_logits(asyncio.run(go()).logits[0], want)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("scattered", [False, True], ids=["consecutive-slots", "scattered-slots"])
def test_mover_swaps_llama8b_sized_pages_exactly(scattered):
    """32 layers of [P, 2, 16, 8, 128] bf16 (a Llama-3.1-8B page of 16 tokens: 2 MiB), 256 pages = 512 MiB."""
    dev = torch.device("cuda:0")
    P, S = 300, 256
    gen = torch.Generator(device=dev).manual_seed(0)
    layers = [torch.randn(P, 2, 16, 8, 128, generator=gen, device=dev).to(torch.bfloat16) for _ in range(32)]
    mover = page_mover.PageMover(layers, S, dev)
    assert mover.page_nbytes == 2 << 20 and mover.pool.pinned
    rng = np.random.default_rng(0)
    pages = rng.permutation(P)[:S]
    slots = rng.permutation(S) if scattered else np.arange(S)
    before = [t[torch.as_tensor(pages, device=dev)].clone() for t in layers[:4]]  # spot-check 4 layers

    mover.apply(PageOps(swap_out=pairs(0, 0), swap_in=pairs(0, 0)))  # warm-up: allocator, first launches
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    mover.apply(PageOps(swap_out=np.stack([pages, slots], 1).astype(np.int32)))
    torch.cuda.synchronize()
    t_out = time.perf_counter() - t0
    for t in layers:
        t.zero_()
    t0 = time.perf_counter()
    mover.apply(PageOps(swap_in=np.stack([slots, pages], 1).astype(np.int32)))
    torch.cuda.synchronize()
    t_in = time.perf_counter() - t0
    for t, b in zip(layers[:4], before, strict=True):
        assert torch.equal(t[torch.as_tensor(pages, device=dev)], b)
    gib = S * mover.page_nbytes / 2**30
    print(f"\nswap {gib:.2f} GiB ({'scattered' if scattered else 'consecutive'} slots): "
          f"out {gib / t_out:.1f} GiB/s, in {gib / t_in:.1f} GiB/s")  # fmt: skip
    mover.close()
