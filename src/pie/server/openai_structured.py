"""The generation of a request with tools or a response format (see openai_tools): the prompt rendered with
the tools, the output generated under the request's grammar (inferlet.grammar, step by step) and parsed for
tool calls in the model's native format (inferlet.tools.Decoder).

Text streams as it is generated, except when tools are in play: the reply is then held until its end, and
either its text or its calls (OpenAI tool_calls, finish_reason "tool_calls") come as one event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pie.server.openai_params import ApiError, GenRequest
from pie.server.openai_tools import (
    Structure,
    check_constraint,
    openai_calls,
    output_constraint,
    prompt_ids,
)


def _cut_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    at = [i for s in stops if (i := text.find(s)) >= 0]
    return (text[: min(at)], True) if at else (text, False)


async def generate_structured(
    req: GenRequest, engine_model: str, emit: Callable[[tuple], None], delta: Callable[[int, str], None]
) -> None:
    from inferlet import Context, Model, Sampler
    from inferlet._textstream import model_format
    from inferlet.chat import stop_tokens
    from inferlet.tools import Decoder, Event

    s: Structure = req.structure or Structure()
    model = Model.load(engine_model)
    tok = model._pie.tokenizer
    fmt = model_format(model).name
    constraint = output_constraint(s, fmt, req.model)
    if constraint is not None:
        check_constraint(constraint, model)
    if req.logprobs:
        raise ApiError(
            400, "'logprobs' with tools or response_format is not supported yet by pie serve", "logprobs"
        )
    window = int(model._pie.capabilities.extra.get("max_position_embeddings") or 1 << 30)
    limit = req.max_tokens or window
    stops = stop_tokens(model)

    def sampler(offset: int) -> Sampler:
        if req.temperature == 0:
            return Sampler.argmax()
        seed = None if req.seed is None else req.seed + offset
        return Sampler.top_p(req.temperature, req.top_p, seed=seed)

    async def choice(ctx: Context, index: int, offset: int) -> None:
        gen = ctx.generate(
            sampler(offset), max_tokens=limit, stop=stops, constrain=constraint, auto_flush=False
        )
        detok = tok.detokenizer()
        dec = Decoder(model) if s.uses_tools else None
        tokens: list[int] = []
        calls: list = []
        text, sent, stopped = "", 0, False
        hold = max((len(x) for x in req.stop), default=1) - 1  # a stop string may straddle two steps
        async for step in gen:
            out = (await step.execute()).tokens
            tokens += out
            text += detok.push(out)
            if dec is not None:
                ev = dec.feed(out)
                while isinstance(ev, Event.Call):
                    calls.append(ev)
                    ev = dec.feed([])
                continue
            text, stopped = _cut_stop(text, req.stop)
            upto = len(text) if stopped else max(sent, len(text) - hold)
            if upto > sent:
                delta(index, text[sent:upto])
                sent = upto
            if stopped:
                break
        reason = "stop" if stopped or len(tokens) < limit else "length"
        if dec is None:
            text, stopped = _cut_stop(text + detok.flush(), req.stop)
            if len(text) > sent:
                delta(index, text[sent:])
        else:
            calls += dec.finish()
            if calls and s.tool_choice != "none":
                emit(("calls", index, openai_calls(calls)))
                reason = "tool_calls"
            else:
                text, stopped = _cut_stop(text + detok.flush(), req.stop)
                if text:
                    delta(index, text)
        emit(("done", index, "stop" if stopped else reason, tokens, []))

    for p_i, prompt in enumerate(req.prompts):
        if req.chat:
            ids = prompt_ids(tok, req.messages or [], s, fmt)
        else:
            ids = tok.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        base = Context(model)
        base.append(ids)
        await base.flush()
        emit(("prompt", len(ids)))
        ctxs = [base] + [base.fork() for _ in range(req.n - 1)]
        try:
            await asyncio.gather(*(choice(c, p_i * req.n + j, j) for j, c in enumerate(ctxs)))
        finally:
            for c in ctxs:
                c.release()
