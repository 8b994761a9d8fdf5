"""text-completion: one chat turn through the model's chat template.

    pie run text-completion -- --prompt "Why is the sky blue?" [--system TEXT] [--max-tokens 256]
                               [--temperature 0.6] [--top-p 0.95] [--seed N]

temperature 0 means argmax. Returns the reply text.
"""

from pie.sdk import Context, Model, Sampler
from pie.sdk.args import check_args, get_arg

ARGS = ["prompt", "system", "max_tokens", "temperature", "top_p", "seed", "model"]


async def main(input: dict) -> str:
    check_args(input, ARGS)
    prompt = get_arg(input, "prompt", str)
    system = get_arg(input, "system", str, None)
    max_tokens = get_arg(input, "max_tokens", int, 256)
    temperature = get_arg(input, "temperature", float, 0.6)
    top_p = get_arg(input, "top_p", float, 0.95)
    seed = get_arg(input, "seed", int, None)
    model = Model.load(get_arg(input, "model", str, None))
    sampler = Sampler.argmax() if temperature == 0 else Sampler.top_p(top_p, t=temperature, seed=seed)

    async with Context(model) as ctx:
        if system:
            ctx.system(system)
        ctx.user(prompt).cue()
        return await ctx.generate(sampler, max_tokens=max_tokens).collect_text()
