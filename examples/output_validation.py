"""Output validation by log-probabilities (Pie's output-validation benchmark): given a prompt, how likely
is the model to write each of a fixed list of candidate answers? Each candidate is scored in one pass over
a fork of the prompt (forks share the prompt's pages; the candidates run concurrently), reading
log p(token | everything before it) for each of its tokens with `Logprob` probes; the sums are then
normalized across the candidates.

    pie run examples/output_validation.py

Returns JSON: one {"candidate", "logprob", "probability"} per candidate, in the order given.
"""

import asyncio
import json
import math

from inferlet import Context, Logprob, Model, chat, runtime

CANDIDATES = ["John Smith", "Mary Anne", "David Chen", "Chen David"]


async def candidate_logprob(base: Context, last: int, candidate: list[int]) -> float:
    """log p(candidate | prompt): `last` is the prompt's last token, not yet run (its output row predicts
    the candidate's first token)."""
    ctx = base.fork()
    fwd = ctx.forward()
    fwd.input([last] + candidate[:-1])
    handles = [fwd.probe(i, Logprob(t)) for i, t in enumerate(candidate)]  # row i predicts candidate[i]
    out = await fwd.execute()
    ctx.release()
    return sum(out.logprobs(h)[0] for h in handles)


async def validate_outputs(
    model: Model, prompt: list[int], candidates: list[str]
) -> list[tuple[str, float, float]]:
    """(candidate, log-probability, probability normalized over the candidates), in the order given."""
    tok = model.tokenizer()
    base = Context(model)
    base.append(prompt[:-1])
    await base.flush()
    logprobs = await asyncio.gather(*(candidate_logprob(base, prompt[-1], tok.encode(c)) for c in candidates))
    base.release()
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    return [(c, lp, w / sum(weights)) for c, lp, w in zip(candidates, logprobs, weights, strict=True)]


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    prompt = chat.system(model, "You are an expert at information extraction.")
    prompt += chat.user(
        model,
        input.get(
            "question",
            'From the sentence "The financial report was prepared by David Chen.", extract the person\'s name.',
        ),
    )
    prompt += chat.cue(model) + model.tokenizer().encode("The name of the person in the report is ")
    results = await validate_outputs(model, prompt, input.get("candidates") or CANDIDATES)
    return json.dumps([{"candidate": c, "logprob": lp, "probability": p} for c, lp, p in results])
