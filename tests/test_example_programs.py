"""Pie's benchmark programs in examples/ (written with `import inferlet`) show what they exist for, on the
embedded default model (in-process, CPU, float32): each checked against transformers run on the same
weights, or against the runtime's own counters.

One engine serves the whole module (one model load); every test checks its own counter deltas.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime_checks import assert_all_free, check_refcounts

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ASSETS = ROOT / "src" / "pie" / "assets" / "default-model"
PAGE_SIZE = 16


class Harness:
    """An engine on the embedded model, driven from synchronous tests through one event loop."""

    def __init__(self) -> None:
        from pie.drivers.inprocess import InProcessDriver
        from pie.drivers.spec import ExecutorSpec
        from pie.models.tokenizer import Tokenizer
        from pie.runtime.engine import Engine

        self.loop = asyncio.new_event_loop()
        spec = ExecutorSpec(
            model_path=str(ASSETS), activation_dtype="float32", page_size=PAGE_SIZE, num_pages=512
        )
        self.engine = Engine.from_drivers({"default": (InProcessDriver(spec), Tokenizer.from_dir(ASSETS))})
        self.run_async(self.engine.start())
        self.rt = self.engine.model()

    def run_async(self, coro, timeout: float = 120):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def run(self, what, input: dict | None = None) -> str:
        """Run an example (name in examples/) or an `async def main(input)`; its result text."""
        target = EXAMPLES / f"{what}.py" if isinstance(what, str) else what
        out = self.run_async(self.engine.run_inferlet(target, input or {}))
        check_refcounts(self.rt)
        return out

    def stats(self) -> dict:
        return self.rt.stats()

    def close(self) -> None:
        assert_all_free(self.rt)
        self.run_async(self.engine.shutdown())
        self.loop.close()


@pytest.fixture(scope="module")
def pie():
    h = Harness()
    yield h
    h.close()


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(ASSETS, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def example(name: str):
    """The example's module, to call its helpers from a test inferlet."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def hf_logprobs(hf, ids: list[int], mask: np.ndarray | None = None) -> torch.Tensor:
    """[len(ids), V] float64 log-probabilities of the next token after each prefix; `mask` [T, T] bool
    (True = may attend) replaces the causal mask."""
    kw = {}
    if mask is not None:
        add = torch.zeros(mask.shape, dtype=torch.float32)
        add[~torch.from_numpy(mask)] = torch.finfo(torch.float32).min
        kw["attention_mask"] = add[None, None]
    logits = hf(torch.tensor([ids]), **kw).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def chat_turns(pie: Harness, *turns: tuple[str, str]) -> list[list[int]]:
    """The tokens of each chat turn (("system", text), ("user", text), ("cue", "")...), rendered by pie as
    an inferlet's Context renders them (message content is tokenized apart from the template). Each turn
    is rendered alone: the embedded model's ChatML renders a turn the same whatever came before."""

    async def render(_):
        from inferlet import Context, Model, chat

        model = Model.load()
        return json.dumps(
            [
                chat.cue(model) if role == "cue" else getattr(Context(model), role)(text).buffer()
                for role, text in turns
            ]
        )

    return json.loads(pie.run(render))


def chat_prompt(pie: Harness, system: str, user: str) -> list[int]:
    return sum(chat_turns(pie, ("system", system), ("user", user), ("cue", "")), [])


# ---- beam search --------------------------------------------------------------------------------


def reference_beam_search(hf, prompt, beams, max_tokens, stop):
    """The same search on transformers' full-vocabulary log-probabilities (full recompute each step)."""
    live, done = [(0.0, [])], []
    for _ in range(max_tokens):
        cands = []
        for i, (score, toks) in enumerate(live):
            lp = hf_logprobs(hf, prompt + toks)[-1]
            cands += [(score + float(lp[t]), i, t) for t in range(lp.shape[0])]
        cands.sort(key=lambda c: -c[0])
        nxt = []
        for score, i, t in cands:
            if len(nxt) == beams:
                break
            if t in stop:
                done.append((score, live[i][1]))
            else:
                nxt.append((score, live[i][1] + [t]))
        live, done = nxt, sorted(done, key=lambda d: -d[0])[:beams]
        if not live or (len(done) == beams and live[0][0] <= done[-1][0]):
            break
    return sorted(done + live, key=lambda d: -d[0])[:beams]


