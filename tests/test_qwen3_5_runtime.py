"""Qwen 3.5's recurrent state owned by the runtime: a tiny random qwen3_5_text checkpoint run by the
in-process driver on CPU (fp32) through the SDK. Concurrency, chunked prefill, fork, snapshots (memory and
disk), preemption by recompute and by swap, a state pool smaller than the live contexts, and the clear
errors for what the recurrent layers cannot honour (masks, truncating computed tokens, positions that do
not continue the context)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from runtime_checks import assert_all_free
from test_parity_hf import hf_model
from test_qwen3_5 import hf_model_greedy
from test_run_cli import assert_dev_driver_matches_in_process

from pie.drivers.inprocess import InProcessDriver
from pie.drivers.protocol import BatchError
from pie.drivers.spec import ExecutorSpec
from pie.errors import PieError
from pie.models.tokenizer import Tokenizer
from pie.runtime.engine import Engine
from pie.sdk import Context, Model, Sampler

PROMPTS = [list(range(3, 3 + n)) for n in (3, 9, 14, 21, 30, 2, 41, 16)]


def run(coro, timeout=600):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def q35(tiny_checkpoint):
    return tiny_checkpoint("qwen3_5_text")


async def engine(path, snapshot_dir=None, **spec) -> Engine:
    spec = {"num_pages": 128, "page_size": 4, "max_batch_tokens": 16, "attention_backend": "torch", **spec}
    d = InProcessDriver(ExecutorSpec(model_path=str(path), device="cpu", activation_dtype="float32", **spec))
    e = Engine.from_drivers({"q35": (d, Tokenizer.from_dir(path))}, snapshot_dir=snapshot_dir)
    await e.start()
    return e


async def run_json(e: Engine, inferlet):
    """run_inferlet's result (JSON text of what the inferlet returned) as Python data."""
    return json.loads(await e.run_inferlet(inferlet, {}))


async def _gen(m: Model, prompt: list[int], n: int) -> list[int]:
    async with Context(m) as ctx:
        ctx.append(prompt)
        return await ctx.generate(Sampler.argmax(), max_tokens=n, ignore_eos=True).collect_tokens()


def _all_slots_free(e: Engine) -> None:
    kv = e.model().kv
    assert kv.recurrent and kv.num_free_state_slots == kv.num_state_slots
    assert_all_free(e.model())


def test_eight_concurrent_contexts_equal_one_at_a_time_and_hf(q35):
    """8 contexts generating together (chunked prefill: max_batch_tokens 16) equal each alone, and
    transformers' generate."""

    async def together(_):
        m = Model.load()
        return await asyncio.gather(*(_gen(m, p, 8) for p in PROMPTS))

    async def one_by_one(_):
        m = Model.load()
        return [await _gen(m, p, 8) for p in PROMPTS]

    async def main():
        e = await engine(q35)
        a = await run_json(e, together)
        b = await run_json(e, one_by_one)
        assert e.model().kv.stats.prefix_tokens_reused == 0  # prefix cache off for hybrid models
        _all_slots_free(e)
        await e.shutdown()
        return a, b

    a, b = run(main())
    assert a == b
    for i in (6,):  # 41 tokens: three prefill chunks
        assert a[i] == hf_model_greedy(q35, PROMPTS[i], 8)


def test_fork_continues_identically_to_its_parent(q35):
    async def inferlet(_):
        m = Model.load()
        ctx = Context(m).append(PROMPTS[3])
        first = await ctx.generate(max_tokens=3, ignore_eos=True).collect_tokens()
        child = ctx.fork()
        assert child._seq.state_slot not in (-1, ctx._seq.state_slot)
        a = await ctx.generate(max_tokens=8, ignore_eos=True).collect_tokens()
        b = await child.generate(max_tokens=8, ignore_eos=True).collect_tokens()
        ctx.close()
        child.close()
        return [first, a, b]

    async def main():
        e = await engine(q35)
        out = await run_json(e, inferlet)
        _all_slots_free(e)
        await e.shutdown()
        return out

    first, a, b = run(main())
    assert a == b
    assert first + a == hf_model_greedy(q35, PROMPTS[3], 11)


def test_snapshot_in_memory_and_on_disk_continues_identically(q35, tmp_path):
    async def save(_):
        m = Model.load()
        ctx = Context(m).append(PROMPTS[4])
        await ctx.flush()
        ctx.save("doc")
        a = await ctx.append([42]).generate(max_tokens=6, ignore_eos=True).collect_tokens()
        b = await Context.open(m, "doc").append([42]).generate(max_tokens=6, ignore_eos=True).collect_tokens()
        return [a, b]

    async def reopen(_):
        ctx = Context.open(Model.load(), "doc")
        assert ctx is not None and ctx.tokens == PROMPTS[4]
        return await ctx.append([42]).generate(max_tokens=6, ignore_eos=True).collect_tokens()

    async def main():
        e = await engine(q35, snapshot_dir=tmp_path)
        a, b = await run_json(e, save)
        await e.shutdown()
        e2 = await engine(q35, snapshot_dir=tmp_path)
        c = await run_json(e2, reopen)
        # the state came from the file: the appended token ran as one decode row, nothing was recomputed
        stats = e2.model().kv.stats
        assert stats.tokens_prefilled == 0 and stats.preempted_recompute == 0
        assert e2.model().kv.num_free_state_slots == e2.model().kv.num_state_slots - 1  # the snapshot's
        assert e2.model().snapshots.delete("doc")
        _all_slots_free(e2)
        await e2.shutdown()
        return a, b, c

    a, b, c = run(main())
    assert a == b == c == hf_model_greedy(q35, PROMPTS[4] + [42], 6)


