"""The runtime core on the fake driver: page ownership, memory pressure, decode-first scheduling,
prefix sharing, snapshots and engine-side generation. The fake driver's tokens depend on every KV
slot a row sees, so any page mix-up changes the output."""

import asyncio
import random

import pytest
from fake_driver import FakeDriver, fake_next
from runtime_checks import assert_all_free, check_refcounts

from pie.drivers.protocol import ForwardBatch
from pie.errors import PieError
from pie.runtime.engine import Engine
from pie.runtime.kvcache import SnapshotError
from pie.sdk import Context, Model, Sampler, runtime


def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def greedy(prompt, steps, vocab=1000):
    seq = list(prompt)
    for _ in range(steps):
        seq.append(fake_next(seq, range(len(seq)), vocab))
    return seq[len(prompt) :]


def watch_writers(d: FakeDriver, engine: Engine, violations: list[str]) -> None:
    """Check every batch: no KV page is written by two requests, and no written page is shared."""
    ps = d.caps.page_size

    def check(b: ForwardBatch):
        kv = engine.model().kv
        kv_lens, qo = b.kv_lens(ps), b.qo_lens()
        owner: dict[int, int] = {}
        for r in range(b.num_requests):
            pages = b.kv_page_indices[b.kv_page_indptr[r] : b.kv_page_indptr[r + 1]]
            first, last = int(kv_lens[r] - qo[r]), int(kv_lens[r] - 1)
            for p in set(pages[first // ps : last // ps + 1].tolist()):
                if owner.setdefault(p, r) != r:
                    violations.append(f"page {p} written by requests {owner[p]} and {r}")
                if kv.alloc.refcount(p) > 1:
                    violations.append(f"shared page {p} (refs {kv.alloc.refcount(p)}) written")
        return None

    d.fail_if = check


async def engine_on(d: FakeDriver, **kw) -> Engine:
    e = Engine.from_drivers({"fake": (d, None)}, **kw)
    await e.start()
    return e


# ---- page ownership ---------------------------------------------------------------------------------


def test_close_while_queued_never_hands_a_page_to_two_writers():
    async def main():
        d = FakeDriver(num_pages=4, page_size=4)
        e = await engine_on(d)
        bad: list[str] = []
        watch_writers(d, e, bad)

        async def inferlet(_):
            m = Model.load()
            a, b = Context(m), Context(m)
            d.gate = asyncio.Event()  # hold the driver: a's pass stays queued / in flight
            ta = asyncio.ensure_future(a.append([1, 2, 3, 4, 5]).flush())
            await asyncio.sleep(0.01)
            a.close()  # frees a's pages while its pass is in flight
            tb = asyncio.ensure_future(b.append([7, 8, 9]).flush())
            await asyncio.sleep(0.01)
            d.gate.set()
            await asyncio.gather(ta, tb, return_exceptions=True)
            assert await b.generate(max_tokens=3).collect_tokens() == greedy([7, 8, 9], 3)
            return "ok"

        assert await e.run_inferlet(inferlet, {}) == "ok"
        assert not bad, bad
        assert_all_free(e.model())
        await e.shutdown()

    run(main())


def test_gather_sibling_failure_closes_contexts_with_passes_queued():
    async def main():
        d = FakeDriver(num_pages=8, page_size=4)
        e = await engine_on(d)
        bad: list[str] = []
        watch_writers(d, e, bad)

        async def inferlet(_):
            m = Model.load()

            async def long():
                ctx = Context(m).append(list(range(1, 30)))
                return await ctx.generate(max_tokens=20).collect_tokens()

            async def boom():
                await asyncio.sleep(0.001)
                raise RuntimeError("tool failed")

            await asyncio.gather(long(), boom())

        with pytest.raises(RuntimeError, match="tool failed"):
            await e.run_inferlet(inferlet, {})

        async def after(_):  # the pages come back whole and a new context runs on them correctly
            ctx = Context(Model.load()).append([5, 6, 7])
            return str(await ctx.generate(max_tokens=4).collect_tokens())

        assert await e.run_inferlet(after, {}) == str(greedy([5, 6, 7], 4))
        await asyncio.sleep(0.05)
        assert not bad, bad
        assert_all_free(e.model())
        await e.shutdown()

    run(main())


def test_randomized_fork_save_truncate_close_fail_keeps_pages_consistent():
    """Many contexts doing random lifecycle operations; every batch is checked for shared writers,
    every output against a reference run of the same token history, and all pages come back."""
    rng = random.Random(7)

    async def main():
        d = FakeDriver(num_pages=96, page_size=4, max_batch_tokens=48, max_batch_size=8)
        e = await engine_on(d)
        bad: list[str] = []
        watch_writers(d, e, bad)
        fail_next = {"n": 0}
        check = d.fail_if

        def maybe_fail(b):
            check(b)
            check_refcounts(e.model())
            if fail_next["n"] and rng.random() < 0.3:
                fail_next["n"] -= 1
                return PieError("injected driver failure")
            return None

        d.fail_if = maybe_fail

        async def worker(i):
            m = Model.load()
            ctxs = [Context(m).append([i + 1, 2, 3])]
            for _step in range(25):
                ctx = rng.choice(ctxs)
                op = rng.random()
                try:
                    if op < 0.35:
                        before = ctx.tokens
                        toks = await ctx.generate(
                            max_tokens=rng.randint(1, 6), ignore_eos=True
                        ).collect_tokens()
                        assert toks == greedy(before, len(toks))
                    elif op < 0.5 and len(ctxs) < 4:
                        await ctx.flush()
                        ctxs.append(ctx.fork())
                    elif op < 0.6 and ctx.seq_len > 2:
                        await ctx.flush()
                        ctx.truncate(rng.randint(1, ctx.seq_len - 1))
                    elif op < 0.7:
                        await ctx.flush()
                        name = ctx.snapshot()
                        c2 = Context.open(m, name)
                        Context.delete(m, name)
                        ctxs.append(c2)
                    elif op < 0.78 and len(ctxs) > 1:
                        ctxs.remove(ctx)
                        ctx.release()
                    elif op < 0.85:
                        fail_next["n"] += 1
                        ctx.append([rng.randint(0, 999)])
                    else:
                        ctx.append([rng.randint(0, 999) for _ in range(rng.randint(1, 9))])
                        before = ctx.tokens
                        (r,) = await ctx.forward().input([]).sample([-1], Sampler.argmax()).execute()
                        assert r.token == fake_next(before, range(len(before)), 1000), (
                            ctx._seq,
                            before,
                            ctx._seq.positions,
                            d.kv_tok[ctx._seq.pages].tolist(),
                            d.kv_pos[ctx._seq.pages].tolist(),
                        )
                except PieError:
                    pass
            # every live context continues exactly as its own history dictates
            for c in ctxs:
                if c.closed:
                    continue
                if not c.buffer():
                    c.append([11])
                for _attempt in range(20):  # other workers may still inject failures
                    hist = c.tokens
                    try:
                        got = await c.generate(max_tokens=2, ignore_eos=True).collect_tokens()
                    except PieError:
                        continue
                    assert got == greedy(hist, 2), (i, hist)
                    break
                else:
                    raise AssertionError("never got through")

        async def inferlet(_):
            await asyncio.gather(*(worker(i) for i in range(6)))
            return "ok"

        assert await e.run_inferlet(inferlet, {}) == "ok"
        assert not bad, bad[:5]
        assert_all_free(e.model())
        await e.shutdown()

    run(main(), timeout=120)


# ---- memory pressure ------------------------------------------------------------------------------


@pytest.mark.parametrize("swap_slots", [0, 64])
def test_three_times_more_kv_demand_than_capacity_loses_nothing(swap_slots):
    """16 contexts of ~34 tokens each need ~3x the 48 pages of 4: preemption (recompute, or swap to a
    host pool) lets every one finish, each with exactly the tokens it produces alone."""

    async def main():
        d = FakeDriver(
            num_pages=48, page_size=4, max_batch_tokens=64, max_batch_size=16, num_swap_slots=swap_slots
        )
        e = await engine_on(d)
        bad: list[str] = []
        watch_writers(d, e, bad)
        prompts = [[(13 * i + j) % 997 + 1 for j in range(10 + i % 5)] for i in range(16)]

        async def inferlet(inp):
            ctx = Context(Model.load()).append(inp["prompt"])
            await asyncio.sleep(0.001 * inp["i"])
            return str(await ctx.generate(max_tokens=22, ignore_eos=True).collect_tokens())

        outs = await asyncio.gather(
            *(e.run_inferlet(inferlet, {"prompt": p, "i": i}) for i, p in enumerate(prompts))
        )
        for p, out in zip(prompts, outs, strict=True):
            assert out == str(greedy(p, 22))
        st = e.model().stats()
        assert st["preemptions"] > 0
        if swap_slots:
            assert st["pages_swapped_out"] > 0 and st["pages_swapped_in"] > 0
        else:
            assert st["preempted_recompute"] > 0
        assert not bad, bad[:5]
        assert_all_free(e.model())
        await e.shutdown()

    run(main())


def test_only_a_context_larger_than_the_whole_cache_fails():
    async def main():
        d = FakeDriver(num_pages=8, page_size=4)
        e = await engine_on(d)

        async def inferlet(_):
            ctx = Context(Model.load()).append(list(range(1, 30)))
            return str(await ctx.generate(max_tokens=10, ignore_eos=True).collect_tokens())

        with pytest.raises(
            PieError, match=r"needs 9 KV pages for 33 tokens, more than the whole cache \(8 pages"
        ):
            await e.run_inferlet(inferlet, {})
        await e.shutdown()

    run(main())


# ---- scheduling -----------------------------------------------------------------------------------


def test_long_prompt_does_not_freeze_running_decodes():
    """A 640-token prompt arrives while 4 contexts decode: every batch that carries a chunk of the
    prompt also carries a step of each of the 4 decoders."""

    async def main():
        d = FakeDriver(num_pages=512, page_size=16, max_batch_tokens=64, max_batch_size=8)
        e = await engine_on(d)

        async def inferlet(_):
            m = Model.load()
            ctxs = [Context(m).append([i + 1, 2, 3]) for i in range(4)]
            tasks = [
                asyncio.ensure_future(c.generate(max_tokens=120, ignore_eos=True).collect_tokens())
                for c in ctxs
            ]
            while min(c.seq_len for c in ctxs) < 10:  # all four are decoding
                await asyncio.sleep(0.001)
            await Context(m).append([(j * 7) % 997 for j in range(640)]).flush()
            outs = await asyncio.gather(*tasks)
            assert outs == [greedy([i + 1, 2, 3], 120) for i in range(4)]
            return "ok"

        assert await e.run_inferlet(inferlet, {}) == "ok"
        prompt_batches = [b for b in d.batches if (b.qo_lens() > 16).any()]
        assert len(prompt_batches) >= 11  # 640 tokens beside 4 decode rows: at most 60 a batch
        for b in prompt_batches:
            assert (b.qo_lens() == 1).sum() == 4, b.qo_lens()
        await e.shutdown()

    run(main())


def test_prefix_sharing_prefills_only_new_tokens_and_matches_unshared():
    prefix = [(j * 31 + 7) % 997 + 1 for j in range(2000)]

    async def main():
        d = FakeDriver(num_pages=1024, page_size=16, max_batch_tokens=512, max_batch_size=8)
        e = await engine_on(d)

        async def inferlet(inp):
            ctx = Context(Model.load()).append(prefix + inp["tail"])
            return str(await ctx.generate(max_tokens=5, ignore_eos=True).collect_tokens())

        first = await e.run_inferlet(inferlet, {"tail": [1, 2, 3]})
        before = e.model().stats()
        second = await e.run_inferlet(inferlet, {"tail": [4, 5, 6, 7]})
        after = e.model().stats()
        assert first == str(greedy(prefix + [1, 2, 3], 5))
        assert second == str(greedy(prefix + [4, 5, 6, 7], 5))
        reused = after["prefix_tokens_reused"] - before["prefix_tokens_reused"]
        prefilled = after["tokens_prefilled"] - before["tokens_prefilled"]
        assert reused == 2000 // 16 * 16  # every full page of the shared prefix
        assert prefilled == 2000 + 4 - reused
        assert_all_free(e.model())
        await e.shutdown()

    run(main())


# ---- snapshots ------------------------------------------------------------------------------------


def test_snapshot_save_open_take_delete_and_fork_isolation():
    async def main():
        d = FakeDriver(num_pages=64, page_size=4)
        e = await engine_on(d)

        async def inferlet(_):
            m = Model.load()
            base = Context(m).append([1, 2, 3, 4, 5, 6])
            await base.flush()
            base.save("base")
            with pytest.raises(SnapshotError, match="already exists"):
                base.save("base")
            anon = base.snapshot()
            a = Context.open(m, "base")
            assert a.tokens == [1, 2, 3, 4, 5, 6] and Context.open(m, "nope") is None
            # writes to a fork never show in the parent or the snapshot
            fa = a.fork()
            await fa.append([9, 9, 9]).flush()
            assert (await a.generate(max_tokens=3).collect_tokens()) == greedy([1, 2, 3, 4, 5, 6], 3)
            b = Context.take(m, "base")
            assert Context.open(m, "base") is None and Context.take(m, "base") is None
            assert (await b.append([7]).generate(max_tokens=3).collect_tokens()) == greedy(
                [1, 2, 3, 4, 5, 6, 7], 3
            )
            Context.delete(m, anon)
            with pytest.raises(SnapshotError):
                Context.delete(m, anon)
            return "ok"

        assert await e.run_inferlet(inferlet, {}) == "ok"
        assert_all_free(e.model())
        await e.shutdown()

    run(main())


def test_truncate_then_continue_equals_a_fresh_context_with_the_shorter_prefix():
    async def main():
        d = FakeDriver(num_pages=64, page_size=4)
        e = await engine_on(d)

        async def inferlet(_):
            m = Model.load()
            ctx = Context(m).append([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
            await ctx.flush()
            keep = ctx.fork()  # shares the first two pages: truncating into them must copy
            ctx.truncate(5)  # [3 1 4 1 5]
            assert ctx.seq_len == 5
            got = await ctx.append([8, 8]).generate(max_tokens=4).collect_tokens()
            assert got == greedy([3, 1, 4, 1, 5, 8, 8], 4)
            # the fork still sees the original tokens
            assert (await keep.append([7]).generate(max_tokens=2).collect_tokens()) == greedy(
                [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 7], 2
            )
            return "ok"

        assert await e.run_inferlet(inferlet, {}) == "ok"
        assert_all_free(e.model())
        await e.shutdown()

    run(main())


def test_a_snapshot_saved_by_one_run_is_opened_by_the_next(tmp_path):
    async def first():
        e = await engine_on(FakeDriver(num_pages=64, page_size=4), snapshot_dir=tmp_path)

        async def inferlet(_):
            ctx = Context(Model.load()).append(list(range(1, 11)))
            await ctx.flush()
            ctx.save("doc")
            return "ok"

        await e.run_inferlet(inferlet, {})
        await e.shutdown()

    async def second(page_size=4):
        e = await engine_on(FakeDriver(num_pages=64, page_size=page_size), snapshot_dir=tmp_path)

        async def inferlet(_):
            ctx = Context.open(Model.load(), "doc")
            assert ctx is not None and ctx.tokens == list(range(1, 11))
            return str(await ctx.append([42]).generate(max_tokens=3).collect_tokens())

        try:
            return await e.run_inferlet(inferlet, {})
        finally:
            await e.shutdown()

    run(first())
    assert list((tmp_path / "fake").glob("*.pie-kv"))
    assert run(second()) == str(greedy(list(range(1, 11)) + [42], 3))
    with pytest.raises(SnapshotError, match="saved by another model or KV layout"):
        run(second(page_size=8))


# ---- engine-side generation ------------------------------------------------------------------------


def test_collect_text_wakes_the_inferlet_once_and_steps_are_pipelined():
    async def main():
        d = FakeDriver(num_pages=256, page_size=4, max_batch_size=16)
        e = await engine_on(d)
        wakes = {"n": 0}

        async def inferlet(inp):
            ctx = Context(Model.load()).append(inp["p"])
            gen = ctx.generate(max_tokens=40, ignore_eos=True)
            toks = await gen.collect_tokens()
            wakes["n"] += 1
            return str(toks)

        prompts = [[i + 1, 2, 3] for i in range(8)]
        outs = await asyncio.gather(*(e.run_inferlet(inferlet, {"p": p}) for p in prompts))
        assert outs == [str(greedy(p, 40)) for p in prompts]
        # steps fed back on the device: most batches carry prev_token_rows
        fed = [b for b in d.batches if b.prev_token_rows is not None]
        assert len(fed) >= 30
        assert d.max_in_flight == 2
        await e.shutdown()

    run(main())


def test_generation_stops_at_the_model_window_with_length():
    async def main():
        d = FakeDriver(num_pages=64, page_size=4, max_position=20)
        e = await engine_on(d)

        async def inferlet(_):
            ctx = Context(Model.load()).append(list(range(1, 11)))
            g = ctx.generate(max_tokens=50, ignore_eos=True)
            toks = await g.collect_tokens()
            # positions 10..19 take 10 fed-back tokens; the 11th is sampled at position 19 and ends it
            assert g.finish_reason == "length" and len(toks) == 11
            assert toks == greedy(list(range(1, 11)), 11)
            too_long = Context(Model.load()).append(list(range(25)))
            with pytest.raises(
                PieError,
                match="outside the model's window 0..19: the context would hold 25 positions, the model has 20",
            ):
                await too_long.flush()
            return "ok"

        assert await e.run_inferlet(inferlet, {}) == "ok"
        await e.shutdown()

    run(main())


def test_stats_report_steps_prefill_reuse_and_pages():
    async def main():
        e = await engine_on(FakeDriver(num_pages=32, page_size=4))

        async def inferlet(_):
            ctx = Context(Model.load()).append(list(range(1, 10)))
            await ctx.generate(max_tokens=3).collect_tokens()
            assert runtime.stats()["tokens_prefilled"] == 9 and runtime.models() == ["fake"]
            return "ok"

        await e.run_inferlet(inferlet, {})
        st = e.model().stats()
        for key in ("steps", "tokens_prefilled", "prefix_tokens_reused", "preemptions", "pages_swapped_out",
                    "pages_swapped_in", "pages_used", "pages_free", "pages_cached"):  # fmt: skip
            assert key in st
        assert st["tokens_prefilled"] == 9 and st["steps"] >= 3
        assert st["pages_used"] == st["pages_cached"] == 2  # the two full pages stay cached
        await e.shutdown()

    run(main())


def test_pie_run_saves_a_snapshot_that_the_next_pie_run_opens(tmp_path, monkeypatch):
    """Through the CLI and the config file: [runtime] snapshot_dir keeps a snapshot across two runs."""
    from pie.cli.main import main

    home = tmp_path / "home"
    monkeypatch.setenv("PIE_HOME", str(home))
    save = tmp_path / "save.py"
    save.write_text(
        "from pie.sdk import Context, Model\n"
        "async def main(input):\n"
        "    ctx = Context(Model.load()).append_text('The for statement is used to iterate')\n"
        "    await ctx.flush()\n"
        "    ctx.save('doc')\n"
        "    return str(ctx.seq_len)\n"
    )
    load = tmp_path / "load.py"
    load.write_text(
        "from pie.sdk import Context, Model, Sampler\n"
        "async def main(input):\n"
        "    ctx = Context.open(Model.load(), 'doc')\n"
        "    return str(await ctx.generate(Sampler.argmax(), max_tokens=5, ignore_eos=True).collect_tokens())\n"
    )
    fresh = tmp_path / "fresh.py"
    fresh.write_text(
        "from pie.sdk import Context, Model, Sampler\n"
        "async def main(input):\n"
        "    ctx = Context(Model.load()).append_text('The for statement is used to iterate')\n"
        "    return str(await ctx.generate(Sampler.argmax(), max_tokens=5, ignore_eos=True).collect_tokens())\n"
    )
    assert main(["config", "init"]) == 0
    assert main(["config", "set", "runtime.snapshot_dir", "snaps"]) == 0
    assert main(["run", "--in-process", str(save)]) == 0
    assert list((home / "snaps" / "default").glob("*.pie-kv"))
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["run", "--in-process", str(load)]) == 0
    ref = io.StringIO()
    with redirect_stdout(ref):
        assert main(["run", "--in-process", str(fresh)]) == 0
    assert out.getvalue() == ref.getvalue() and out.getvalue().startswith("[")


def test_rewinding_a_page_only_the_prefix_cache_shares_takes_it_back_without_a_copy():
    """generate() after flush() re-runs the last token; when its full page is held only by this context and
    the prefix cache, the page leaves the cache instead of being copied."""

    async def main():
        d = FakeDriver(num_pages=32, page_size=4)
        e = await engine_on(d)

        async def inferlet(_):
            ctx = Context(Model.load()).append(list(range(1, 9)))  # two full pages, both cached
            await ctx.flush()
            assert e.model().kv.num_cached == 2
            page = ctx.page_ids[1]
            toks = await ctx.generate(max_tokens=3, ignore_eos=True).collect_tokens()
            assert toks == greedy(list(range(1, 9)), 3)
            assert ctx.page_ids[1] == page and e.model().stats()["pages_copied"] == 0
            return "ok"

        assert await e.run_inferlet(inferlet, {}) == "ok"
        assert_all_free(e.model())
        await e.shutdown()

    run(main())