def test_beam_search_equals_a_full_vocabulary_search_and_beats_greedy(pie, hf):
    user = "What does str.split do?"
    before = pie.stats()
    out = json.loads(pie.run("beam_search", {"prompt": user, "beams": 3, "max_tokens": 6}))
    scores = [b["logprob"] for b in out]
    assert len(out) == 3 and scores == sorted(scores, reverse=True)
    prompt = chat_prompt(pie, "You are a helpful assistant.", user)
    ref = reference_beam_search(hf, prompt, 3, 6, {2})
    assert [b["tokens"] for b in out] == [t for _, t in ref]
    assert np.allclose(scores, [s for s, _ in ref], atol=1e-3)
    for b in out:  # each score is the teacher-forced sum of its tokens' log-probabilities
        lp = hf_logprobs(hf, prompt + b["tokens"])
        forced = sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(b["tokens"]))
        assert math.isclose(b["logprob"], forced, abs_tol=1e-3)
    greedy, g_score = [], 0.0
    for _ in range(len(out[0]["tokens"])):
        lp = hf_logprobs(hf, prompt + greedy)[-1]
        greedy.append(int(lp.argmax()))
        g_score += float(lp.max())
    assert out[0]["logprob"] >= g_score - 1e-4
    # the prompt was prefilled once: every beam is a fork of it
    assert pie.stats()["tokens_prefilled"] - before["tokens_prefilled"] < 2 * len(prompt)


# ---- prefix tree / parallel generation ----------------------------------------------------------


def hf_greedy(hf, ids: list[int], n: int, stop=(2,)) -> list[int]:
    out = []
    for _ in range(n):
        t = int(hf_logprobs(hf, ids + out)[-1].argmax())
        if t in stop:
            break
        out.append(t)
    return out


def decode(ids: list[int]) -> str:
    from pie.models.tokenizer import Tokenizer

    return Tokenizer.from_dir(ASSETS).decode(ids, skip_special_tokens=True)


def test_prefix_tree_prefills_every_node_once_and_leaves_share_pages(pie, hf):
    mod = example("prefix_tree")
    turns = [("system", mod.SYSTEM)]

    def walk(children):
        for c in children:
            if isinstance(c, str):
                turns.extend([("user", c), ("cue", "")])
            else:
                turns.append(("user", c[0]))
                walk(c[1])

    walk(mod.TREE)
    nodes = chat_turns(pie, *turns)  # each turn rendered alone: ChatML does not depend on earlier turns
    unique = sum(map(len, nodes))
    before = pie.stats()
    texts = json.loads(pie.run("prefix_tree", {"num_tokens": 4}))
    after = pie.stats()
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)
    # every node's tokens went through the model once (decode steps are counted apart)
    assert after["tokens_prefilled"] - before["tokens_prefilled"] == unique
    # a leaf's answer is what a model run on its whole prompt says (full recompute in transformers)
    first_leaf = sum(nodes[:5], [])  # system, photosynthesis, ELI5, chef, cue
    assert texts[0] == decode(hf_greedy(hf, first_leaf, 4))

    async def shared(_):
        from inferlet import Model

        leaves, inner = await mod.build_tree(Model.load())
        pages = [ctx._inner.page_ids for ctx in leaves]
        full = len(nodes[0]) // PAGE_SIZE  # the system prompt's full pages
        first = {tuple(p[:full]) for p in pages}
        held = len({p for c in leaves + inner for p in c._inner.page_ids})  # distinct physical pages
        for c in leaves + inner:
            c.release()
        return json.dumps([len(first), held, sum(map(len, pages))])

    n_distinct, held, separate = json.loads(pie.run(shared))
    assert n_distinct == 1  # the 8 leaves read the same physical pages for the system prompt
    assert held < separate / 2  # the tree holds far fewer pages than 8 separate contexts would


def test_parallel_generation_forks_answer_like_fresh_prompts(pie, hf):
    mod = example("parallel_generation")
    before = pie.stats()
    texts = json.loads(pie.run("parallel_generation", {"max_tokens": 8}))
    prefilled = pie.stats()["tokens_prefilled"] - before["tokens_prefilled"]
    system = "You are a helpful, respectful and honest assistant."
    prompts = [chat_turns(pie, ("system", system), ("user", q), ("cue", "")) for q in mod.QUESTIONS]
    for (s, u, c), text in zip(prompts, texts, strict=True):
        assert text == decode(hf_greedy(hf, s + u + c, 8))
    # the system prompt was prefilled once, each question and cue once
    assert prefilled == len(prompts[0][0]) + sum(len(u) + len(c) for _, u, c in prompts)


