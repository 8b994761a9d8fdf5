"""Pie's inferlet SDK (src/inferlet) on pie: the fake driver (exact, fast) and a tiny Qwen3 checkpoint run by
the in-process driver on CPU."""

import asyncio
import math

import numpy as np
import pytest
from fake_driver import FakeDriver
from runtime_checks import assert_all_free

import inferlet
from inferlet import Context, Distribution, Entropy, Logits, Logprob, Logprobs, Model, Sampler, brle
from pie.errors import PieError
from pie.runtime.engine import Engine
from pie.sdk import Context as PieContext
from pie.sdk import Sampler as PieSampler


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def fake_engine(**kw) -> Engine:
    e = Engine.from_drivers({"fake": (FakeDriver(**kw), None)})
    await e.start()
    return e


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("pie.drivers.executor", reason="the model executor is not in this tree yet")
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3")


async def tiny_engine(path, **spec) -> Engine:
    from pie.drivers.inprocess import InProcessDriver
    from pie.drivers.spec import ExecutorSpec
    from pie.models.tokenizer import Tokenizer

    spec = {"num_pages": 128, "page_size": 4, "max_batch_tokens": 32, **spec}
    d = InProcessDriver(ExecutorSpec(model_path=str(path), device="cpu", activation_dtype="float32", **spec))
    e = Engine.from_drivers({"tiny": (d, Tokenizer.from_dir(path))})
    await e.start()
    return e


def on_engine(make, inferlet_fn, input=None):
    async def main():
        e = await make()
        try:
            return await e.run_inferlet(inferlet_fn, input or {})
        finally:
            assert_all_free(e.model())
            await e.shutdown()

    return run(main())


# ---- pure helpers ------------------------------------------------------------------------------


def test_brle_round_trip_and_padding():
    m = np.array([0, 0, 1, 1, 1, 0, 1], dtype=bool)
    assert brle.encode(m) == [2, 3, 1, 1]
    assert brle.decode([2, 3, 1, 1], 7, "t").tolist() == m.tolist()
    assert brle.decode([0, 3], 5, "t").tolist() == [True, True, True, False, False]  # short: padded False
    with pytest.raises(ValueError, match="covers 9 entries"):
        brle.decode([4, 5], 8, "t")


def test_samplers_have_pies_signatures_and_defaults():
    assert Sampler.top_p()._pie.temp == 0.6 and Sampler.top_p()._pie.topp == 0.95
    s = Sampler.top_k_top_p(0.7, 20, 0.9, seed=3)._pie
    assert (s.temp, s.topk, s.topp, s.seed) == (0.7, 20, 0.9, 3)
    assert Sampler.min_p(0.5, 0.2)._pie.minp == 0.2 and Sampler.top_k()._pie.topk == 40
    assert Sampler.argmax().is_argmax and Sampler.top_p(0.0, 0.9).is_argmax  # temperature 0 is argmax
    assert Sampler.multinomial()._pie.temp == 1.0
    with pytest.raises(ValueError, match="draws one token"):
        Sampler.multinomial(1.0, 2)
    with pytest.raises(TypeError, match="not a probe"):
        inferlet.sample.probe_kind("x")


def test_unsupported_parts_import_and_raise_clear_errors():
    for call in (
        lambda: inferlet.Adapter.create(None, "a"),
        lambda: inferlet.zo.adapter_seed(None, 1),
        lambda: inferlet.mcp.connect("s"),
    ):
        with pytest.raises(inferlet.NotSupportedError, match="not supported by pie yet"):
            call()
    assert issubclass(inferlet.NotSupportedError, PieError) and issubclass(
        inferlet.NotSupportedError, NotImplementedError
    )


# ---- fake driver ------------------------------------------------------------------------------


