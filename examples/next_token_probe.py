"""Read the model's next-token distribution after a raw prompt: one hand-built forward pass.

pie run examples/next_token_probe.py -- --prompt "The for statement" --k 5
"""

from pie.sdk import Context, Model, Sampler


async def main(input: dict) -> str:
    model = Model.load()
    tok = model.tokenizer
    async with Context(model) as ctx:
        p = ctx.forward()
        p.input(tok.encode(input["prompt"]))
        p.sample([-1], Sampler.dist(int(input.get("k", 5))))  # last row: the top-k distribution
        (r,) = await p.execute()
    return "\n".join(f"{prob:.3f}  {tok.decode([i])!r}" for i, prob in r.dist)