# ---- tree-, skeleton-, graph- and recursion-of-thought --------------------------------------------


def computed(pie: Harness, run) -> tuple[str, int]:
    """(result, tokens the model computed for it: prefilled + decoded)."""
    before = pie.stats()
    out = run()
    after = pie.stats()
    return out, sum(after[k] - before[k] for k in ("tokens_prefilled", "tokens_decoded"))


def test_tree_of_thought_branches_share_their_parents(pie):
    args = {"num_branches": 2, "max_tokens": 4, "seed": 5}
    out, work = computed(pie, lambda: pie.run("tree_of_thought", args))
    leaves = json.loads(out)
    assert len(leaves) == 8 and len({(x["plan"], x["solution"]) for x in leaves}) <= 4
    # 8 leaves of ~270 tokens, computed as one tree: each prompt and answer once, not once per leaf
    assert work < sum(x["seq_len"] for x in leaves) / 3
    assert pie.run("tree_of_thought", args) == out  # seeded per tree path: reproducible under batching


def test_skeleton_of_thought_elaborates_every_point_from_one_prefill(pie):
    args = {"num_points": 3, "plan_tokens": 24, "elab_tokens": 4, "seed": 3}
    out = json.loads(pie.run("skeleton_of_thought", args))
    assert 1 <= len(out["points"]) <= 3 and len(out["elaborations"]) == len(out["points"])
    assert json.loads(pie.run("skeleton_of_thought", args)) == out
    mod = example("skeleton_of_thought")
    assert mod.parse_points("a <point>x</point> b <point> y </point><point>z</point>", 2) == ["x", "y"]
    assert mod.parse_points("- first\n\n* second\n", 3) == ["first", "second"]


def test_graph_of_thought_aggregates_pairs_level_by_level(pie):
    args = {"num_proposals": 8, "proposal_tokens": 4, "aggregation_tokens": 4, "seed": 1}
    before = pie.stats()["tokens_prefilled"]
    out = json.loads(pie.run("graph_of_thought", args))
    assert len(out) == 2 and all(isinstance(t, str) for t in out)  # 8 proposals -> 4 -> 2
    # (pairs form in completion order, as in Pie, so the texts depend on timing: not compared across runs)
    mod = example("graph_of_thought")
    s, u = chat_turns(
        pie, ("system", mod.SYSTEM), ("user", mod.PROPOSE.format("Calculate (42 + 3) * 5 / 15."))
    )
    # the shared prompt was prefilled once: all the work (its cues, the 6 aggregation turns) is less than
    # what the 8 proposals' prompts alone would cost without sharing
    assert pie.stats()["tokens_prefilled"] - before < 8 * len(s + u) * 0.6


def test_recursion_of_thought_parses_and_solves_at_max_depth(pie, hf):
    mod = example("recursion_of_thought")
    assert mod.parse_response("x <leaf> 15 </leaf>") == "15"
    assert mod.parse_response("<branch>a</branch> and <branch>b</branch>") == ("a", "b")
    assert mod.parse_response("<branch>a</branch>") is None and mod.parse_response("15") is None
    q = "Please calculate (42 + 3) * 5 / 15."
    out = json.loads(pie.run("recursion_of_thought", {"question": q, "max_depth": 0, "max_tokens": 6}))
    s, u, c = chat_turns(
        pie,
        ("system", "You are a helpful, respectful and honest assistant."),
        ("user", f"{mod.SOLVE} {q}"),
        ("cue", ""),
    )
    assert out["trace"] == [["", "solve", out["answer"]]] and out["answer"] == decode(
        hf_greedy(hf, s + u + c, 6)
    )
    deep = json.loads(pie.run("recursion_of_thought", {"question": q, "max_depth": 2, "max_tokens": 6}))
    kinds = {kind for _, kind, _ in deep["trace"]}
    assert deep["trace"][-1][0] == "" and kinds <= {"leaf", "branch", "merge", "solve", "error"}


# ---- watermarking -----------------------------------------------------------------------------------


