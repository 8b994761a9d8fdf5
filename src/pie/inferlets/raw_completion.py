"""raw-completion: continue a prompt as is (no chat template, no special tokens added).

    pie run raw-completion -- --prompt "Once upon a time" [--max-tokens 256] [--temperature 0]
                              [--ignore-eos] [--seed N]

temperature 0 (the default) means argmax. Returns the continuation only.
"""

from pie.sdk import Context, Model, Sampler
from pie.sdk.args import check_args, get_arg

ARGS = ["prompt", "max_tokens", "temperature", "ignore_eos", "seed", "model"]


async def main(input: dict) -> str:
    check_args(input, ARGS)
    prompt = get_arg(input, "prompt", str)
    max_tokens = get_arg(input, "max_tokens", int, 256)
    temperature = get_arg(input, "temperature", float, 0.0)
    ignore_eos = get_arg(input, "ignore_eos", bool, False)
    seed = get_arg(input, "seed", int, None)
    model = Model.load(get_arg(input, "model", str, None))
    sampler = Sampler.argmax() if temperature == 0 else Sampler.temperature(temperature, seed=seed)

    async with Context(model) as ctx:
        ctx.append(model.tokenizer.encode(prompt))
        gen = ctx.generate(sampler, max_tokens=max_tokens, ignore_eos=ignore_eos)
        return await gen.collect_text()
