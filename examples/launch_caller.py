"""Launch caller: runs launch_callee.py as child inferlets (concurrently, on the same engine), awaits their
results, and cancels one that takes too long (its pages are freed).

    pie run examples/launch_caller.py -- --prompts "Name a prime.|Name a color." --max-tokens 16
"""

import asyncio
import json
from pathlib import Path

from inferlet import Model, runtime
from inferlet.runtime import ChildError
from pie.sdk import runtime as pie_runtime

CALLEE = str(Path(__file__).with_name("launch_callee.py"))


async def main(input: dict) -> str:
    prompts = str(input.get("prompts", "Name a prime.|Name a color.")).split("|")
    max_tokens = int(input.get("max_tokens", 16))
    children = [runtime.launch(CALLEE, {"prompt": p, "max_tokens": max_tokens}) for p in prompts]
    answers = [await child for child in children]

    # a child asked for far more tokens than we wait for: the timeout leaves it running, cancel() ends it
    slow = runtime.launch(CALLEE, json.dumps({"prompt": prompts[0], "max_tokens": 100_000}))
    try:
        await asyncio.wait_for(slow.wait(), float(input.get("timeout", 0.5)))
        slow_state = "finished"
    except TimeoutError:
        slow.cancel()
        try:
            await slow
        except ChildError as e:
            slow_state = str(e)
    stats = pie_runtime.stats(Model.load().name)
    return json.dumps(
        {
            "answers": dict(zip(prompts, answers, strict=True)),
            "slow": slow_state,
            "pages_used": stats["pages_used"] - stats["pages_cached"],
        },
        ensure_ascii=False,
    )
