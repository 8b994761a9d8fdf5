"""Attention sink (Pie's attention-sink benchmark, after StreamingLLM): while decoding, every token sees
only the first `sink_size` tokens (the "attention sink") and the `window_size` most recent ones; the
tokens between are masked out with a per-token attention mask on a hand-built pass.

    pie run examples/attention_sink.py -- --prompt "Tell me a long story about a cat." --sink-size 4 --window-size 64

The mask bounds what each token reads, not memory: the masked tokens' KV pages stay allocated (Pie's
runtime keeps them too). Returns JSON {"text", "tokens", "seq_len", "pages"}.
"""

import json

from inferlet import Context, Model, Sampler, chat, runtime


def sink_row(slot: int, sink: int, window: int) -> list[int]:
    """BRLE attention row of the token at KV slot `slot`: slots [0, sink) and the `window` slots ending at
    its own; runs alternate false/true from a false run, and slots after `slot` are left out (not
    attended), so the row is causal."""
    seen = slot + 1
    if seen <= sink + window:
        return [0, seen]
    return [0, sink, seen - sink - window, window]


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    sink, window = int(input.get("sink_size", 4)), int(input.get("window_size", 64))
    max_tokens = int(input.get("max_tokens", 512))
    pending = chat.system(model, "You are a helpful assistant.")
    pending += chat.user(model, input.get("prompt", "Tell me a long story about a cat.")) + chat.cue(model)
    stops = set(chat.stop_tokens(model))
    ctx = Context(model)
    generated: list[int] = []
    for _ in range(max_tokens):
        fwd = ctx.forward()
        start = fwd.start_position()  # the KV slot of pending[0]
        fwd.input(pending)
        fwd.attention_mask([sink_row(start + i, sink, window) for i in range(len(pending))])
        h = fwd.sample([len(pending) - 1], Sampler.argmax())
        token = (await fwd.execute()).token(h)
        if token is None or token in stops:
            break
        generated.append(token)
        pending = [token]
    seq_len, pages = ctx.seq_len, -(-ctx.seq_len // ctx.page_size)
    ctx.release()
    text = model.tokenizer().decode(generated)
    return json.dumps({"text": text, "tokens": generated, "seq_len": seq_len, "pages": pages})
