"""Best-of-n: fork one prompt into n contexts, sample them concurrently (their passes share batches),
score each answer by its mean log-probability, return the best.

    pie run examples/best_of_n.py -- --prompt "What does str.split do?" --n 4 --max-tokens 48
"""

import asyncio

from pie.sdk import Context, Model, Sampler


async def main(input: dict) -> str:
    model = Model.load()
    n, max_tokens = int(input.get("n", 4)), int(input.get("max_tokens", 48))
    base = Context(model)
    base.user(input["prompt"]).cue()
    await base.flush()  # the prompt's KV is computed once; forks share its full pages

    async def one(i: int) -> tuple[float, str]:
        ctx = base.fork()
        gen = ctx.generate(Sampler.top_p(0.9, t=0.8, seed=i).with_logprobs(), max_tokens=max_tokens)
        text = await gen.collect_text()
        ctx.close()
        return sum(gen.logprobs) / max(len(gen.logprobs), 1), text

    scored = await asyncio.gather(*(one(i) for i in range(n)))
    base.close()
    score, text = max(scored)
    return f"[best of {n}, mean logprob {score:.3f}]\n{text}"
