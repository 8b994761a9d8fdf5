"""PageOps: the contract's checks, the ModelExecutor's page mover (copy, swap, read/write) on tiny checkpoints,
the same through InProcessDriver and the dev driver's subprocess, FakeDriver's page ops, the KV fingerprint,
and the factory's swap/page-cap options."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tomllib

import numpy as np
import pytest
import torch
from fake_driver import FakeDriver, fake_next
from test_hub import isolate

from pie.config import parse_config
from pie.drivers import page_mover
from pie.drivers.dev.client import DevDriver
from pie.drivers.executor import ModelExecutor
from pie.drivers.factory import executor_spec
from pie.drivers.inprocess import InProcessDriver
from pie.drivers.kv_fingerprint import weights_identity
from pie.drivers.kv_plan import page_bytes
from pie.drivers.page_mover import slot_runs
from pie.drivers.protocol import BatchError, PageOps, make_batch
from pie.drivers.spec import ExecutorSpec
from pie.errors import ConfigError, DriverError

PS = 4  # page size: a 10-token prompt spans 3 pages, the last one partial


def pairs(*rows) -> np.ndarray:
    return np.array(rows, dtype=np.int32).reshape(-1, 2)


def ids(*xs) -> np.ndarray:
    return np.array(xs, dtype=np.int32)


def spec(path, **kw) -> ExecutorSpec:
    base = dict(model_path=str(path), page_size=PS, num_pages=16, swap_slots=8, attention_backend="torch")
    return ExecutorSpec(**{**base, **kw})


def req(tokens, start, pages, **kw) -> dict:
    """Tokens at positions start.. appended to a sequence that lives in `pages` (all of them)."""
    end = start + len(tokens)
    return dict(
        token_ids=list(tokens),
        positions=list(range(start, end)),
        pages=list(pages),
        last_page_len=end - (len(pages) - 1) * PS,
        **kw,
    )


PROMPT = [5, 9, 40, 7, 300, 12, 1, 77, 23, 8]  # 10 tokens: pages of 4, 4, 2
OTHER = [11, 3, 250, 19, 6, 6, 90, 31, 2, 140, 17, 60]  # 12 tokens: fills 3 pages


def prefill(ex: ModelExecutor, tokens, pages) -> None:
    ex.execute(make_batch([req(tokens, 0, pages)], PS))


def decode_logits(ex: ModelExecutor, token: int, start: int, pages) -> np.ndarray:
    """Logits [V] of one more token at position `start` for a sequence in `pages` (writes its KV slot)."""
    b = make_batch([req([token], start, pages, outputs=[0], return_logits=True)], PS)
    return ex.execute(b).logits[0]


def read(ex: ModelExecutor, pages) -> np.ndarray:
    return ex.page_ops(PageOps(read=ids(*pages))).data


@pytest.fixture(params=["qwen3", "llama"])
def arch_path(request, tiny_checkpoint):
    return tiny_checkpoint(request.param)


# ---- the contract ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ops, match",
    [
        (PageOps(copy=pairs(0, 16)), "PageOps.copy: 16 is not a valid destination device page"),
        (PageOps(copy=pairs(-1, 3)), "PageOps.copy: -1 is not a valid source device page"),
        (PageOps(swap_out=pairs(3, 8)), r"PageOps.swap_out: 8 is not a valid host swap slot \(0..7\)"),
        (PageOps(swap_in=pairs(0, 20)), r"PageOps.swap_in: 20 is not a valid device page \(0..15\)"),
        (PageOps(read=ids(16)), "PageOps.read: 16 is not a valid device page"),
        (PageOps(copy=pairs(0, 5, 1, 5)), "PageOps.copy names destination page 5 as a destination twice"),
        (PageOps(swap_out=pairs(0, 2, 1, 2)), "swap_out names host slot 2 as a destination twice"),
        (PageOps(swap_in=pairs(0, 4, 1, 4)), "swap_in names device page 4 as a destination twice"),
        (PageOps(copy=np.zeros((2, 3), np.int32)), r"copy must be an integer array of shape \[n, 2\]"),
        (PageOps(read=np.zeros(2, np.float32)), r"read must be an integer array of shape \[n\], got float32"),
        (PageOps(write=ids(1)), "write names 1 pages but write_data is missing"),
        (PageOps(write=ids(1), write_data=np.zeros((1, 10), np.uint8)), r"write_data must be uint8 of shape \[1, 64\]"),
        (PageOps(write=ids(1, 1), write_data=np.zeros((2, 64), np.uint8)), "write names device page 1 as a dest"),
        (PageOps(write_data=np.zeros((1, 64), np.uint8)), "write_data is given but write names no pages"),
    ],
)  # fmt: skip
def test_validate_names_the_problem(ops, match):
    with pytest.raises(BatchError, match=match):
        ops.validate(num_pages=16, num_swap_slots=8, page_nbytes=64)


def test_validate_accepts_good_ops_and_swap_needs_a_pool():
    PageOps().validate(16, 0, 64)
    ok = PageOps(
        swap_out=pairs(1, 7), copy=pairs(2, 3, 3, 2), swap_in=pairs(7, 1), write=ids(0),
        write_data=np.zeros((1, 64), np.uint8), read=ids(0, 0),
    )  # fmt: skip
    ok.validate(16, 8, 64)  # a page may be source and destination; a page may be read twice
    with pytest.raises(BatchError, match="no host swap pool.*swap_pool_size.*cpu_mem_budget_in_gb"):
        PageOps(swap_in=pairs(0, 1)).validate(16, 0, 64)


def test_slot_runs():
    assert slot_runs(np.array([], np.int64)) == []
    assert slot_runs(np.array([3, 4, 5, 9, 10, 12, 12])) == [(0, 3), (3, 5), (5, 6), (6, 7)]


def test_word_is_the_widest_that_divides_every_layer():
    assert page_mover.word_for([1024, 128, 512]) == (8, torch.int64)
    assert page_mover.word_for([16, 6]) == (2, torch.int16)
    assert page_mover.word_for([3, 8]) == (1, torch.uint8)


# ---- ModelExecutor -----------------------------------------------------------------------------------


def test_capabilities_describe_pages(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    ex = ModelExecutor(spec(path))
    caps = ex.capabilities
    # 2 layers * (K, V) * 4 slots * 2 kv heads * 16 dims * 4 bytes
    assert caps.page_nbytes == 2 * 2 * PS * 2 * 16 * 4 == page_bytes(ex.model_config, PS, torch.float32)
    assert caps.num_swap_slots == 8 and ex.page_mover.pool.rows.shape == (8, caps.page_nbytes)
    assert caps.kv_fingerprint.startswith("qwen3-")
    assert ModelExecutor(spec(path, swap_slots=0)).page_mover.pool is None


def test_copy_pages_then_fork_decodes_like_the_original(arch_path):
    ex = ModelExecutor(spec(arch_path))
    prefill(ex, PROMPT, [0, 1, 2])
    ex.page_ops(PageOps(copy=pairs(0, 5, 1, 6, 2, 7)))
    assert np.array_equal(read(ex, [0, 1, 2]), read(ex, [5, 6, 7]))
    # copy-on-write fork: share the full pages 0, 1, copy only the partial last page
    ex.page_ops(PageOps(copy=pairs(2, 9)))
    fork = decode_logits(ex, 44, 10, [0, 1, 9])
    orig = decode_logits(ex, 44, 10, [0, 1, 2])
    np.testing.assert_array_equal(fork, orig)
    # the fork's own token went to page 9 only: the original's page 2 still decodes the same afterwards
    assert not np.array_equal(decode_logits(ex, 45, 10, [0, 1, 9]), orig)
    np.testing.assert_array_equal(decode_logits(ex, 44, 10, [0, 1, 2]), orig)


def test_copy_reads_every_source_before_writing():
    ex_pages = [torch.arange(5 * 8, dtype=torch.float32).reshape(5, 2, 1, 1, 4)]  # 5 pages of 32 bytes
    mover = page_mover.PageMover(ex_pages, 0, torch.device("cpu"))
    before = ex_pages[0].clone()
    mover.apply(PageOps(copy=pairs(0, 1, 1, 2, 2, 0)))  # a rotation: 0 -> 1 -> 2 -> 0
    assert torch.equal(ex_pages[0][[1, 2, 0]], before[[0, 1, 2]]) and torch.equal(ex_pages[0][3:], before[3:])


def test_mover_on_layers_of_different_shapes_and_dtypes(monkeypatch):
    """Per-layer tensors may differ (head dims, KV heads, even dtype): a page's bytes concatenate them all."""
    monkeypatch.setattr(page_mover, "STAGING_BYTES", 1000)  # < one page: one page per chunk
    gen = torch.Generator().manual_seed(0)
    layers = [
        torch.randn(12, 2, 4, 2, 16, generator=gen),  # fp32, 2 heads of 16: 1024 bytes a page
        torch.randn(12, 2, 4, 1, 8, generator=gen).to(torch.bfloat16),  # bf16, 1 head of 8: 128 bytes
        torch.randn(12, 2, 4, 4, 4, generator=gen),  # fp32, 4 heads of 4: 512 bytes
    ]
    orig = [t.clone() for t in layers]
    m = page_mover.PageMover(layers, 6, torch.device("cpu"))
    assert m.page_nbytes == 1024 + 128 + 512 and m.offsets == [0, 1024, 1152, 1664] and m.chunk == 1
    assert m.word == 8 and m.word_offsets == [0, 128, 144, 208]
    data = m.apply(PageOps(read=ids(3, 7))).data
    assert data[0, 1024:1152].tobytes() == orig[1][3].contiguous().view(torch.uint8).numpy().tobytes()
    m.apply(PageOps(swap_out=pairs(3, 5, 7, 0, 8, 1, 9, 4)))
    for t in layers:
        t[3:10] = 0
    m.apply(
        PageOps(swap_in=pairs(0, 8, 1, 9, 4, 3, 5, 2), copy=pairs(0, 7), write=ids(1), write_data=data[1:])
    )
    for t, o in zip(layers, orig, strict=True):
        for dst, src in [(8, 7), (9, 8), (3, 9), (2, 3), (7, 0), (1, 7)]:
            assert torch.equal(t[dst], o[src]), (dst, src)


