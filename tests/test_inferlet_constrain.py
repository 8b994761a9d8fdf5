"""Constrained and speculative generation of the inferlet SDK, on the embedded default model (CPU).

Constrained outputs are drawn with random sampling over several seeds and must all be valid; speculative
greedy output must equal plain greedy output token for token.
"""

import asyncio
import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from runtime_checks import assert_all_free

from inferlet import (
    AnyJson,
    Context,
    Ebnf,
    Grammar,
    GrammarConstraint,
    JsonSchema,
    Matcher,
    Model,
    Regex,
    Sampler,
    brle,
)
from inferlet.grammar import GrammarError
from inferlet.spec import NgramSpeculator

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "src" / "pie" / "assets" / "default-model"
SEEDS = (1, 2, 3)


async def _engine():
    from pie.drivers.inprocess import InProcessDriver
    from pie.drivers.spec import ExecutorSpec
    from pie.models.tokenizer import Tokenizer
    from pie.runtime.engine import Engine

    spec = ExecutorSpec(
        model_path=str(DEFAULT_MODEL), device="cpu", activation_dtype="float32", num_pages=256, page_size=16
    )
    e = Engine.from_drivers({"default": (InProcessDriver(spec), Tokenizer.from_dir(DEFAULT_MODEL))})
    await e.start()
    return e


def on_model(fn, timeout=900):
    """Run `fn(model)` as an inferlet on the default model; the engine is checked for leaks after."""

    box = []

    async def inferlet_main(_input):
        box.append(await fn(Model.load()))

    async def main():
        e = await _engine()
        try:
            await e.run_inferlet(inferlet_main, {})
            return box[0]
        finally:
            assert_all_free(e.model())
            await e.shutdown()

    return asyncio.run(asyncio.wait_for(main(), timeout))


def chat(model, prompt: str) -> Context:
    ctx = Context(model)
    ctx.system("You answer briefly.").user(prompt)
    return ctx


# ---- constraints -----------------------------------------------------------------------------

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "score": {"type": "number", "minimum": -10, "maximum": 10},
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "maxItems": 4},
]


def test_json_schema_outputs_validate_over_seeds_and_collect_json_parses():
    async def fn(model):
        out = []
        for schema in SCHEMAS:
            s = json.dumps(schema)
            for seed in SEEDS:
                ctx = chat(model, "Describe a person as JSON.")
                g = ctx.generate(Sampler.top_p(1.0, 1.0, seed=seed), constrain=JsonSchema(s), max_tokens=200)
                out.append((schema, await g.collect_text(), g.tokens_generated))
                ctx.release()
            ctx = chat(model, "JSON please.")
            out.append(
                (
                    schema,
                    await ctx.generate(Sampler.top_k(1.0, 50, seed=7), max_tokens=200).collect_json(schema=s),
                    -1,
                )
            )
            ctx.release()
        return out

    for schema, text, n in on_model(fn):
        value = text if n == -1 else json.loads(text)  # n == -1: collect_json already parsed it
        jsonschema.validate(value, schema)
        assert n != 200  # ended on its own, not by max_tokens


def test_regex_and_ebnf_outputs_match_over_seeds():
    regexes = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[a-z]{2,6}( [a-z]{2,6}){0,3}\.", r"0x[0-9a-f]{1,8}"]
    gbnf = 'root ::= "[" item ("," item)* "]"\nitem ::= [a-z]+ | [0-9]+\n'  # Pie's syntax
    lark = 'start: greeting " " NAME "!"\ngreeting: "hello" | "hi"\nNAME: /[A-Z][a-z]{1,7}/\n'
    # a Lark reference parser checks the EBNF outputs independently of the grammar engine
    gbnf_re = re.compile(r"\[([a-z]+|[0-9]+)(,([a-z]+|[0-9]+))*\]")
    lark_re = re.compile(r"(hello|hi) [A-Z][a-z]{1,7}!")

    async def fn(model):
        out = []
        cases = [(Regex(p), re.compile(p)) for p in regexes] + [(Ebnf(gbnf), gbnf_re), (Ebnf(lark), lark_re)]
        for schema, check in cases:
            for seed in SEEDS:
                ctx = chat(model, "Answer.")
                g = ctx.generate(Sampler.min_p(1.5, 0.0, seed=seed), constrain=schema, max_tokens=40)
                toks = await g.collect_tokens()
                out.append((check, model.tokenizer().decode(toks), g.tokens_generated))
                ctx.release()
        return out

    results = on_model(fn)
    for check, text, n in results:
        if check.pattern.startswith(r"\[("):  # unbounded list grammar: may hit max_tokens; then a prefix
            assert n == 40 or check.fullmatch(text), text
        else:
            assert check.fullmatch(text), (check.pattern, text)
    assert len({text for _, text, _ in results}) > len(results) // 3  # random sampling: varied outputs


