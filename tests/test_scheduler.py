"""Scheduler with the fake driver: caps, chunked prefill, routing, FIFO, failures, page release."""

import asyncio

import numpy as np
import pytest
from fake_driver import FakeDriver, fake_next

from pie.drivers.protocol import BatchError
from pie.errors import DriverError
from pie.runtime.pages import PageAllocator
from pie.runtime.passes import PassRequest, sampler_rows
from pie.runtime.scheduler import Scheduler


class Seq:
    """A context as the SDK keeps one: its pages, KV length and (for reference checks) history."""

    def __init__(self, alloc: PageAllocator, page_size: int):
        self.alloc, self.ps = alloc, page_size
        self.pages = np.zeros(0, dtype=np.int32)
        self.tokens: list[int] = []

    def pass_(self, tokens, outputs=(), mask=None, return_logprobs=False, **sampler) -> PassRequest:
        start, n = len(self.tokens), len(tokens)
        need = -(-(start + n) // self.ps) - len(self.pages)
        self.pages = np.concatenate([self.pages, self.alloc.alloc(need)])
        self.tokens += list(tokens)
        return PassRequest(
            token_ids=np.asarray(tokens, dtype=np.int64),
            positions=np.arange(start, start + n, dtype=np.int64),
            pages=self.pages.copy(),
            kv_end=start + n,
            outputs=np.asarray(outputs, dtype=np.int32),
            samplers=sampler_rows(len(outputs), **sampler),
            mask=mask,
            return_logprobs=return_logprobs,
        )

    def expect(self, upto: int, vocab: int = 1000) -> int:
        """The fake driver's token after the first `upto` tokens of this sequence, run causally."""
        return fake_next(self.tokens[:upto], range(upto), vocab)

    def close(self):
        self.alloc.decref(self.pages)


async def started(driver: FakeDriver) -> tuple[Scheduler, PageAllocator]:
    """A running scheduler and an allocator for the test's sequences (the scheduler never allocates)."""
    caps = await driver.start()
    alloc = PageAllocator(caps.num_pages)
    s = Scheduler(driver, caps)
    s.start()
    return s, alloc


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_batches_respect_caps_and_fifo_order():
    async def main():
        d = FakeDriver(max_batch_tokens=32, max_batch_size=3)
        s, alloc = await started(d)
        seqs = [Seq(alloc, 4) for _ in range(10)]
        futs = [s.submit(q.pass_([100 + i] * 10, outputs=[9])) for i, q in enumerate(seqs)]
        res = await asyncio.gather(*futs)
        assert [b.num_requests for b in d.batches] == [3, 3, 3, 1]
        assert all(b.num_tokens <= 32 for b in d.batches)
        # FIFO: request r of batch k is pass 3k + r
        firsts = [b.token_ids[b.qo_indptr[:-1]].tolist() for b in d.batches]
        assert firsts == [[100, 101, 102], [103, 104, 105], [106, 107, 108], [109]]
        assert [int(r.tokens[0]) for r in res] == [q.expect(10) for q in seqs]
        assert d.max_in_flight == 1
        await s.stop()

    run(main())


def test_chunked_prefill_boundaries_pages_and_merged_outputs():
    async def main():
        d = FakeDriver(max_batch_tokens=8, max_batch_size=4, page_size=4)
        s, alloc = await started(d)
        a, b = Seq(alloc, 4), Seq(alloc, 4)
        fa = s.submit(a.pass_(list(range(1, 20)), outputs=[18, 2, 9]))  # 19 tokens: 8 + 8 + 3
        fb = s.submit(b.pass_([7, 8, 9, 10, 11], outputs=[4]))
        ra, rb = await asyncio.gather(fa, fb)
        assert [bt.qo_lens().tolist() for bt in d.batches] == [[8], [8], [3, 5]]
        # KV length truncated to each chunk's end: 8, 16, 19 -> pages 2, 4, 5; last page 4, 4, 3
        assert [bt.kv_page_indptr.tolist() for bt in d.batches] == [[0, 2], [0, 4], [0, 5, 7]]
        assert [bt.kv_last_page_len.tolist() for bt in d.batches] == [[4], [4], [3, 1]]
        assert d.batches[2].kv_page_indices.tolist() == [0, 1, 2, 3, 4, 5, 6]
        # outputs routed to the chunk holding their row (global rows within each batch)
        assert [bt.output_indices.tolist() for bt in d.batches] == [[2], [1], [2, 7]]
        # merged in the caller's order, equal to running the prompt unchunked
        assert ra.tokens.tolist() == [a.expect(19), a.expect(3), a.expect(10)]
        assert rb.tokens.tolist() == [b.expect(5)]
        await s.stop()

    run(main())


def test_chunk_of_a_context_with_existing_kv():
    async def main():
        d = FakeDriver(max_batch_tokens=8, page_size=4)
        s, alloc = await started(d)
        q = Seq(alloc, 4)
        await s.submit(q.pass_([5] * 6))  # KV 6: pages [0, 1]
        r = await s.submit(q.pass_(list(range(10)), outputs=[0, 9]))  # KV 6 -> 16, chunks 8 + 2
        b1, b2 = d.batches[1:]
        assert (b1.num_tokens, b1.kv_page_indptr[-1], int(b1.kv_last_page_len[0])) == (8, 4, 2)  # KV 14
        assert (b2.num_tokens, b2.kv_page_indptr[-1], int(b2.kv_last_page_len[0])) == (2, 4, 4)  # KV 16
        assert r.tokens.tolist() == [q.expect(7), q.expect(16)]
        await s.stop()

    run(main())


def test_chunked_mask_rows_and_columns():
    async def main():
        d = FakeDriver(max_batch_tokens=4, page_size=4)
        s, alloc = await started(d)
        q = Seq(alloc, 4)
        rng = np.random.default_rng(0)
        mask = np.tril(rng.random((7, 7)) < 0.5)  # sparse but never looking ahead: chunkable
        mask[np.arange(7), np.arange(7)] = True
        r = await s.submit(q.pass_([3, 1, 4, 1, 5, 9, 2], outputs=[1, 6], mask=mask))
        b1, b2 = d.batches
        assert b1.mask.tolist() == mask[:4, :4].reshape(-1).tolist()
        assert b2.mask.tolist() == mask[4:, :7].reshape(-1).tolist()
        assert b2.mask_indptr.tolist() == [0, 21]
        # reference: the same pass unchunked
        d2 = FakeDriver(page_size=4)
        s2, alloc2 = await started(d2)
        r2 = await s2.submit(Seq(alloc2, 4).pass_([3, 1, 4, 1, 5, 9, 2], outputs=[1, 6], mask=mask))
        assert len(d2.batches) == 1
        assert r.tokens.tolist() == r2.tokens.tolist()
        await s.stop()
        await s2.stop()

    run(main())


def test_lookahead_mask_is_never_split():
    async def main():
        d = FakeDriver(max_batch_tokens=4, page_size=4)
        s, alloc = await started(d)
        full = np.ones((3, 3), dtype=bool)  # bidirectional over the pass
        f1 = s.submit(Seq(alloc, 4).pass_([1, 2]))
        f2 = s.submit(Seq(alloc, 4).pass_([5, 6, 7], outputs=[0], mask=full))
        await asyncio.gather(f1, f2)
        assert [b.qo_lens().tolist() for b in d.batches] == [[2], [3]]  # waited instead of splitting
        with pytest.raises(BatchError, match="cannot be split"):
            s.submit(Seq(alloc, 4).pass_([1] * 5, mask=np.ones((5, 5), dtype=bool)))
        await s.stop()

    run(main())


def test_unsorted_duplicate_outputs_with_extras_are_merged_in_order():
    async def main():
        d = FakeDriver(max_batch_tokens=4, page_size=4)
        s, alloc = await started(d)
        q = Seq(alloc, 4)
        p = q.pass_(
            [9, 8, 7, 6, 5, 4],
            outputs=[5, 1, 5],
            return_logprobs=True,
            dist_k=[3, 0, 2],
            return_logits=[True, False, True],
        )
        r = await s.submit(p)
        want = [q.expect(6), q.expect(2), q.expect(6)]
        assert r.tokens.tolist() == want
        assert r.logprobs.tolist() == pytest.approx([-t / 1000 for t in want])
        assert r.dist_ids.tolist() == [
            [want[0], want[0] + 1, want[0] + 2],
            [-1, -1, -1],
            [want[2], want[2] + 1, -1],
        ]
        assert r.logits.shape == (2, 1000) and r.logits.argmax(1).tolist() == [want[0], want[2]]
        await s.stop()

    run(main())


def test_failing_batch_fails_only_its_passes_and_frees_pages():
    async def main():
        d = FakeDriver(max_batch_size=2)
        d.fail_if = lambda b: DriverError("boom: CUDA error") if 777 in b.token_ids else None
        s, alloc = await started(d)
        seqs = [Seq(alloc, 4) for _ in range(5)]
        toks = [[1, 2], [3, 4], [777], [5], [6, 7]]
        futs = [s.submit(q.pass_(t, outputs=[len(t) - 1])) for q, t in zip(seqs, toks, strict=True)]
        res = await asyncio.gather(*futs, return_exceptions=True)
        assert [type(r).__name__ for r in res] == [
            "ForwardResult",
            "ForwardResult",
            "DriverError",
            "DriverError",
            "ForwardResult",
        ]
        assert "boom: CUDA error" in str(res[2]) and "boom" in str(res[3])
        assert int(res[4].tokens[0]) == seqs[4].expect(2)
        for q in seqs:
            q.close()
        assert alloc.num_free == alloc.num_pages
        await s.stop()

    run(main())


def test_batch_error_and_chunk_remainder_of_failed_pass_never_runs():
    async def main():
        d = FakeDriver(max_batch_tokens=4)
        d.fail_if = lambda b: BatchError("bad batch") if len(d.batches) == 1 else None
        s, alloc = await started(d)
        q, other = Seq(alloc, 4), Seq(alloc, 4)
        f = s.submit(q.pass_(list(range(10)), outputs=[9]))
        g = s.submit(other.pass_([1], outputs=[0]))
        with pytest.raises(BatchError, match="bad batch"):
            await f
        assert int((await g).tokens[0]) == other.expect(1)
        # the failed pass's chunks 2 and 3 were never sent
        assert [b.num_tokens for b in d.batches] == [4, 1]
        await s.stop()

    run(main())


def test_cancelled_pass_is_dropped_before_it_runs():
    async def main():
        d = FakeDriver()
        d.gate = asyncio.Event()
        s, alloc = await started(d)
        q1, q2, q3 = Seq(alloc, 4), Seq(alloc, 4), Seq(alloc, 4)
        f1 = s.submit(q1.pass_([1] * 5, outputs=[4]))
        await asyncio.sleep(0.01)  # f1 is in flight, held at the gate
        f2 = s.submit(q2.pass_([2] * 3, outputs=[2]))
        f3 = s.submit(q3.pass_([3] * 2, outputs=[1]))
        f2.cancel()
        await asyncio.sleep(0)  # the future's done-callbacks run on the next loop turn
        assert s.num_queued == 1
        d.gate.set()
        await asyncio.gather(f1, f3)
        assert [b.token_ids.tolist() for b in d.batches] == [[1] * 5, [3] * 2]
        await s.stop()

    run(main())


def test_work_arriving_during_a_step_joins_the_next_step_together():
    async def main():
        d = FakeDriver(max_batch_size=8)
        d.gate = asyncio.Event()
        s, alloc = await started(d)
        f1 = s.submit(Seq(alloc, 4).pass_([1]))
        await asyncio.sleep(0.01)  # step 1 runs; the loop has pre-built step 2 from an empty queue
        f2 = s.submit(Seq(alloc, 4).pass_([2]))
        await asyncio.sleep(0.01)  # the pre-built step 2 holds f2 only
        f3 = s.submit(Seq(alloc, 4).pass_([3]))
        d.gate.set()
        await asyncio.gather(f1, f2, f3)
        # step 2 had room and f3 came after it was built: it was rebuilt to take both
        assert [b.token_ids.tolist() for b in d.batches] == [[1], [2, 3]]
        assert d.max_in_flight == 1
        await s.stop()

    run(main())


def test_invalid_pass_is_rejected_at_submit():
    async def main():
        d = FakeDriver(vocab_size=50)
        s, alloc = await started(d)
        with pytest.raises(BatchError, match="token id out of range 0..49"):
            s.submit(Seq(alloc, 4).pass_([60]))
        with pytest.raises(BatchError, match="output rows"):
            s.submit(Seq(alloc, 4).pass_([1], outputs=[3]))
        with pytest.raises(BatchError, match="max_dist_size"):
            s.submit(Seq(alloc, 4).pass_([1], outputs=[0], dist_k=99))
        await s.stop()
        with pytest.raises(DriverError, match="shut down"):
            s.submit(Seq(alloc, 4).pass_([1]))

    run(main())


def test_stop_fails_queued_passes():
    async def main():
        d = FakeDriver()
        d.gate = asyncio.Event()
        s, alloc = await started(d)
        f = s.submit(Seq(alloc, 4).pass_([1]))
        await asyncio.sleep(0.01)
        g = s.submit(Seq(alloc, 4).pass_([2]))
        stopper = asyncio.create_task(s.stop())
        await asyncio.sleep(0.01)
        d.gate.set()
        await stopper
        for fut in (f, g):
            with pytest.raises(DriverError, match="shut down"):
                fut.result()

    run(main())
