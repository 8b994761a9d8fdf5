"""Windowed attention (Pie's windowed-attention benchmark): while decoding, every token sees only the
`window_size` most recent tokens (its own included), through a per-token attention mask on a hand-built
pass: a sliding window imposed by the program on a model trained with full attention.

    pie run examples/windowed_attention.py -- --prompt "Tell me a long story about a cat." --window-size 64

The mask bounds what each token reads, not memory: the masked tokens' KV pages stay allocated (Pie's
runtime keeps them too). Returns JSON {"text", "tokens", "seq_len", "pages"}.
"""

import json

from inferlet import Context, Model, Sampler, chat, runtime


def window_row(slot: int, window: int) -> list[int]:
    """BRLE attention row of the token at KV slot `slot`: the `window` slots ending at its own (runs
    alternate false/true from a false run; slots after `slot` are left out, so the row is causal)."""
    seen = slot + 1
    return [0, seen] if seen <= window else [seen - window, window]


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    window, max_tokens = int(input.get("window_size", 64)), int(input.get("max_tokens", 512))
    pending = chat.system(model, "You are a helpful assistant.")
    pending += chat.user(model, input.get("prompt", "Tell me a long story about a cat.")) + chat.cue(model)
    stops = set(chat.stop_tokens(model))
    ctx = Context(model)
    generated: list[int] = []
    for _ in range(max_tokens):
        fwd = ctx.forward()
        start = fwd.start_position()  # the KV slot of pending[0]
        fwd.input(pending)
        fwd.attention_mask([window_row(start + i, window) for i in range(len(pending))])
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
