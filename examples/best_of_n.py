"""Best-of-n: fork one prompt into n contexts, sample them concurrently (their passes share batches),
score each answer by its mean log-probability (one scoring pass with `Logprob` probes), return the best.

    pie run examples/best_of_n.py -- --prompt "What does str.split do?" --n 4 --max-tokens 48
"""

import asyncio

from inferlet import Context, Logprob, Model, Sampler, chat, runtime


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    n, max_tokens = int(input.get("n", 4)), int(input.get("max_tokens", 48))
    prompt = chat.user(model, input["prompt"]) + chat.cue(model)
    base = Context(model).append(prompt[:-1])
    await base.flush()  # the prompt's KV is computed once; forks share its pages

    async def one(i: int) -> tuple[float, str]:
        ctx = base.fork().append(prompt[-1:])
        sampler = Sampler.top_p(0.8, 0.9, seed=i)  # seed=: pie's extension, reproducible draws
        gen = ctx.generate(sampler, max_tokens=max_tokens, stop=chat.stop_tokens(model), auto_flush=False)
        tokens = await gen.collect_tokens()
        ctx.release()
        if not tokens:
            return float("-inf"), ""
        # score: one pass over the answer on a fork of the prompt; row j predicts tokens[j]
        scorer = base.fork()
        fwd = scorer.forward().input(prompt[-1:] + tokens[:-1])
        handles = [fwd.probe(j, Logprob(t)) for j, t in enumerate(tokens)]
        out = await fwd.execute()
        scorer.release()
        return sum(out.logprobs(h)[0] for h in handles) / len(tokens), model.tokenizer().decode(tokens)

    scored = await asyncio.gather(*(one(i) for i in range(n)))
    base.release()
    score, text = max(scored)
    return f"[best of {n}, mean logprob {score:.3f}]\n{text}"