@pytest.mark.parametrize("staging_bytes", [page_mover.STAGING_BYTES, 1])  # 1: one page per chunk
def test_swap_out_clobber_swap_in_decodes_like_never_swapped(arch_path, staging_bytes, monkeypatch):
    monkeypatch.setattr(page_mover, "STAGING_BYTES", staging_bytes)
    ref = ModelExecutor(spec(arch_path))
    prefill(ref, PROMPT, [0, 1, 2])
    expected = decode_logits(ref, 44, 10, [0, 1, 2])

    ex = ModelExecutor(spec(arch_path))
    assert ex.page_mover.chunk == max(1, staging_bytes // ex.page_mover.page_nbytes)
    prefill(ex, PROMPT, [0, 1, 2])
    saved = read(ex, [0, 1, 2])
    ex.page_ops(PageOps(swap_out=pairs(0, 5, 1, 3, 2, 4)))  # slots out of order: runs [3, 4, 5]
    prefill(ex, OTHER, [0, 1, 2])  # another sequence takes the pages
    assert not np.array_equal(read(ex, [0, 1, 2]), saved)
    # restore into other pages (the originals stay taken), then decode on
    ex.page_ops(PageOps(swap_in=pairs(5, 11, 3, 12, 4, 10)))
    assert np.array_equal(read(ex, [11, 12, 10]), saved)
    np.testing.assert_array_equal(decode_logits(ex, 44, 10, [11, 12, 10]), expected)


def test_one_call_runs_the_steps_in_order(tiny_checkpoint):
    """swap_out -> copy -> swap_in -> write -> read in one PageOps: each step sees the one before."""
    ex = ModelExecutor(spec(tiny_checkpoint("qwen3")))
    prefill(ex, PROMPT, [0, 1, 2])
    a = read(ex, [0, 1, 2])
    blob = np.random.default_rng(0).integers(0, 255, (1, a.shape[1]), dtype=np.uint8)
    res = ex.page_ops(
        PageOps(
            swap_out=pairs(0, 0),  # page 0 -> slot 0 (before the copy overwrites page 0)
            copy=pairs(1, 0),  # page 1 -> page 0
            swap_in=pairs(0, 1),  # slot 0 (old page 0) -> page 1: pages 0 and 1 swapped
            write=ids(1),  # then page 1 is overwritten ...
            write_data=blob,
            read=ids(0, 1, 2),  # ... and the read sees all of it
        )
    )
    assert np.array_equal(res.data[0], a[1]) and np.array_equal(res.data[1], blob[0])
    assert np.array_equal(res.data[2], a[2])
    assert ex.page_ops(PageOps(swap_in=pairs(0, 3), read=ids(3))).data.tobytes() == a[0].tobytes()
    assert ex.page_ops(PageOps()).data is None


def test_read_write_round_trip_into_another_executor(arch_path):
    a = ModelExecutor(spec(arch_path))
    prefill(a, PROMPT, [0, 1, 2])
    data = read(a, [0, 1, 2])
    assert data.dtype == np.uint8 and data.shape == (3, a.capabilities.page_nbytes)
    expected = decode_logits(a, 44, 10, [0, 1, 2])
    b = ModelExecutor(spec(arch_path, num_pages=20))  # another process, same fingerprint
    assert b.capabilities.kv_fingerprint == a.capabilities.kv_fingerprint
    b.page_ops(PageOps(write=ids(7, 3, 15), write_data=data))
    np.testing.assert_array_equal(decode_logits(b, 44, 10, [7, 3, 15]), expected)


def test_executor_rejects_bad_ops(tiny_checkpoint):
    ex = ModelExecutor(spec(tiny_checkpoint("qwen3"), swap_slots=0))
    with pytest.raises(BatchError, match="no host swap pool"):
        ex.page_ops(PageOps(swap_out=pairs(0, 0)))
    with pytest.raises(BatchError, match="16 is not a valid"):
        ex.page_ops(PageOps(read=ids(16)))  # one past num_pages (a CUDA-graph scratch page is never named)
    with pytest.raises(BatchError, match=r"write_data must be uint8 of shape \[1, 2048\]"):
        ex.page_ops(PageOps(write=ids(0), write_data=np.zeros((1, 1000), np.uint8)))


def test_swap_pool_larger_than_host_memory_is_refused(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(page_mover, "host_available_bytes", lambda: 1 << 20)
    with pytest.raises(DriverError, match="swap pool needs .* GiB of host memory.*lower swap_pool_size"):
        ModelExecutor(spec(tiny_checkpoint("qwen3"), swap_slots=4096))


# ---- fingerprint -----------------------------------------------------------------------------------


def test_kv_fingerprint_tracks_what_makes_bytes_valid(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen3")
    fp = ModelExecutor(spec(path)).capabilities.kv_fingerprint
    assert ModelExecutor(spec(path, num_pages=4, swap_slots=0)).capabilities.kv_fingerprint == fp
    assert ModelExecutor(spec(path, page_size=8)).capabilities.kv_fingerprint != fp
    assert ModelExecutor(spec(path, activation_dtype="bfloat16")).capabilities.kv_fingerprint != fp
    assert ModelExecutor(spec(tiny_checkpoint("qwen2"))).capabilities.kv_fingerprint != fp
    # same config, different weights (one byte of one tensor)
    shutil.copytree(path, tmp_path / "tuned")
    st = tmp_path / "tuned" / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-3] ^= 0x40
    st.write_bytes(bytes(raw))
    assert ModelExecutor(spec(tmp_path / "tuned")).capabilities.kv_fingerprint != fp
    r0 = ModelExecutor(spec(path, random_weights=True, seed=0)).capabilities.kv_fingerprint
    assert (
        r0 != fp and r0 != ModelExecutor(spec(path, random_weights=True, seed=1)).capabilities.kv_fingerprint
    )


def test_weights_identity_samples_large_files(tmp_path):
    header = b'{"__metadata__":{}}'
    body = np.random.default_rng(0).integers(0, 255, 3 << 20, dtype=np.uint8).tobytes()  # 3 MiB > 1 MiB
    st = tmp_path / "model.safetensors"
    st.write_bytes(len(header).to_bytes(8, "little") + header + body)
    a = weights_identity(tmp_path)
    raw = bytearray(st.read_bytes())
    raw[len(raw) // 2] ^= 1  # the middle of the file is one of the sampled chunks' neighbourhoods
    raw[-1] ^= 1  # the last chunk always ends at the end of the file
    st.write_bytes(bytes(raw))
    assert weights_identity(tmp_path) != a


# ---- drivers -----------------------------------------------------------------------------------------


def run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_inprocess_driver_orders_page_ops_with_forwards(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    ref = ModelExecutor(spec(path))
    prefill(ref, PROMPT, [0, 1, 2])
    expected = decode_logits(ref, 44, 10, [0, 1, 2])

    async def main():
        d = InProcessDriver(spec(path))
        caps = await d.start()
        assert caps.num_swap_slots == 8 and caps.page_nbytes == ref.capabilities.page_nbytes
        # submitted back to back without waiting: each sees the one before
        _, out, _, _, res = await asyncio.gather(
            d.forward(make_batch([req(PROMPT, 0, [0, 1, 2])], PS)),
            d.page_ops(PageOps(swap_out=pairs(0, 0, 1, 1, 2, 2))),
            d.forward(make_batch([req(OTHER, 0, [0, 1, 2])], PS)),
            d.page_ops(PageOps(swap_in=pairs(0, 4, 1, 5, 2, 6))),
            d.forward(make_batch([req([44], 10, [4, 5, 6], outputs=[0], return_logits=True)], PS)),
        )
        assert out.data is None
        np.testing.assert_array_equal(res.logits[0], expected)
        with pytest.raises(BatchError, match="not a valid device page"):
            await d.page_ops(PageOps(read=ids(99)))
        await d.shutdown()
        with pytest.raises(DriverError, match="not running"):
            await d.page_ops(PageOps())

    run(main())


def test_dev_driver_subprocess_page_ops(tiny_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("PIE_HOME", str(tmp_path))
    for var in ("PIE_PYTHON", "VIRTUAL_ENV"):
        monkeypatch.delenv(var, raising=False)
    path = tiny_checkpoint("llama")
    ref = ModelExecutor(spec(path))
    prefill(ref, PROMPT, [0, 1, 2])
    saved = read(ref, [0, 1, 2])
    expected = decode_logits(ref, 44, 10, [0, 1, 2])

    async def main():
        d = DevDriver(spec(path), python=sys.executable)
        await d.start()
        try:
            await check(d)
        finally:
            await d.shutdown()

    async def check(d: DevDriver):
        caps = d.capabilities
        assert (caps.num_swap_slots, caps.page_nbytes) == (8, saved.shape[1])
        assert caps.kv_fingerprint == ref.capabilities.kv_fingerprint
        prefill_batch = make_batch([req(PROMPT, 0, [0, 1, 2])], PS)
        _, got, _, _ = await asyncio.gather(
            d.forward(prefill_batch),
            d.page_ops(PageOps(swap_out=pairs(0, 7, 1, 6, 2, 5), read=ids(0, 1, 2))),
            d.forward(make_batch([req(OTHER, 0, [0, 1, 2])], PS)),
            d.page_ops(PageOps(swap_in=pairs(7, 8, 6, 9, 5, 3))),
        )
        assert np.array_equal(got.data, saved)
        res = await d.forward(make_batch([req([44], 10, [8, 9, 3], outputs=[0], return_logits=True)], PS))
        np.testing.assert_array_equal(res.logits[0], expected)
        # written bytes from the parent process, then a bad request: an error for it only
        await d.page_ops(PageOps(write=ids(12, 13, 14), write_data=saved))
        res = await d.forward(make_batch([req([44], 10, [12, 13, 14], outputs=[0], return_logits=True)], PS))
        np.testing.assert_array_equal(res.logits[0], expected)
        with pytest.raises(BatchError, match="swap_out: 8 is not a valid host swap slot"):
            await d.page_ops(PageOps(swap_out=pairs(0, 8)))
        assert (await d.page_ops(PageOps(read=ids(3)))).data.shape == (1, saved.shape[1])

    run(main())


def test_base_driver_without_page_ops_says_so():
    from pie.drivers.base import Driver

    class NoPages(Driver):
        async def start(self):
            return None

        async def forward(self, batch):
            return None

        async def shutdown(self):
            return None

    with pytest.raises(DriverError, match="NoPages.*cannot move pages"):
        run(NoPages().page_ops(PageOps()))


def test_fake_driver_page_ops():
    async def main():
        d = FakeDriver(num_pages=16, page_size=4, num_swap_slots=4)
        caps = await d.start()
        assert (caps.num_swap_slots, caps.page_nbytes, caps.kv_fingerprint) == (4, 64, "fake-4")
        toks = [5, 9, 40, 7, 300, 12]  # 6 tokens: pages [0, 1], the second holds 2
        r = await d.forward(make_batch([req(toks, 0, [0, 1], outputs=[5])], 4))
        assert int(r.tokens[0]) == fake_next(toks, range(6), 1000)
        saved = (await d.page_ops(PageOps(read=ids(0, 1)))).data
        assert saved.shape == (2, 64) and saved.view(np.int64)[1, :6].tolist() == [300, 12, -1, -1, 4, 5]
        # swap out, clobber, swap in elsewhere; a gated forward queued before the page ops runs first
        d.gate = asyncio.Event()
        clobber = asyncio.create_task(d.forward(make_batch([req([1, 2, 3, 4, 5], 0, [0, 1])], 4)))
        ops = asyncio.create_task(d.page_ops(PageOps(swap_out=pairs(0, 3, 1, 2), read=ids(0))))
        await asyncio.sleep(0.01)
        assert not ops.done()  # waits behind the gated forward
        d.gate.set()
        await clobber
        out = (await ops).data
        assert out.view(np.int64)[0, :4].tolist() == [1, 2, 3, 4]  # the clobber was swapped out, not `toks`
        await d.page_ops(PageOps(write=ids(0, 1), write_data=saved))
        await d.page_ops(PageOps(copy=pairs(1, 9)))  # CoW of the partial page
        r = await d.forward(make_batch([req([77], 6, [0, 9], outputs=[0])], 4))
        assert int(r.tokens[0]) == fake_next(toks + [77], range(7), 1000)
        r = await d.page_ops(PageOps(swap_in=pairs(3, 10, 2, 11), read=ids(10, 11)))
        assert r.data.view(np.int64)[:, :4].tolist() == [[1, 2, 3, 4], [5, 12, -1, -1]]
        with pytest.raises(BatchError, match="not a valid host swap slot"):
            await d.page_ops(PageOps(swap_out=pairs(0, 4)))
        assert len(d.page_op_log) == 5
        d.fail_page_ops_if = lambda ops: DriverError("swap failed") if len(ops.swap_out) else None
        with pytest.raises(DriverError, match="swap failed"):
            await d.page_ops(PageOps(swap_out=pairs(0, 0)))
        assert (await d.page_ops(PageOps(read=ids(0)))).data.shape == (1, 64)

    run(main())


# ---- config -> ExecutorSpec ------------------------------------------------------------------------


def _entry(tiny_path, text: str):
    return parse_config(tomllib.loads(text.format(path=tiny_path)), "cfg.toml").default_model


def test_factory_sets_swap_slots_and_page_cap(tiny_checkpoint, tmp_path, monkeypatch):
    isolate(tmp_path, monkeypatch)
    path = tiny_checkpoint("qwen3")
    dev = _entry(path, '[[model]]\nhf_repo = "{path}"\n[model.driver]\ntype = "dev"\n'
                       "[model.driver.options]\ncpu_mem_budget_in_gb = 0.001\nmax_num_kv_pages = 6\n")  # fmt: skip
    s = executor_spec(dev)
    # one page: 2 layers * 2 * 16 tokens * 2 heads * 16 dims * 4 bytes = 8 KiB; 0.001 GiB = 1073741.8 bytes
    assert s.swap_slots == 1073741 // 8192 == 131 and s.max_num_kv_pages == 6 and s.kv_policy == "dev"
    ex = ModelExecutor(s)
    assert ex.num_pages == 6 and ex.capabilities.num_swap_slots == 131  # the cap binds on CPU too
    assert (
        executor_spec(
            _entry(path, '[[model]]\nhf_repo = "{path}"\n[model.driver]\ntype = "dev"\n')
        ).swap_slots
        == 0
    )
    tiny = _entry(path, '[[model]]\nhf_repo = "{path}"\n[model.driver]\ntype = "dev"\n'
                        "[model.driver.options]\ncpu_mem_budget_in_gb = 0.000001\n")  # fmt: skip
    with pytest.raises(ConfigError, match="cpu_mem_budget_in_gb = 1e-06 holds no KV page"):
        executor_spec(tiny)
    cuda = _entry(path, '[[model]]\nhf_repo = "{path}"\n[model.driver.options]\nswap_pool_size = 64\n')
    s = executor_spec(cuda)
    assert (s.swap_slots, s.kv_policy, s.max_num_kv_pages) == (64, "cuda_native", 1024)
