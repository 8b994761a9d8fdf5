"""Skeleton-of-thought (Pie's skeleton-of-thought benchmark): write a short plan of key points first, then
elaborate every point concurrently, each in a fork of the system prompt (its KV computed once and
shared), which cuts latency against writing the points one after another.

    pie run examples/skeleton_of_thought.py -- --question "What are the defining characteristics of Rome?"

Points are read from <point>...</point> tags; a model that does not write the tags (the tiny embedded
one) has the non-empty lines of its plan read as points instead. Returns JSON {"points", "elaborations"}.
"""

import asyncio
import json
import re

from inferlet import Context, Model, Sampler, runtime


def parse_points(plan: str, max_points: int) -> list[str]:
    """The plan's <point> texts, else its non-empty lines; at most max_points."""
    points = [p.strip() for p in re.findall(r"<point>(.*?)</point>", plan, flags=re.S)]
    if not points:
        points = [line.strip(" -*\t") for line in plan.splitlines()]
    return [p for p in points if p][:max_points]


async def elaborate(base: Context, point: str, max_tokens: int, seed: int | None) -> str:
    ctx = base.fork()
    ctx.user(
        f"Elaborate on the following point: {point}. Your response should be complete and only concerned "
        "with this point."
    )
    text = await ctx.generate(Sampler.top_p(0.6, 0.95, seed=seed), max_tokens=max_tokens).collect_text()
    ctx.release()
    return text


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    question = input.get("question", "What are the defining characteristics of Rome?")
    num_points = int(input.get("num_points", 3))
    seed = input.get("seed")  # pie's extension: reproducible samples
    base = Context(model)
    base.system("You are a helpful, respectful and honest assistant.")
    await base.flush()

    plan_ctx = base.fork()
    plan_ctx.user(
        f"Generate up to {num_points} key points that outline the answer to the following question: "
        f"{question}. Each point must be enclosed between the <point> and </point> tags."
    )
    plan = await plan_ctx.generate(
        Sampler.top_p(0.6, 0.95, seed=seed), max_tokens=int(input.get("plan_tokens", 256))
    ).collect_text()
    plan_ctx.release()

    points = parse_points(plan, num_points)
    elab_tokens = int(input.get("elab_tokens", 256))
    seeds = [None if seed is None else seed + 1 + i for i in range(len(points))]
    texts = await asyncio.gather(
        *(elaborate(base, p, elab_tokens, s) for p, s in zip(points, seeds, strict=True))
    )
    base.release()
    return json.dumps({"points": points, "elaborations": texts})