def test_fake_fork_then_generate_equals_fresh_context_and_step_path_equals_engine_path():
    prefix = [5, 9, 2, 7, 11, 3]

    async def main(_):
        m = Model.load()
        base = Context(m).append(prefix)
        await base.flush()
        assert base.seq_len == 6 and base.buffer() == []
        forked = base.fork()
        a = await forked.generate(Sampler.argmax(), max_tokens=9, auto_flush=False).collect_tokens()
        fresh = Context(m).append(prefix)
        b = await fresh.generate(Sampler.argmax(), max_tokens=9, auto_flush=False).collect_tokens()
        c_ctx = Context(m).append(prefix)
        steps = []
        async for step in c_ctx.generate(Sampler.argmax(), max_tokens=9, auto_flush=False):
            steps += (await step.execute()).tokens
        assert a == b == steps and len(a) == 9
        # Pie's rule after max_tokens: the last token is not lost (buffer or KV)
        assert c_ctx.seq_len + len(c_ctx.buffer()) == fresh.seq_len + len(fresh.buffer()) == 15
        # the parent is untouched by its fork's generation
        assert base.seq_len == 6
        return a

    on_engine(fake_engine, main)


def test_fake_stop_token_ends_generation_and_leaves_the_context():
    prefix = [1, 2, 3]

    async def main(_):
        m = Model.load()
        ref = (
            await Context(m)
            .append(prefix)
            .generate(Sampler.argmax(), max_tokens=8, auto_flush=False)
            .collect_tokens()
        )
        stop = ref[4]
        want = ref[: ref.index(stop)]
        for path in ("engine", "steps"):
            ctx = Context(m).append(prefix)
            g = ctx.generate(Sampler.argmax(), max_tokens=8, stop=[stop], auto_flush=False)
            if path == "engine":
                got = await g.collect_tokens()
            else:
                got = []
                async for step in g:
                    got += (await step.execute()).tokens
            assert got == want and g.is_done
            # the stop token is in neither the KV nor the buffer: prefix + accepted tokens only
            assert ctx.seq_len + len(ctx.buffer()) == len(prefix) + len(want)
            assert ctx._inner._seq.tokens[: len(prefix) + len(want)] + ctx.buffer() == prefix + want
        return want

    on_engine(fake_engine, main)


def test_fake_attention_mask_rows_equal_pies_bool_masks():
    prefix = [4, 8, 15, 16, 23, 42, 7]
    n_in = 3
    rng = np.random.default_rng(0)
    kv_end = len(prefix) + n_in
    bool_rows = rng.random((n_in, kv_end)) < 0.6
    bool_rows[:, 0] = True  # every row attends somewhere

    async def main(_):
        m = Model.load()
        a = Context(m).append(prefix)
        await a.flush()
        fwd = a.forward()
        assert fwd.start_position() == len(prefix)
        fwd.input([1, 2, 3]).attention_mask([brle.encode(r) for r in bool_rows])
        hs = [fwd.sample([i], Sampler.argmax()) for i in range(n_in)]
        out = await fwd.execute()
        b = PieContext(m._pie).append(prefix)
        await b.flush()
        res = (
            await b.forward()
            .input([1, 2, 3])
            .mask(bool_rows)
            .sample([0, 1, 2], PieSampler.argmax())
            .execute()
        )
        assert [out.token(h) for h in hs] == [r.token for r in res]
        assert a.seq_len == b.seq_len == kv_end
        return 0

    on_engine(fake_engine, main)


def test_fake_input_at_is_scoring_only_and_buffer_runs_first():
    async def main(_):
        m = Model.load()
        ctx = Context(m).append([3, 1, 4])  # buffered: runs first in the next pass
        fwd = ctx.forward()
        assert fwd.start_position() == 3
        fwd.input([1, 5])
        h = fwd.sample([1], Sampler.argmax())
        cand = fwd.sample([2, 3], Sampler.argmax())
        fwd.input_at([9, 2], [5, 5])
        out = await fwd.execute()
        assert ctx.seq_len == 5 and ctx.buffer() == []  # input_at tokens left the KV
        ref = Context(m).append([3, 1, 4, 1, 5])
        r = await ref.generate(Sampler.argmax(), max_tokens=1, auto_flush=False).collect_tokens()
        assert out.token(h) == r[0] and len(out.tokens_at(cand)) == 2 and out.tokens == []
        with pytest.raises(IndexError, match="outside this pass's 2 input tokens"):
            f2 = ctx.forward().input([1, 2])
            f2.sample([5], Sampler.argmax())
            await f2.execute()
        return 0

    on_engine(fake_engine, main)


