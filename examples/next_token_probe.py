"""Read the model's next-token distribution after a raw prompt: one hand-built forward pass.

pie run examples/next_token_probe.py -- --prompt "The for statement" --k 5
"""

from inferlet import Context, Distribution, Model, runtime


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    tok = model.tokenizer()
    with Context(model) as ctx:
        ids = tok.encode(input["prompt"])
        fwd = ctx.forward()
        fwd.input(ids)
        h = fwd.probe(len(ids) - 1, Distribution(1.0, int(input.get("k", 5))))  # the last row: top-k
        token_ids, probs = (await fwd.execute()).distribution(h)
    return "\n".join(f"{p:.3f}  {tok.decode([i])!r}" for i, p in zip(token_ids, probs, strict=True))
