"""Watermarking (Pie's watermarking benchmark, as Kirchenbauer et al. 2023 define the soft watermark):
every step, a pseudo-random "green" fraction `gamma` of the vocabulary, seeded by the previous token and
a secret key, gets `delta` added to its logits before sampling. The text reads as usual, but a detector
that knows the key counts green tokens and finds far more than the expected gamma * n (a z-score).

The inferlet reads the whole next-token distribution each step (a `Distribution(1.0, 0)` probe on the
generation step, sampler cleared), picks the token itself and hands it back with `gen.accept([token])`.

    pie run examples/watermark.py -- --prompt "Explain the LLM decoding process ELI5." --max-tokens 64

Returns JSON {"watermarked": {"text", "tokens", "z"}, "plain": {...}}: "plain" samples the unbiased
distribution with the same loop, so its z-score is that of unwatermarked text (about 0).
"""

import json
import math

import numpy as np

from inferlet import Context, Distribution, Model, Sampler, runtime


def green_ids(prev: int, key: int, vocab: int, gamma: float) -> np.ndarray:
    """The green token ids after token `prev`: the first gamma * vocab of a permutation seeded by (key, prev)."""
    return np.random.default_rng([key, prev]).permutation(vocab)[: int(gamma * vocab)]


def z_score(tokens: list[int], key: int, vocab: int, gamma: float) -> float:
    """The detector: green tokens among tokens[1:] (each seeded by the one before) against gamma * n."""
    n = len(tokens) - 1
    if n < 1:
        return 0.0
    hits = sum(
        int(t in set(green_ids(p, key, vocab, gamma).tolist()))
        for p, t in zip(tokens, tokens[1:], strict=False)
    )
    return (hits - gamma * n) / math.sqrt(n * gamma * (1 - gamma))


async def generate(
    model: Model, prompt: str, max_tokens: int, key: int, gamma: float, delta: float, seed: int
) -> list[int]:
    """Sample up to max_tokens tokens; delta = 0 is plain sampling."""
    vocab = model.vocab_size
    rng = np.random.default_rng(seed)
    ctx = Context(model)
    ctx.system("You are a helpful, respectful and honest assistant.").user(prompt).cue()
    await ctx.flush()  # the prompt runs now: every generation step then runs exactly one token (index 0)
    gen = ctx.generate(Sampler.argmax(), max_tokens=max_tokens)
    prev, out = 0, []  # the first token's green list is seeded by 0 (the detector skips it)
    async for step in gen:
        step.clear_sampler()
        h = step.probe(0, Distribution(1.0, 0))  # the whole vocabulary, most likely first
        ids, probs = (await step.execute()).distribution(h)
        logits = np.full(vocab, -np.inf)
        logits[ids] = np.log(np.maximum(probs, 1e-30))
        logits[green_ids(prev, key, vocab, gamma)] += delta
        p = np.exp(logits - logits.max())
        token = int(rng.choice(vocab, p=p / p.sum()))
        out += gen.accept([token])
        prev = token
    ctx.release()
    return out


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    tok = model.tokenizer()
    prompt = input.get("prompt", "Explain the LLM decoding process ELI5.")
    max_tokens, key = int(input.get("max_tokens", 256)), int(input.get("key", 15485863))
    gamma, delta, seed = (
        float(input.get("gamma", 0.25)),
        float(input.get("delta", 2.0)),
        int(input.get("seed", 0)),
    )
    result = {}
    for name, d in (("watermarked", delta), ("plain", 0.0)):
        tokens = await generate(model, prompt, max_tokens, key, gamma, d, seed)
        z = z_score(tokens, key, model.vocab_size, gamma)
        result[name] = {"text": tok.decode(tokens), "tokens": tokens, "z": z}
    return json.dumps(result)