def test_fake_snapshots_open_take_delete_and_truncate():
    async def main(_):
        m = Model.load()
        ctx = Context(m).append(list(range(1, 11)))
        await ctx.flush()
        ctx.save("p")
        name = ctx.snapshot()
        o = Context.open(m, "p")
        assert o is not None and o.seq_len == 10
        t = Context.take(m, name)
        assert t is not None and Context.take(m, name) is None
        Context.delete(m, "p")
        assert Context.open(m, "p") is None
        o.truncate(3)
        assert o.seq_len == 7
        a = await o.generate(Sampler.argmax(), max_tokens=4, auto_flush=False).collect_tokens()
        b = (
            await Context(m)
            .append(list(range(1, 8)))
            .generate(Sampler.argmax(), max_tokens=4, auto_flush=False)
            .collect_tokens()
        )
        assert a == b
        for c in (ctx, o, t):
            c.release()
        return 0

    on_engine(fake_engine, main)


# ---- tiny Qwen3 --------------------------------------------------------------------------------


def test_tiny_probes_agree(tiny_dir):
    async def main(_):
        m = Model.load()
        tok = m.tokenizer()
        V = m.vocab_size
        ctx = Context(m).append(tok.encode("The quick brown fox jumps over the"))
        await ctx.flush()
        fwd = ctx.forward()
        ids = tok.encode(" lazy dog")
        fwd.input(ids)
        last = len(ids) - 1
        hs = fwd.sample([last], Sampler.argmax())
        hl = fwd.probe(last, Logits())
        hd = fwd.probe(last, Distribution(1.0, 5))  # driver-side (k <= max_dist_size)
        hf = fwd.probe(last, Distribution(1.0, 0))  # host-side, whole vocabulary
        he = fwd.probe(last, Entropy())
        hlp = fwd.probe(last, Logprobs([0, 7, 42]))
        out = await fwd.execute()
        logits = np.frombuffer(out.logits(hl), dtype=np.float32)
        assert logits.shape == (V,)
        greedy = out.token(hs)
        ids5, probs5 = out.distribution(hd)
        idsf, probsf = out.distribution(hf)
        assert int(logits.argmax()) == greedy == ids5[0] == idsf[0]
        assert len(idsf) == V and abs(sum(probsf) - 1) < 1e-4 and idsf[:5] == ids5
        assert np.allclose(probs5, probsf[:5], atol=1e-5)
        assert 0 <= out.entropy(he) <= math.log(V)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        assert abs(out.entropy(he) - float(-(p * np.log(p)).sum())) < 1e-4
        lps = out.logprobs(hlp)
        # Logprob(t) is the entry of Logprobs, and both are log p at temperature 1
        # ... and input_at at the same positions scores the same, leaving the KV as it was
        ctx.truncate(len(ids))
        n = ctx.seq_len
        f2 = ctx.forward().input_at(ids, list(range(n, n + len(ids))))
        h7 = f2.probe(last, Logprob(7))
        h42 = f2.probe(last, Logprob(42))
        out2 = await f2.execute()
        assert ctx.seq_len == n
        assert np.allclose([out2.logprobs(h7)[0], out2.logprobs(h42)[0]], lps[1:], atol=1e-5)
        assert np.allclose(lps, np.log(p[[0, 7, 42]]), atol=1e-4)
        # mismatched access reads nothing
        assert out.logits(hd) is None and out.token(hl) is None and out.entropy(hs) is None
        # generate's greedy token is the argmax of the logits
        g = (
            await ctx.fork()
            .append(ids)
            .generate(Sampler.argmax(), max_tokens=1, stop=[], auto_flush=False)
            .collect_tokens()
        )
        assert g == [greedy]
        return 0

    on_engine(lambda: tiny_engine(tiny_dir), main)


