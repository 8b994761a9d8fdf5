"""Generation on a context, run by the engine: the inferlet wakes only when it wants tokens.

    gen = ctx.generate(Sampler.top_p(0.95, t=0.6), max_tokens=128, stop=["\\n\\n"])
    async for chunk in gen: print(chunk, end="")     # or: text = await gen.collect_text()

The runtime (pie.runtime.work.Generation) keeps the generation in its running set: it samples on the
device, feeds each token back, checks the stop conditions and streams tokens here; collect_text() and
collect_tokens() wake this task once, at the end. Stops, checked in this order after each token:
  * an eos token of the model (unless ignore_eos) or a token id given in `stop`: that token is
    not part of .tokens / .text (it is still in the context);
  * a stop string: .text is cut before it (.tokens keeps every token sampled);
  * max_tokens tokens, or the model's window (max_position_embeddings): finish_reason "length".
Streaming holds back the last len(longest stop string) - 1 characters until they cannot start
a stop string, so a stop string is never streamed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pie.errors import PieError
from pie.runtime.work import Generation as EngineGeneration
from pie.runtime.work import sampler_rows
from pie.sdk.sampler import Sampler

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
        return self._stream(each_token=True)

    async def collect_text(self) -> str:
        if not self._started:
            self._started = True
            async for _ in self._stream(each_token=False):
                pass
        return self.text

    async def collect_tokens(self) -> list[int]:
        await self.collect_text()
        return self.tokens

    async def _stream(self, each_token: bool):
        ctx, s = self.ctx, self.sampler
        tok = ctx.model.tokenizer if ctx.model.has_tokenizer else None
        if self.stop_strings and tok is None:
            raise PieError("stop strings need the model's tokenizer; pass stop token ids instead")
        ctx._check_open()
        async with ctx._lock:
            ctx._sync_chat()
            if not ctx._pending:
                if not ctx.seq_len:
                    raise PieError(
                        "nothing to generate from: append tokens (or call user(...) and cue()) first"
                    )
                ctx._rewind_last()
            prefix = ctx.tokens[-4:]
            hold = max((len(x) for x in self.stop_strings), default=1) - 1
            g = EngineGeneration(
                ctx._seq,
                np.array(ctx._pending, np.int64),
                np.array(ctx._pending_pos, np.int64),
                np.array([len(ctx._pending) - 1], np.int32),
                sampler_rows(1, **s.row(None)),
                max_tokens=self.max_tokens,
                stop_ids=frozenset(self.stop_ids),
                stop_strings=tuple(self.stop_strings),
                detok=tok.detokenizer(prefix_ids=prefix) if self.stop_strings else None,
                seed=s.seed,
                want_logprobs=s.want_logprobs,
                return_logprobs=s.want_logprobs,
            )
            ctx._rt.scheduler.generate(g)
            saved = (ctx._pending, ctx._pending_pos)
            ctx._pending, ctx._pending_pos = [], []
            detok = tok.detokenizer(prefix_ids=prefix) if tok is not None and not self.stop_strings else None
            seen, emitted = 0, 0
            try:
                while True:
                    g.wake_at = seen + 1 if each_token else 1 << 62
                    if len(g.tokens) == seen and not g.finished:
                        g.event.clear()
                        await g.event.wait()
                    if g.error is not None:
                        raise g.error
                    new = g.tokens[seen:]
                    seen += len(new)
                    if detok is not None and new:
                        self.text += detok.push(new)
                    elif self.stop_strings:
                        self.text = g.text if g.text_cut is None else g.text[: g.text_cut]
                    if g.finished:
                        if self.stop_strings and g.text_cut is None:
                            self.text = g.text + g.detok.flush()
                        break
                    if each_token and len(self.text) - hold > emitted:
                        yield self.text[emitted : len(self.text) - hold]
                        emitted = len(self.text) - hold
            except BaseException:
                if not g.finished:
                    ctx._rt.scheduler.cancel(g)
                if g.done_steps == 0:
                    ctx._pending, ctx._pending_pos = saved
                raise
            finally:
                self.tokens, self.logprobs, self.finish_reason = (
                    list(g.tokens),
                    list(g.logprobs),
                    g.finish_reason,
                )
                await ctx._rt.scheduler.wait_idle(g)
                if g.final_token is not None:  # the last sampled token is not in the KV: it is buffered
                    ctx._pending.append(g.final_token)
                    ctx._pending_pos.append(ctx._seq.positions[-1] + 1)
                ctx.next_position = (ctx._pending_pos or ctx._seq.positions or [-1])[-1] + 1
        if detok is not None:
            self.text += detok.flush()  # an incomplete character at the very end
        if emitted < len(self.text) and each_token:
            yield self.text[emitted:]
        if tok is not None and ctx._chat.cued:
            sampled = list(g.tokens) + ([g.stop_token] if g.stop_token is not None else [])
            ctx._chat.record_reply(self.text, tok.decode(sampled, skip_special_tokens=False))
