"""Token-by-token generation on a context.

    gen = ctx.generate(Sampler.top_p(0.95, t=0.6), max_tokens=128, stop=["\\n\\n"])
    async for chunk in gen: print(chunk, end="")     # or: text = await gen.collect_text()

Each step runs the context's pending tokens and samples the last row; the sampled token becomes
pending, so it enters the KV with the next pass (and a generation's last token stays pending).
Stops, checked in this order after each token:
  * an eos token of the model (unless ignore_eos) or a token id given in `stop`: that token is
    not part of .tokens / .text (it is still in the context);
  * a stop string: .text is cut before it (.tokens keeps every token sampled);
  * max_tokens tokens.
Streaming holds back the last len(longest stop string) - 1 characters until they cannot start
a stop string, so a stop string is never streamed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pie.errors import PieError
from pie.runtime.passes import sampler_rows
from pie.sdk.sampler import Sampler, step_seed

if TYPE_CHECKING:
    from pie.sdk.context import Context


class Generation:
    def __init__(self, ctx: Context, sampler: Sampler, max_tokens: int, stop, ignore_eos: bool) -> None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        stop = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
        self.ctx, self.sampler, self.max_tokens = ctx, sampler, max_tokens
        self.stop_strings = [s for s in stop if isinstance(s, str) and s]
        self.stop_ids = {int(s) for s in stop if not isinstance(s, str)}
        if not ignore_eos:
            self.stop_ids |= set(ctx.model.eos_token_ids)
        self.tokens: list[int] = []  # generated, without a final stop-id token
        self.logprobs: list[float] = []  # per token, when the sampler asks .with_logprobs()
        self.text = ""
        self.finish_reason: str | None = None  # "stop" (eos, stop id or string) or "length"
        self._started = False

    def __aiter__(self):
        if self._started:
            raise PieError("a generation can be consumed once; call ctx.generate(...) again for more")
        self._started = True
        return self._stream()

    async def collect_text(self) -> str:
        if not self._started:
            async for _ in self:
                pass
        return self.text

    async def collect_tokens(self) -> list[int]:
        if not self._started:
            async for _ in self:
                pass
        return self.tokens

    async def _stream(self):
        ctx, s = self.ctx, self.sampler
        tok = ctx.model.tokenizer if ctx.model.has_tokenizer else None
        if self.stop_strings and tok is None:
            raise PieError("stop strings need the model's tokenizer; pass stop token ids instead")
        ctx._sync_chat()
        if not ctx.pending and not ctx.kv_len:
            raise PieError("nothing to generate from: append tokens (or call user(...) and cue()) first")
        detok = tok.detokenizer(prefix_ids=ctx.tokens[-4:]) if tok is not None else None
        hold = max((len(x) for x in self.stop_strings), default=1) - 1
        sampled: list[int] = []  # every token sampled, stop token included
        emitted, cut, rows = 0, None, None
        while len(self.tokens) < self.max_tokens:
            if rows is None or s.seed is not None:  # a seeded sampler needs a new seed each step
                rows = sampler_rows(1, **s.row(None if s.seed is None else step_seed(s.seed, len(sampled))))
            res = await ctx._run([], None, [-1], rows, None, s.want_logprobs, rewind=True)
            t = int(res.tokens[0])
            sampled.append(t)
            ctx.append([t])
            if t in self.stop_ids:
                self.finish_reason = "stop"
                break
            self.tokens.append(t)
            if s.want_logprobs and res.logprobs is not None:
                self.logprobs.append(float(res.logprobs[0]))
            if detok is None:
                continue
            start = max(0, len(self.text) - hold)
            self.text += detok.push([t])
            cut = self._find_stop(start)
            if cut is not None:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
                break
            if len(self.text) - hold > emitted:
                yield self.text[emitted : len(self.text) - hold]
                emitted = len(self.text) - hold
        else:
            self.finish_reason = "length"
        if detok is not None and cut is None:
            self.text += detok.flush()  # an incomplete character at the very end
        if emitted < len(self.text):
            yield self.text[emitted:]
        if tok is not None and ctx._chat.cued:
            ctx._chat.record_reply(self.text, tok.decode(sampled, skip_special_tokens=False))

    def _find_stop(self, start: int) -> int | None:
        """Index in .text of the earliest stop string that begins at or after `start`."""
        hits = [i for i in (self.text.find(x, start) for x in self.stop_strings) if i >= 0]
        return min(hits) if hits else None
