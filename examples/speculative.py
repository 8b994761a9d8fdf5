"""Speculative decoding: a custom prompt-lookup speculator, and pie's system speculation, against plain
greedy decoding. All three give the same text; speculation needs fewer passes.

A speculator proposes draft tokens; the generator runs the last token plus the drafts in ONE forward
pass with a sample at every position, keeps the drafts the model agrees with (plus its own next token)
and truncates the rest out of the KV. The custom speculator here looks the last `ngram` tokens up in the
prompt and proposes what followed (Pie's `demo-custom-spec`); system speculation does the same inside
the SDK, on by default for argmax.

    pie run examples/speculative.py -- --max-tokens 96
    pie run examples/speculative.py -- --prompt "$(cat some_code.py) Rename total to subtotal."

On a real model, a prompt the answer copies from (code edits, quoting) accepts most drafts; the tiny
embedded model mostly writes its own text, so few drafts are accepted there.

Prints one line per mode: passes, tokens, drafts proposed / accepted, and whether the text equals plain.
"""

from inferlet import Context, Model, Sampler, runtime

TASK = (
    "Rename the field `total` to `subtotal`. Output only the code.\n\n"
    "class Cart:\n    def __init__(self):\n        self.total = 0\n        self.items = []\n\n"
    "    def add(self, item, n):\n        self.items.append((item, n))\n        self.total += item.price * n\n"
)


class PromptLookup:
    """Pie's Speculator protocol: draft / accept / rollback / reset (duck-typed)."""

    def __init__(self, history: list[int], ngram: int = 1, num_draft: int = 6) -> None:
        self.prompt, self.ngram, self.num_draft = list(history), ngram, num_draft
        self.reset()

    def reset(self) -> None:
        self.history = list(self.prompt)
        self.proposed = self.accepted = 0

    def draft(self) -> tuple[list[int], list[int]]:
        tail = self.history[-self.ngram :]
        for start in range(len(self.history) - self.ngram - 1, -1, -1):  # most recent match first
            if self.history[start : start + self.ngram] == tail:
                drafts = self.history[start + self.ngram : start + self.ngram + self.num_draft]
                self.proposed += len(drafts)
                n = len(self.history)
                return drafts, list(range(n, n + len(drafts)))
        return [], []

    def accept(self, tokens: list[int]) -> None:
        self.accepted += max(0, len(tokens) - 1)  # the first token is the model's own pick
        self.history += tokens

    def rollback(self, n: int) -> None:
        pass  # drafts never enter the history


async def run(model: Model, prompt: str, max_tokens: int, mode: str) -> tuple[list[int], int, str]:
    ctx = Context(model)
    ctx.system("You are a careful code-refactoring assistant.").user(prompt)
    spec = None
    if mode == "custom":
        ctx.cue()
        spec = PromptLookup(ctx.buffer())
    gen = ctx.generate(Sampler.argmax(), max_tokens=max_tokens, speculator=spec)
    if mode == "plain":
        gen.disable_system_speculation()
    tokens, passes = [], 0
    async for step in gen:
        tokens += (await step.execute()).tokens
        passes += 1
    ctx.release()
    st = gen.speculation_stats
    if spec is not None:
        drafted = f"{spec.proposed} drafted, {spec.accepted} accepted"
    else:
        drafted = f"{st.drafted} drafted, {st.accepted} accepted"
    return tokens, passes, drafted


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    max_tokens = int(input.get("max_tokens", 96))
    prompt = input.get("prompt", TASK)
    plain, plain_passes, _ = await run(model, prompt, max_tokens, "plain")
    lines = [f"plain:  {plain_passes} passes, {len(plain)} tokens"]
    for mode in ("custom", "system"):
        tokens, passes, drafted = await run(model, prompt, max_tokens, mode)
        same = "same text as plain" if tokens == plain else "DIFFERENT from plain"
        lines.append(f"{mode}: {passes} passes, {len(tokens)} tokens, {drafted}, {same}")
    return "\n".join(lines)