def test_tiny_attention_mask_and_logit_mask(tiny_dir):
    async def main(_):
        m = Model.load()
        tok = m.tokenizer()
        prompt = tok.encode("Hello world! Hello there, how are")
        a = Context(m).append(prompt)
        await a.flush()
        n = a.seq_len
        ids = tok.encode(" you today")
        kv_end = n + len(ids)
        rows = np.tri(len(ids), kv_end, k=n, dtype=bool)
        rows[:, 2:5] = False  # hide three prompt tokens from the new ones
        fwd = a.forward().input(ids).attention_mask([brle.encode(r) for r in rows])
        hl = fwd.probe(len(ids) - 1, Logits())
        out = await fwd.execute()
        b = PieContext(m._pie).append(prompt)
        await b.flush()
        (r,) = await b.forward().input(ids).mask(rows).sample([len(ids) - 1], PieSampler.logits()).execute()
        assert np.allclose(np.frombuffer(out.logits(hl), np.float32), r.logits, atol=1e-5)
        # a logit mask: only the allowed tokens can come out, and argmax is the best allowed one
        allowed = np.zeros(m.vocab_size, bool)
        allowed[[11, 29, 301]] = True
        c = Context(m).append(prompt + ids[:-1])
        f = c.forward().input(ids[-1:]).mask(brle.encode(allowed))
        h = f.sample([0], Sampler.argmax())
        hd = f.probe(0, Distribution(1.0, 3))
        hs = f.sample([0], Sampler.top_k(1.0, 2, seed=5))
        hl = f.probe(0, Logits())  # logits are not masked
        o = await f.execute()
        logits = np.frombuffer(o.logits(hl), np.float32)
        assert np.isfinite(logits).all()
        assert o.token(h) == [11, 29, 301][int(np.argmax(logits[[11, 29, 301]]))]
        assert sorted(o.distribution(hd)[0]) == [11, 29, 301] and abs(sum(o.distribution(hd)[1]) - 1) < 1e-5
        assert o.token(hs) in (11, 29, 301)
        # generation with a logit mask (per-step path) stays inside it
        g = (
            await Context(m)
            .append(prompt)
            .generate(
                Sampler.top_p(1.0, 1.0, seed=1),
                max_tokens=6,
                stop=[],
                logit_mask=brle.encode(allowed),
                auto_flush=False,
            )
            .collect_tokens()
        )
        assert len(g) == 6 and set(g) <= {11, 29, 301}
        return 0

    on_engine(lambda: tiny_engine(tiny_dir), main)


def test_tiny_chat_fork_generate_and_seeded_paths_agree(tiny_dir):
    async def main(_):
        m = Model.load()
        stops = inferlet.chat.stop_tokens(m)
        assert m.tokenizer().encode("<|im_end|>")[0] in stops
        base = Context(m, {"enable_thinking": False}).system("You are terse.").user("Hello there")
        assert base.buffer() and base.seq_len == 0
        await base.flush()
        f = base.fork()
        fresh = Context(m, {"enable_thinking": False}).system("You are terse.").user("Hello there")
        s = Sampler.top_p(0.9, 0.95, seed=11)
        a = await f.generate(s, max_tokens=10).collect_tokens()
        b = await fresh.generate(s, max_tokens=10).collect_tokens()
        c_ctx = base.fork()
        steps = []
        async for step in c_ctx.generate(s, max_tokens=10):
            steps += (await step.execute()).tokens
        assert a == b == steps and 1 <= len(a) <= 10 and not set(a) & set(stops)
        # the conversation goes on: the reply became the assistant turn
        text = await fresh.user("And again?").generate(Sampler.argmax(), max_tokens=5).collect_text()
        assert isinstance(text, str)
        rendered = m.tokenizer().decode(fresh._inner._seq.tokens + fresh.buffer())
        assert rendered.count("<|im_start|>assistant") == 2 and "And again?" in rendered
        # a context with tokens but no conversation renders each message alone (Pie's fillers)
        raw = Context(m).append(inferlet.chat.user(m, "Hi"))
        assert inferlet.chat.user(m, "Hi") == Context(m).user("Hi").buffer()
        assert raw.cue().buffer()[-len(inferlet.chat.cue(m)) :] == inferlet.chat.cue(m)
        assert inferlet.chat.cue(m) == m.tokenizer().encode("<|im_start|>assistant\n")
        # cue() twice adds nothing; seal() appends the stop token
        n = len(base.buffer())
        base.cue().cue()
        assert len(base.buffer()) > n
        k = len(base.buffer())
        base.seal()
        assert base.buffer()[k:] == stops[:1]
        return 0

    on_engine(lambda: tiny_engine(tiny_dir), main)


