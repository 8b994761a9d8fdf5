"""Tree-of-thought (Pie's tree-of-thought benchmark): a 3-level search (propose a plan, execute it,
reflect on the solution) where every node branches `num_branches` ways, num_branches**3 leaves in all.
Every branch is a fork of its parent: the parent's prompt and answer are computed once and their KV
pages shared by the children, and all branches of a level generate concurrently (batched).

    pie run examples/tree_of_thought.py -- --question "Calculate (42 + 3) * 5 / 15." --num-branches 2

Returns JSON: one {"plan", "solution", "reflection", "seq_len"} per leaf (seq_len: the leaf context's
tokens, what it would have prefilled alone).
"""

import asyncio
import json

from inferlet import Context, Model, Sampler, runtime

SYSTEM = (
    "You are a helpful, respectful, and honest assistant that excels at mathematical reasoning. Please "
    "follow the user's instructions precisely."
)
PROPOSE = (
    "Please generate a high-level plan for solving the following question. First, just state the method "
    "you will use. Do not do the actual calculation. Keep your response concise and within 80 words. "
    "Question: "
)
EXECUTE = (
    "The plan looks good! Now, use real numbers and do the calculation. Please solve the question "
    "step-by-step according to the plan. Give me the final answer. Make your response short."
)
REFLECT = (
    "Okay. Now, evaluate your own solution and give it a score on a scale of 1 to 5. Please rigorously "
    "check the correctness of the calculations and the final answer."
)


class Tree:
    def __init__(self, branches: int, max_tokens: int, seed: int | None) -> None:
        self.branches, self.max_tokens, self.seed = branches, max_tokens, seed

    async def reply(self, ctx: Context, path: tuple[int, ...]) -> str:
        """One sampled answer; a seed (pie's extension) per tree path makes the whole tree reproducible."""
        seed = None if self.seed is None else hash((self.seed, *path)) & 0x7FFFFFFF
        return await ctx.generate(
            Sampler.top_p(0.6, 0.95, seed=seed), max_tokens=self.max_tokens
        ).collect_text()

    async def propose(self, root: Context, question: str, i: int) -> list[dict]:
        ctx = root.fork()
        plan = await self.reply(ctx.user(PROPOSE + question), (i,))
        ctx.user(EXECUTE)
        await ctx.flush()  # the plan and the next prompt: computed once for every child
        kids = await asyncio.gather(*(self.execute(ctx.fork(), plan, (i, j)) for j in range(self.branches)))
        ctx.release()
        return [leaf for k in kids for leaf in k]

    async def execute(self, ctx: Context, plan: str, path: tuple[int, ...]) -> list[dict]:
        solution = await self.reply(ctx, path)
        ctx.user(REFLECT)
        await ctx.flush()
        leaves = await asyncio.gather(*(self.reflect(ctx.fork(), (*path, k)) for k in range(self.branches)))
        ctx.release()
        return [{"plan": plan, "solution": solution, **leaf} for leaf in leaves]

    async def reflect(self, ctx: Context, path: tuple[int, ...]) -> dict:
        reflection = await self.reply(ctx, path)
        seq_len = ctx.seq_len
        ctx.release()
        return {"reflection": reflection, "seq_len": seq_len}


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    question = input.get("question", "Calculate (42 + 3) * 5 / 15.")
    seed = input.get("seed")
    tree = Tree(int(input.get("num_branches", 2)), int(input.get("max_tokens", 512)), seed)
    root = Context(model)
    root.system(SYSTEM)
    await root.flush()
    levels = await asyncio.gather(*(tree.propose(root, question, i) for i in range(tree.branches)))
    root.release()
    return json.dumps([leaf for level in levels for leaf in level])