def test_constrained_output_ends_only_where_the_grammar_accepts():
    async def fn(model):
        stop = model.tokenizer().encode("<|im_end|>")
        ctx = chat(model, "Say something.")
        # the grammar accepts after "ab" and may continue: the stop token is allowed there and not before
        g = ctx.generate(Sampler.argmax(), constrain=Regex(r"ab(cd)*"), max_tokens=30)
        saw = []
        async for step in g:
            out = await step.execute()
            saw += out.tokens
        ctx.release()
        m = Matcher(Grammar.from_regex("ab(cd)*"), model.tokenizer(), model.vocab_size)
        first = m.allowed()
        m.accept_tokens(model.tokenizer().encode("ab"))
        after = m.allowed()
        return model.tokenizer().decode(saw), bool(first[stop[0]]), bool(after[stop[0]]), m.is_accepting

    text, stop_first, stop_after, accepting = on_model(fn)
    assert re.fullmatch(r"ab(cd)*", text), text
    assert not stop_first and stop_after and accepting


def test_step_loop_equals_collect_and_masks_are_brle():
    schema = json.dumps(SCHEMAS[0])

    async def fn(model):
        a = chat(model, "Person?")
        steps = []
        async for step in a.generate(
            Sampler.top_p(0.9, 0.95, seed=5), constrain=JsonSchema(schema), max_tokens=80
        ):
            steps.append((await step.execute()).tokens)
        b = chat(model, "Person?")
        collected = await b.generate(
            Sampler.top_p(0.9, 0.95, seed=5), constrain=JsonSchema(schema), max_tokens=80
        ).collect_tokens()
        a.release(), b.release()
        c = GrammarConstraint.from_json_schema(schema, model)
        runs = c.step([])
        return [t for s in steps for t in s], collected, runs, model.vocab_size

    stepped, collected, runs, vocab = on_model(fn)
    assert stepped == collected and stepped
    allowed = brle.decode(runs, vocab, "t")
    assert allowed.sum() >= 1 and brle.encode(allowed) == runs


def test_custom_constraint_protocol_and_any_json():
    class OnlyDigitsOrStop:  # a plain Constraint: a BRLE mask per step
        def __init__(self, model):
            tok = model.tokenizer()
            ids, words = tok.vocabs()
            ok = np.zeros(model.vocab_size, bool)
            for i, w in zip(ids, words, strict=True):
                ok[i] = w.isdigit()
            ok[tok.encode("<|im_end|>")[0]] = True
            self.runs, self.calls = brle.encode(ok), []

        def step(self, accepted):
            self.calls.append(list(accepted))
            return self.runs

    async def fn(model):
        c = OnlyDigitsOrStop(model)
        ctx = chat(model, "Count.")
        g = ctx.generate(Sampler.top_k(1.0, 20, seed=3), constrain=c, max_tokens=12)
        text = await g.collect_text()
        ctx.release()
        ctx = chat(model, "JSON?")
        anyj = await ctx.generate(
            Sampler.top_p(0.7, 0.9, seed=1), constrain=AnyJson(), max_tokens=120
        ).collect_tokens()
        ctx.release()
        return text, c.calls, model.tokenizer().decode(anyj)

    text, calls, anyj = on_model(fn)
    assert text.isdigit() or text == ""
    assert calls[0] == [] and all(len(c) == 1 for c in calls[1:])
    json.loads(anyj)


def test_bad_grammars_give_clear_errors():
    async def fn(model):
        errors = []
        for bad in (
            lambda: JsonSchema("{not json").build_constraint(model),
            lambda: Regex("(unclosed").build_constraint(model),
            lambda: Ebnf('root ::= "a" missing').build_constraint(model),
            lambda: Ebnf("start: (").build_constraint(model),
        ):
            try:
                bad()
            except GrammarError as e:
                errors.append(str(e))
        try:
            chat(model, "x").generate(Sampler.argmax(), constrain=42)
        except TypeError as e:
            errors.append(str(e))
        return errors

    errors = on_model(fn)
    assert len(errors) == 5
    assert "not valid JSON" in errors[0] and "regex" in errors[1] and "constrain=" in errors[4]


# ---- speculation ------------------------------------------------------------------------------

PROMPTS = [
    "Repeat exactly: the cat sat on the mat. the cat sat on the mat. the cat sat on the mat.",
    "What does str.split do?",
    "List: one two three one two three one two",
]


class Oracle:
    """Drafts the known greedy continuation (all accepted), or its tokens shifted by one (all rejected)."""

    def __init__(self, target: list[int], wrong: bool = False, k: int = 4):
        self.target, self.wrong, self.k, self.done = target, wrong, k, 0
        self.accepted, self.rolled = [], 0

    def draft(self):
        nxt = self.target[self.done : self.done + self.k]  # what follows the last accepted token
        if self.wrong:
            nxt = [(t + 1) % 100 + 5 for t in nxt]
        return nxt, list(range(len(nxt)))

    def accept(self, tokens):
        self.accepted.append(list(tokens))
        self.done += len(tokens)

    def rollback(self, n):
        self.rolled += n

    def reset(self):
        self.done = 0


