"""Beam search: keep the `beams` best partial answers by summed log-probability instead of committing to
the locally best token (Pie's beam-search benchmark, written with forks instead of Pie's PTIR masks).

Each live beam is a context; a step runs one pass per beam (the passes share a batch) that reads the
top of its next-token distribution. Every beam-token candidate scores parent score + log p(token); the
best `beams` candidates survive, each a fork of its parent (forks share the parent's KV pages; only the
partial last page is copied when first written). A candidate that ends the turn (a chat stop token) is a
finished hypothesis; the search stops when no live beam can still beat the worst kept finished one.

    pie run examples/beam_search.py -- --prompt "What does str.split do?" --beams 3 --max-tokens 16

Returns a JSON list of {"text", "tokens", "logprob"}, best first.
"""

import asyncio
import json
import math

from inferlet import Context, Distribution, Model, chat, runtime


async def next_candidates(ctx: Context, pending: list[int], k: int) -> list[tuple[int, float]]:
    """Run `pending` through ctx; the k most likely next tokens with their log-probabilities."""
    fwd = ctx.forward()
    fwd.input(pending)
    h = fwd.probe(len(pending) - 1, Distribution(1.0, k))
    ids, probs = (await fwd.execute()).distribution(h)
    return [(t, math.log(p)) for t, p in zip(ids, probs, strict=True) if p > 0]


async def beam_search(
    model: Model, prompt: list[int], beams: int, max_tokens: int, stop: set[int]
) -> list[tuple[float, list[int]]]:
    """The `beams` best (summed logprob, tokens) continuations of `prompt`, best first."""
    # A parent's best candidates can be stop tokens; reading beams + len(stop) of them per parent gives
    # the same survivors as ranking the whole vocabulary of every parent.
    k = beams + len(stop)
    live: list[tuple[float, list[int], Context, list[int]]] = [(0.0, [], Context(model), prompt)]
    done: list[tuple[float, list[int]]] = []
    for _ in range(max_tokens):
        expansions = await asyncio.gather(*(next_candidates(ctx, pend, k) for _, _, ctx, pend in live))
        cands = sorted(
            ((score + lp, i, t) for i, (score, *_) in enumerate(live) for t, lp in expansions[i]),
            key=lambda c: -c[0],
        )
        survivors = []
        for score, i, t in cands:
            if len(survivors) == beams:
                break
            if t in stop:
                done.append((score, live[i][1]))
            else:
                survivors.append((score, live[i][1] + [t], live[i][2].fork(), [t]))
        for _, _, ctx, _ in live:
            ctx.release()
        live = survivors
        done = sorted(done, key=lambda d: -d[0])[:beams]
        # scores only fall as beams grow: once every live beam is below the worst kept finished one, stop
        if not live or (len(done) == beams and live[0][0] <= done[-1][0]):
            break
    for _, _, ctx, _ in live:
        ctx.release()
    return sorted(done + [(s, toks) for s, toks, _, _ in live], key=lambda d: -d[0])[:beams]


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    tok = model.tokenizer()
    beams, max_tokens = int(input.get("beams", 3)), int(input.get("max_tokens", 16))
    if beams < 1 or max_tokens < 1:
        raise ValueError("beams and max_tokens must be >= 1")
    prompt = chat.system(model, "You are a helpful assistant.")
    prompt += chat.user(model, input.get("prompt", "What does str.split do?")) + chat.cue(model)
    found = await beam_search(model, prompt, beams, max_tokens, set(chat.stop_tokens(model)))
    return json.dumps([{"text": tok.decode(t), "tokens": t, "logprob": s} for s, t in found])