def test_watermark_detector_scores_watermarked_text_above_plain_text(pie):
    args = {"max_tokens": 32, "delta": 5.0, "gamma": 0.25, "seed": 1}
    out = json.loads(pie.run("watermark", args))
    wm, plain = out["watermarked"], out["plain"]
    assert len(wm["tokens"]) >= 16 and len(plain["tokens"]) >= 16
    assert wm["z"] > 4 and plain["z"] < 2 and wm["z"] > plain["z"] + 3
    mod = example("watermark")
    # the detector needs only the text's tokens and the key: another key sees no watermark
    assert mod.z_score(wm["tokens"], 15485863, 8192, 0.25) == wm["z"]
    assert mod.z_score(wm["tokens"], 7, 8192, 0.25) < 2.5


# ---- output validation ------------------------------------------------------------------------------


def test_output_validation_logprobs_equal_a_direct_forward(pie, hf):
    mod = example("output_validation")
    out = json.loads(pie.run("output_validation"))
    assert [r["candidate"] for r in out] == mod.CANDIDATES
    assert math.isclose(sum(r["probability"] for r in out), 1.0, abs_tol=1e-9)
    q = 'From the sentence "The financial report was prepared by David Chen.", extract the person\'s name.'

    async def prompt_ids(_):
        from inferlet import Model, chat

        m = Model.load()
        ids = chat.system(m, "You are an expert at information extraction.") + chat.user(m, q) + chat.cue(m)
        tok = m.tokenizer()
        return json.dumps(
            [
                ids + tok.encode("The name of the person in the report is "),
                [tok.encode(c) for c in mod.CANDIDATES],
            ]
        )

    prompt, cands = json.loads(pie.run(prompt_ids))
    for r, cand in zip(out, cands, strict=True):
        lp = hf_logprobs(hf, prompt + cand)  # one causal forward over prompt + candidate
        direct = sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(cand))
        assert math.isclose(r["logprob"], direct, abs_tol=1e-3), (r, direct)


# ---- attention masks: sink, window, hierarchy ---------------------------------------------------------


def brle_matrix(rows: list[list[int]]) -> np.ndarray:
    """[T, T] bool from one BRLE row per token (runs alternate false/true; short rows padded false)."""
    from inferlet import brle

    return np.stack([brle.decode(r, len(rows), "row") for r in rows])


def assert_masked_decode_matches_hf(hf, prompt: list[int], tokens: list[int], row) -> None:
    """The masked greedy decode equals transformers run once over prompt + tokens with the same explicit
    [T, T] mask (each token's row as it was computed), and the mask changed the answer."""
    ids = prompt + tokens[:-1]
    mask = brle_matrix([row(q) for q in range(len(ids))])
    assert not np.triu(mask, 1).any()  # causal
    lp = hf_logprobs(hf, ids, mask)
    assert [int(lp[len(prompt) - 1 + j].argmax()) for j in range(len(tokens))] == tokens
    assert tokens != hf_greedy(hf, prompt, len(tokens), stop=())  # unmasked greedy says something else