def test_speculative_greedy_equals_plain_greedy():
    async def fn(model):
        res = []
        for prompt in PROMPTS:

            async def gen(prompt=prompt, **kw):
                ctx = chat(model, prompt)
                g = ctx.generate(Sampler.argmax(), max_tokens=32, **kw)
                toks = await g.collect_tokens()
                more = await ctx.generate(
                    Sampler.argmax(), max_tokens=6, system_speculation=False
                ).collect_tokens()
                ctx.release()
                return toks, more, g.speculation_stats

            plain, plain_more, _ = await gen(system_speculation=False)
            system, system_more, sst = await gen()
            good = Oracle(plain)
            ok, ok_more, ost = await gen(speculator=good)
            bad = Oracle(plain, wrong=True)
            wrong, wrong_more, wst = await gen(speculator=bad)
            res.append(
                (
                    plain,
                    plain_more,
                    system,
                    system_more,
                    ok,
                    ok_more,
                    wrong,
                    wrong_more,
                    sst,
                    ost,
                    wst,
                    bad.rolled,
                )
            )
        return res

    for plain, pm, system, sm, ok, okm, wrong, wm, sst, ost, wst, rolled in on_model(fn):
        assert system == plain and ok == plain and wrong == plain
        # the context after a speculative generation is the plain one: the next tokens agree too
        assert sm == pm and okm == pm and wm == pm
        assert ost.drafted > 0 and ost.acceptance_rate == 1.0 and ost.passes < len(plain)
        assert wst.drafted > 0 and wst.accepted == 0 and rolled == wst.drafted
        assert 0.0 <= sst.acceptance_rate <= 1.0


def test_system_speculation_drafts_on_repetitive_text_and_can_be_disabled():
    async def fn(model):
        ctx = chat(model, PROMPTS[0])
        g = ctx.generate(Sampler.argmax(), max_tokens=60)
        await g.collect_tokens()
        ctx.release()
        ctx = chat(model, PROMPTS[0])
        off = ctx.generate(Sampler.argmax(), max_tokens=60).disable_system_speculation()
        await off.collect_tokens()
        ctx.release()
        ctx = chat(model, PROMPTS[0])
        sampled = ctx.generate(Sampler.top_p(0.8, 0.9, seed=1), max_tokens=20)  # not argmax: no system drafts
        await sampled.collect_tokens()
        ctx.release()
        return g.speculation_stats, off.speculation_stats, sampled.speculation_stats

    st, off, sampled = on_model(fn)
    assert st.drafted > 0 and st.accepted > 0 and st.tokens_per_pass > 1.0
    assert off.drafted == 0 and sampled.drafted == 0


def test_seeded_sampling_with_a_speculator_equals_plain_seeded_sampling():
    async def fn(model):
        ctx = chat(model, PROMPTS[0])
        plain = await ctx.generate(Sampler.top_k(0.8, 10, seed=11), max_tokens=30).collect_tokens()
        ctx.release()
        ctx = chat(model, PROMPTS[0])
        g = ctx.generate(Sampler.top_k(0.8, 10, seed=11), max_tokens=30, speculator=Oracle(plain))
        spec = await g.collect_tokens()
        ctx.release()
        return plain, spec, g.speculation_stats

    plain, spec, st = on_model(fn)
    assert spec == plain and st.accepted > 0


def test_stop_inside_accepted_drafts_leaves_the_context_as_plain_decoding_does():
    async def fn(model):
        tok = model.tokenizer()
        stop = tok.encode("<|im_end|>")
        ctx = chat(model, "Hi.")
        plain = await ctx.generate(Sampler.argmax(), max_tokens=64, system_speculation=False).collect_tokens()
        plain_len = ctx.seq_len + len(ctx.buffer())
        ctx.release()
        # the oracle drafts the reply AND the stop token after it, so the stop arrives inside a draft run
        ctx = chat(model, "Hi.")
        spec = await ctx.generate(
            Sampler.argmax(), max_tokens=64, speculator=Oracle([*plain, *stop], k=8)
        ).collect_tokens()
        spec_len = ctx.seq_len + len(ctx.buffer())
        ctx.release()
        return plain, spec, plain_len, spec_len

    plain, spec, plain_len, spec_len = on_model(fn)
    assert spec == plain and spec_len == plain_len


def test_ngram_speculator_drafts_what_followed_the_suffix():
    s = NgramSpeculator([1, 2, 3, 4, 5, 9, 2, 3], num_draft=3, next_position=100)
    assert s.draft() == ([4, 5, 9], [100, 101, 102])
    s.accept([7])
    assert s.draft() == ([], [])
    s.accept([1, 2])  # history ends with 7 1 2: "1 2" was followed by 3
    assert s.draft()[0] == [3, 4, 5]
    with pytest.raises(ValueError, match="min_ngram"):
        NgramSpeculator([], min_ngram=3, max_ngram=2)
