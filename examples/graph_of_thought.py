"""Graph-of-thought (Pie's graph-of-thought benchmark): several proposals are generated concurrently from
forks of one prompt, then aggregated in pairs, level by level, as soon as two results are ready (a
proposal's context goes on with the other proposal to merge, so its own history is reused, not
prefilled again).

    pie run examples/graph_of_thought.py -- --question "Calculate (42 + 3) * 5 / 15." --num-proposals 4

Returns JSON: the final aggregated solutions (num_proposals / 4 of them).
"""

import asyncio
import json

from inferlet import Context, Model, Sampler, runtime

SYSTEM = "You are a helpful, respectful and honest assistant."
PROPOSE = (
    "Could you suggest a method or approach to solve the following question? Please provide a high-level "
    "plan without doing the actual calculation. Keep it concise, around 80 words. Question: {}"
)
AGGREGATE = (
    "Please compare the following solution with the one you just provided and aggregate their ideas into "
    "a single, improved solution:\n"
)


async def reply(ctx: Context, max_tokens: int, seed: int | None) -> tuple[str, Context]:
    text = await ctx.generate(Sampler.top_p(0.6, 0.95, seed=seed), max_tokens=max_tokens).collect_text()
    return text, ctx


async def aggregate_pairs(tasks: list, max_tokens: int, seed: int | None) -> list:
    """As results come in, pair them: the later one's context aggregates the earlier one's text."""
    merged, waiting = [], None
    for i, done in enumerate(asyncio.as_completed(tasks)):
        text, ctx = await done
        if waiting is None:
            waiting = (text, ctx)
            continue
        other_text, other_ctx = waiting
        other_ctx.release()
        waiting = None
        ctx.user(AGGREGATE + other_text)
        merged.append(asyncio.ensure_future(reply(ctx, max_tokens, None if seed is None else seed + i)))
    if waiting is not None:
        waiting[1].release()
    return merged


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    question = input.get("question", "Calculate (42 + 3) * 5 / 15.")
    n = int(input.get("num_proposals", 8))
    proposal_tokens = int(input.get("proposal_tokens", 256))
    aggregation_tokens = int(input.get("aggregation_tokens", 256))
    seed = input.get("seed")  # pie's extension: reproducible samples

    base = Context(model)
    base.system(SYSTEM)
    base.user(PROPOSE.format(question))
    await base.flush()  # the shared prompt: computed once, its pages shared by every proposal
    proposals = [
        asyncio.ensure_future(reply(base.fork(), proposal_tokens, None if seed is None else seed + i))
        for i in range(n)
    ]
    base.release()
    first = await aggregate_pairs(proposals, aggregation_tokens, None if seed is None else seed + 100)
    second = await aggregate_pairs(first, aggregation_tokens, None if seed is None else seed + 200)
    final = await asyncio.gather(*second)
    for _, ctx in final:
        ctx.release()
    return json.dumps([text for text, _ in final])
