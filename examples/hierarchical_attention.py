"""Hierarchical attention (Pie's hierarchical-attention benchmark): a long prompt is split into chunks,
and every token attends only to a hierarchy of it, through a per-token attention mask:

    global instructions      (the first `sink_tokens` tokens)
      chunk summaries        (the first tokens of each chunk's summary turn)
        selected chunk(s)    (the full text of the chunks most relevant to the request)
          recent window      (the `local_window_tokens` tokens ending at the token itself)

The decode loop is hand-built (`ctx.forward()` per token) because the mask changes every step. Unlike
Pie's version, which gives every token of a pass the mask of the pass's last token, each row here stops
at its own token (a causal mask): prompt tokens never see later ones.

    pie run examples/hierarchical_attention.py -- --prompt "Explain how LLM serving systems use KV cache..."

Returns JSON {"text", "tokens", "chunks", "selected"}.
"""

import json

from inferlet import Context, Model, Sampler, chat, runtime


def split_words(text: str, chunk_words: int) -> list[str]:
    """Chunks of at most chunk_words words (one empty chunk for an empty text)."""
    words = text.split()
    n = max(1, chunk_words)
    return [" ".join(words[i : i + n]) for i in range(0, len(words), n)] or [""]


def select_relevant_chunks(chunks: list[str], query: str, k: int) -> list[int]:
    """The k chunks sharing the most words (longer than 3 letters) with the query, in positional order."""
    q = {w.lower() for w in query.split() if len(w) > 3}
    scored = sorted(range(len(chunks)), key=lambda i: (-sum(w.lower() in q for w in chunks[i].split()), i))
    return sorted(scored[: max(1, min(k, len(chunks)))])


def build_prompt(model: Model, prompt: str, chunk_words: int, summary_tokens: int, selected: int):
    """(prompt tokens, [summary ranges], [full-text ranges of the selected chunks], chunks, selected ids)."""
    chunks = split_words(prompt, chunk_words)
    chosen = select_relevant_chunks(chunks, prompt, selected)
    tokens = chat.system(
        model,
        "You are a concise assistant. Use the visible hierarchy: global instructions, the chunk summaries, "
        "and the selected local chunk.",
    )
    summaries, bodies = [], []
    for i, chunk in enumerate(chunks):
        start = len(tokens)
        tokens += chat.user(model, f"Chunk {i} summary: {' '.join(chunk.split()[:20])}\n")
        summaries.append((start, min(len(tokens), start + summary_tokens)))
        start = len(tokens)
        tokens += chat.user(model, f"Chunk {i} full text:\n{chunk}\n")
        if i in chosen:
            bodies.append((start, len(tokens)))
    tokens += chat.user(
        model, "Answer the original request using the selected local chunk(s) and the global chunk summaries."
    )
    return tokens + chat.cue(model), summaries, bodies, chunks, chosen


def brle_row(slot: int, ranges: list[tuple[int, int]]) -> list[int]:
    """BRLE attention row of the token at KV slot `slot` keeping `ranges` (clipped to [0, slot])."""
    kept = sorted((max(0, a), min(slot + 1, b)) for a, b in ranges)
    runs, cursor = [], 0
    for a, b in kept:
        a = max(a, cursor)
        if a < b:
            runs += [a - cursor, b - a]
            cursor = b
    return runs


def hierarchy(slot: int, sink: int, summaries, bodies, window: int) -> list[tuple[int, int]]:
    """What the token at `slot` sees: the sink, the summaries, the selected chunks, its recent window."""
    return [(0, sink), *summaries, *bodies, (slot + 1 - window, slot + 1)]


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    prompt = input.get(
        "prompt",
        "Explain how LLM serving systems use KV cache, batching, scheduling, and attention masks. Include "
        "one practical example.",
    )
    max_tokens = int(input.get("max_tokens", 128))
    sink, window = int(input.get("sink_tokens", 64)), int(input.get("local_window_tokens", 128))
    pending, summaries, bodies, chunks, chosen = build_prompt(
        model,
        prompt,
        max(8, int(input.get("chunk_size_words", 80))),
        int(input.get("summary_tokens_per_chunk", 24)),
        max(1, int(input.get("selected_chunks", 1))),
    )
    stops = set(chat.stop_tokens(model))
    ctx = Context(model)
    generated: list[int] = []
    for _ in range(max_tokens):
        fwd = ctx.forward()
        start = fwd.start_position()
        fwd.input(pending)
        slots = range(start, start + len(pending))
        fwd.attention_mask([brle_row(s, hierarchy(s, sink, summaries, bodies, window)) for s in slots])
        h = fwd.sample([len(pending) - 1], Sampler.argmax())
        token = (await fwd.execute()).token(h)
        if token is None or token in stops:
            break
        generated.append(token)
        pending = [token]
    ctx.release()
    text = model.tokenizer().decode(generated)
    return json.dumps({"text": text, "tokens": generated, "chunks": len(chunks), "selected": chosen})