def test_tiny_user_sampling_with_clear_sampler_and_accept_equals_greedy(tiny_dir):
    async def main(_):
        m = Model.load()
        prompt = Context(m).user("Count: 1 2 3")
        greedy = await prompt.fork().generate(Sampler.argmax(), max_tokens=6).collect_tokens()
        g = prompt.generate(Sampler.argmax(), max_tokens=6)
        mine = []
        async for step in g:
            step.clear_sampler()
            n = len(step._pending)
            h = step.probe(n - 1, Distribution(1.0, 4))
            out = await step.execute()
            ids, probs = out.distribution(h)
            assert out.tokens == [] and probs == sorted(probs, reverse=True)
            mine += g.accept([ids[0]])  # the most likely token, picked by the inferlet
        assert mine == greedy and g.tokens_generated == len(greedy)
        text = await Context(m).user("Count: 1 2 3").generate(Sampler.argmax(), max_tokens=6).collect_text()
        assert text == m.tokenizer()._tok.decode(greedy, skip_special_tokens=True)
        return 0

    on_engine(lambda: tiny_engine(tiny_dir), main)


def test_tiny_tokenizer_surface(tiny_dir):
    async def main(_):
        tok = Model.load().tokenizer()
        ids, pieces = tok.vocabs()
        assert len(ids) == len(pieces) and ids == sorted(ids)
        by_id = dict(zip(ids, pieces, strict=True))
        text = "Hello world, the quick brown fox."
        enc = tok.encode(text)
        assert b"".join(by_id[i] for i in enc) == text.encode() and tok.decode(enc) == text
        sid, sbytes = tok.special_tokens()
        assert b"<|im_end|>" in sbytes and tok.encode("<|im_end|>") == [sid[sbytes.index(b"<|im_end|>")]]
        assert isinstance(tok.split_regex(), str)
        assert inferlet.runtime.models() == ["tiny"] and inferlet.runtime.version()
        return 0

    on_engine(lambda: tiny_engine(tiny_dir), main)


# ---- an inferlet written for Pie's SDK, through `pie run --in-process` on the embedded model ----------

PIE_STYLE = '''
import inferlet
from inferlet import Context, Distribution, Model, Sampler, chat, runtime


def keep(total, ranges):
    """BRLE attention row over [0, total) that keeps `ranges` (runs start with a false run)."""
    out, cursor = [], 0
    for start, end in ranges:
        out += [start - cursor, end - start]
        cursor = end
    if cursor < total:
        out.append(total - cursor)
    return out


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    tok = model.tokenizer()
    ctx = Context(model)
    ctx.system("You are terse.").user(input["prompt"])
    await ctx.flush()
    name = ctx.snapshot()

    # a chat reply, from a fork of the prompt
    reply = await ctx.fork().generate(Sampler.top_p(0.6, 0.95, seed=7), max_tokens=int(input["n"])).collect_text()

    # a manual decode loop with a windowed attention mask (sink + recent tokens)
    win = Context.open(model, name)
    pending, out = chat.cue(model), []
    stops = set(chat.stop_tokens(model))
    for _ in range(int(input["n"])):
        fwd = win.forward()
        total = fwd.start_position() + len(pending)
        fwd.input(pending)
        fwd.attention_mask([keep(total, [(0, 4), (max(4, total - 8), total)]) for _ in pending])
        h = fwd.sample([len(pending) - 1], Sampler.argmax())
        p = fwd.probe(len(pending) - 1, Distribution(1.0, 3))
        o = await fwd.execute()
        assert o.distribution(p)[0][0] == o.token(h)
        if o.token(h) in stops:
            break
        out.append(o.token(h))
        pending = [o.token(h)]

    # step by step with a per-step probe
    g = ctx.generate(Sampler.argmax(), max_tokens=3)
    ent = g.probe_each_step(0, inferlet.Entropy())
    steps = []
    async for step in g:
        o = await step.execute()
        steps.append((o.tokens, round(o.entropy(ent), 3)))
    Context.delete(model, name)
    inferlet.set_return(f"{reply!r}|{tok.decode(out)!r}|{len(steps)}")
'''


def test_pie_style_inferlet_runs_under_pie_run(tmp_path, capsys):
    from pie.cli.main import main

    f = tmp_path / "pie_style.py"
    f.write_text(PIE_STYLE)
    argv = ["run", "--in-process", str(f), "--", "--prompt", "What is a page?", "--n", "6"]
    assert main(argv) == 0, capsys.readouterr().err
    first = capsys.readouterr().out
    reply, windowed, steps = first.rstrip("\n").split("|")
    assert reply.startswith("'") and windowed.startswith("'") and 1 <= int(steps) <= 3
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # seeded and greedy: the same result again