def test_attention_sink_equals_transformers_with_the_same_mask(pie, hf):
    mod = example("attention_sink")
    args = {
        "prompt": "Tell me a long story about a cat.",
        "sink_size": 4,
        "window_size": 12,
        "max_tokens": 10,
    }
    out = json.loads(pie.run("attention_sink", args))
    assert len(out["tokens"]) >= 4 and out["pages"] == -(-out["seq_len"] // PAGE_SIZE)
    s, u, c = chat_turns(
        pie, ("system", "You are a helpful assistant."), ("user", args["prompt"]), ("cue", "")
    )
    # every token stays in the KV (the mask hides them, pages are not released): the last one was not run
    assert out["seq_len"] == len(s + u + c) + len(out["tokens"]) - (len(out["tokens"]) == args["max_tokens"])
    assert_masked_decode_matches_hf(hf, s + u + c, out["tokens"], lambda q: mod.sink_row(q, 4, 12))


def test_windowed_attention_equals_transformers_with_the_same_mask(pie, hf):
    mod = example("windowed_attention")
    args = {"prompt": "Tell me a long story about a cat.", "window_size": 10, "max_tokens": 10}
    out = json.loads(pie.run("windowed_attention", args))
    s, u, c = chat_turns(
        pie, ("system", "You are a helpful assistant."), ("user", args["prompt"]), ("cue", "")
    )
    assert_masked_decode_matches_hf(hf, s + u + c, out["tokens"], lambda q: mod.window_row(q, 10))


def test_hierarchical_attention_equals_transformers_with_the_same_mask(pie, hf):
    mod = example("hierarchical_attention")
    words = " ".join(f"word{i} cache batching" if i % 7 == 0 else f"filler{i}" for i in range(26))
    args = {"prompt": words, "chunk_size_words": 10, "sink_tokens": 8, "local_window_tokens": 16,
            "summary_tokens_per_chunk": 6, "max_tokens": 6}  # fmt: skip
    out = json.loads(pie.run("hierarchical_attention", args))
    n_chunks = -(-len(words.split()) // 10)
    assert out["chunks"] == n_chunks and len(out["selected"]) == 1

    async def plan(_):
        from inferlet import Model

        return json.dumps(mod.build_prompt(Model.load(), words, 10, 6, 1)[:3])

    prompt, summaries, bodies = json.loads(pie.run(plan))
    assert len(summaries) == n_chunks and len(bodies) == 1
    assert_masked_decode_matches_hf(
        hf, prompt, out["tokens"], lambda q: mod.brle_row(q, mod.hierarchy(q, 8, summaries, bodies, 16))
    )


# ---- modular prompt cache ---------------------------------------------------------------------------


def test_modular_cache_second_run_prefills_only_the_changed_module(pie):
    mod = example("modular_cache")
    system = "You are a concise technical assistant who tests caches."  # a namespace of this test's own
    modules = mod.default_modules("What is a page?")
    modules[0]["text"] = system

    def run(task: str) -> tuple[dict, int]:
        ms = [dict(m) for m in modules]
        ms[-1]["text"] = task
        pie.rt.kv.clear_cache()  # the automatic prefix cache off the table: reuse comes from snapshots
        before = pie.stats()["tokens_prefilled"]
        out = json.loads(pie.run("modular_cache", {"modules": ms, "max_tokens": 2}))
        return out, pie.stats()["tokens_prefilled"] - before

    first, cold = run("What is a page?")
    assert first["cache_hit_modules"] == 0 and len(first["saved"]) == 4
    again, warm = run("What is a page?")
    assert again["cache_hit_modules"] == 4 and again["saved"] == [] and again["text"] == first["text"]
    changed, partial = run("What is a snapshot?")
    assert changed["cache_hit_modules"] == 3 and len(changed["saved"]) == 1
    s, u, u2, c = chat_turns(
        pie, ("system", system), ("user", "What is a page?"), ("user", "What is a snapshot?"), ("cue", "")
    )
    assert warm == len(c)  # only the cue of the answer: every module came from the snapshot
    assert partial == len(u2) + len(c)  # the changed task module and the cue, nothing else
    assert cold > partial + len(s)
    for name in first["saved"] + changed["saved"]:
        pie.run(_delete(name))


def _delete(name: str):
    async def main(_):
        from inferlet import Context, Model

        Context.delete(Model.load(), name)
        return ""

    return main


# ---- as users run them ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("beam_search", ["--beams", "2", "--max-tokens", "3"]),
        (
            "windowed_attention",
            ["--window-size", "8", "--max-tokens", "4"],
        ),  # masks over the dev driver's wire
    ],
)
def test_examples_run_under_pie_run(pie, name, args, tmp_path):
    """`pie run examples/<name>.py -- ...` in a fresh PIE_HOME (defaults: the dev driver subprocess on CPU,
    the embedded model) prints what the in-process engine returns."""
    import os
    import subprocess
    import sys

    name, args = "windowed_attention", ["--window-size", "8", "--max-tokens", "4"]
    env = {**os.environ, "PIE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT / 'src'}"}
    argv = [sys.executable, "-m", "pie", "run", str(EXAMPLES / f"{name}.py"), "--", *args]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from pie.cli.run_cmd import parse_inferlet_args

    expected = json.loads(pie.run(name, parse_inferlet_args(args)))
    assert json.loads(r.stdout)["tokens"] == expected["tokens"] and len(expected["tokens"]) == 4


def test_readme_inferlet_example_runs(pie, tmp_path):
    """The README's inferlet (the python block) is a working program on the inferlet API."""
    import re

    (code,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert "from inferlet import" in code and "pie.sdk" not in code
    f = tmp_path / "readme_inferlet.py"
    f.write_text(code)
    out = pie.run(f, {"prompt": "What does str.split do?"})
    assert isinstance(out, str) and out == pie.run(f, {"prompt": "What does str.split do?"})  # seeded
