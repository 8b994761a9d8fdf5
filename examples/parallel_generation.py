"""Parallel generation from one prefill (Pie's parallel-generation benchmark): the system prompt is
prefilled once, two forks of it take different questions and generate concurrently (their decode steps
share batches; both read the system prompt's KV pages).

    pie run examples/parallel_generation.py -- --max-tokens 32
"""

import asyncio
import json

from inferlet import Context, Model, Sampler, runtime

QUESTIONS = ["Explain Pulmonary Embolism", "Explain the Espresso making process ELI5."]


async def answer(base: Context, question: str, max_tokens: int) -> str:
    ctx = base.fork()
    ctx.user(question).cue()
    text = await ctx.generate(Sampler.argmax(), max_tokens=max_tokens).collect_text()
    ctx.release()
    return text


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    base = Context(model)
    base.system("You are a helpful, respectful and honest assistant.")
    await base.flush()
    max_tokens = int(input.get("max_tokens", 128))
    questions = input.get("questions") or QUESTIONS
    texts = await asyncio.gather(*(answer(base, q, max_tokens) for q in questions))
    base.release()
    return json.dumps(texts)
