"""What inferlets import: `from pie.sdk import Model, Context, Sampler`.

    async def main(input: dict) -> str:
        model = Model.load()                       # the default model (or Model.load("name"))
        ctx = Context(model)
        ctx.system("You are terse.").user(input["prompt"]).cue()
        return await ctx.generate(Sampler.top_p(0.95, t=0.6), max_tokens=64).collect_text()

Everything here runs inside an inferlet started by the engine (`pie run`, Engine.run_inferlet),
which is how Model.load finds the running engine. Contexts of one or many inferlets run
concurrently (asyncio.gather) and their forward passes share batches.
"""

from pie.sdk import runtime
from pie.sdk.context import Context
from pie.sdk.forward import ForwardPass, SampleResult
from pie.sdk.generation import Generation
from pie.sdk.model import Model
from pie.sdk.sampler import Sampler

__all__ = ["Context", "ForwardPass", "Generation", "Model", "SampleResult", "Sampler", "runtime"]
