"""The callee of launch_caller.py: answers one prompt (greedy) and returns the text.

pie run examples/launch_callee.py -- --prompt "Name a prime." --max-tokens 16
"""

from inferlet import Context, Model, Sampler


async def main(input: dict) -> str:
    ctx = Context(Model.load())
    ctx.user(str(input["prompt"]))
    return await ctx.generate(Sampler.argmax(), max_tokens=int(input.get("max_tokens", 16))).collect_text()