@pytest.mark.parametrize("swap", [0, 64])
def test_preemption_by_recompute_or_swap_gives_the_same_tokens(q35, swap):
    """20 pages of 4 tokens for 8 contexts of up to 41 + 10 tokens: contexts are preempted (dropped and
    recomputed, or swapped with their state slot kept) and still produce the tokens of an uncontended run."""

    async def together(_):
        m = Model.load()
        return await asyncio.gather(*(_gen(m, p, 10) for p in PROMPTS))

    async def main():
        e = await engine(q35)
        want = await run_json(e, together)
        await e.shutdown()
        tight = await engine(q35, num_pages=20, swap_slots=swap)
        got = await run_json(tight, together)
        stats = tight.model().kv.stats
        assert stats.preemptions > 0 and (stats.pages_swapped_out > 0) == bool(swap)
        _all_slots_free(tight)
        await tight.shutdown()
        return want, got

    want, got = run(main())
    assert got == want


def test_fewer_state_slots_than_contexts(q35):
    """3 state slots for 8 live contexts: slots move to the contexts that run (idle ones recompute)."""

    async def inferlet(_):
        m = Model.load()
        ctxs = [Context(m).append(p) for p in PROMPTS]
        for c in ctxs:
            await c.flush()
        outs = await asyncio.gather(
            *(c.generate(max_tokens=5, ignore_eos=True).collect_tokens() for c in ctxs)
        )
        for c in ctxs:
            c.close()
        return list(outs)

    async def alone(_):
        m = Model.load()
        return [await _gen(m, p, 5) for p in PROMPTS]

    async def main():
        e = await engine(q35, state_slots=3)
        assert e.model().kv.num_state_slots == 3
        got = await run_json(e, inferlet)
        want = await run_json(e, alone)
        _all_slots_free(e)
        await e.shutdown()
        return got, want

    got, want = run(main())
    assert got == want


def test_what_recurrent_layers_cannot_honour_fails_clearly(q35):
    async def inferlet(_):
        m = Model.load()
        ctx = Context(m).append(PROMPTS[1])
        await ctx.flush()
        with pytest.raises(
            PieError, match="state cannot be rewound: truncate can only drop tokens not computed"
        ):
            ctx.truncate(2)
        ctx.truncate(0)
        n = len(ctx.tokens)
        with pytest.raises(BatchError, match="custom attention mask cannot be honoured"):
            await (
                ctx.forward()
                .input([5])
                .mask(np.ones((1, n + 1), dtype=bool))
                .sample([-1], Sampler.argmax())
                .execute()
            )
        with pytest.raises(BatchError, match="positions must be consecutive"):
            await (
                ctx.forward().input([5, 6], positions=[n + 3, n + 4]).sample([-1], Sampler.argmax()).execute()
            )
        # generate() after flush() re-runs the last token internally: the state is recomputed, not rewound
        got = await ctx.generate(max_tokens=4, ignore_eos=True).collect_tokens()
        ctx.close()
        return got

    async def main():
        e = await engine(q35)
        got = await run_json(e, inferlet)
        _all_slots_free(e)
        await e.shutdown()
        return got

    assert run(main()) == hf_model_greedy(q35, PROMPTS[1], 4)


def test_pie_run_in_process_and_through_the_dev_driver(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """`pie run` on the multimodal wrapper checkpoint, in process and through the dev driver's subprocess:
    the same text, equal to transformers' greedy continuation."""
    monkeypatch.setenv("PIE_HOME", str(tmp_path / "pie-home"))
    model = tiny_checkpoint("qwen3_5")
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[[model]]\nname = "q35"\nhf_repo = "{model}"\n[model.driver]\ntype = "dev"\ndevice = ["cpu"]\n'
        'activation_dtype = "float32"\n[model.driver.options]\nkv_page_size = 4\nmax_batch_tokens = 8\n'
    )
    prompt = "The quick brown fox jumps over the lazy dog. A programmable"
    args = ["raw-completion", "--", "--prompt", prompt, "--max-tokens", "8", "--ignore-eos", "true"]
    in_process = assert_dev_driver_matches_in_process(cfg, args, capsys)
    tok = Tokenizer.from_dir(model)
    ids = tok.encode(prompt)
    with torch.no_grad():
        t = torch.tensor([ids])
        ref = hf_model(model).generate(
            t, attention_mask=torch.ones_like(t), max_new_tokens=8, min_new_tokens=8, do_sample=False
        )
    assert in_process.rstrip("\n") == tok.decode(ref[0, len(ids) :].tolist())
