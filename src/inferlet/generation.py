"""Generator: Pie's multi-step generation, on pie's engine-side generation where it can.

    g = ctx.generate(Sampler.top_p(0.6, 0.95), max_tokens=256)
    text = await g.collect_text()              # or: await g.collect_tokens()
    async for step in g:                       # or step by step
        out = await step.execute()             # out.tokens: the tokens accepted this step

collect_tokens() / collect_text() run as one engine-side generation (pie.runtime.work.Generation: the
scheduler samples, feeds back and checks stop tokens without waking the inferlet) unless the generator has
per-step probes or a logit mask. `async for` runs one pass per step (the inferlet sees every step, so it
can add probes, clear the sampler and accept() its own token). Both give the same tokens: a seeded
sampler draws with the same per-step seeds on either path.

A stop token ends the generation and is not kept in the context (nor in the output); with max_tokens
reached, the last token is kept (in the buffer or the KV). Both as in Pie's SDK.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

from pie.sdk.generation import Generation as _PieGeneration
from pie.sdk.sampler import step_seed

from . import brle
from . import chat as _chat
from ._errors import unsupported
from .forward import Forward, Output, ProbeHandle
from .sample import Sampler, probe_kind

if TYPE_CHECKING:
    from .context import Context

_UNBOUNDED = 1 << 40  # max_tokens None: until a stop token or the model's window


class Generator:
    """Built by Context.generate(...); configure with the chain methods, then iterate or collect."""

    __slots__ = (
        "_ctx",
        "_sampler",
        "_stop",
        "_max_tokens",
        "_mask",
        "_step_probes",
        "_generated",
        "_steps",
        "_done",
    )

    def __init__(
        self,
        ctx: Context,
        sampler: Sampler,
        *,
        max_tokens: int | None = None,
        stop: Iterable[int] | None = None,
        constrain=None,
        logit_mask: list[int] | None = None,
        speculator=None,
        system_speculation: bool | None = None,
        adapter=None,
        zo_seed: int | None = None,
        horizon: int | None = None,
        rebid_each_step: bool = True,
    ) -> None:
        if not isinstance(sampler, Sampler):
            raise TypeError(f"generate() needs an inferlet.Sampler (Sampler.argmax(), ...), got {sampler!r}")
        if max_tokens is not None and max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        if constrain is not None:
            unsupported("constrained generation (constrain=)", "it comes with grammar support")
        if speculator is not None or system_speculation:
            unsupported("speculative decoding (speculator= / system_speculation=)")
        if adapter is not None:
            unsupported("adapters (adapter=)")
        if zo_seed is not None:
            unsupported("zo (zo_seed=)")
        # horizon and rebid_each_step are scheduling hints for Pie's bidding scheduler; pie has none
        self._ctx = ctx
        self._sampler = sampler
        self._stop: list[int] = [int(t) for t in stop] if stop is not None else []
        self._max_tokens = max_tokens
        self._mask = (
            None if logit_mask is None else brle.decode(logit_mask, ctx.model.vocab_size, "logit_mask")
        )
        self._step_probes: list[tuple[int, Any]] = []
        self._generated = 0
        self._steps = 0  # passes run (seeds: one per step)
        self._done = False

    # ---- configuration ----------------------------------------------------------------------------
    def max_tokens(self, n: int) -> Generator:
        self._max_tokens = int(n)
        return self

    def stop(self, tokens: Iterable[int]) -> Generator:
        self._stop = [int(t) for t in tokens]
        return self

    def add_stop(self, tokens: Iterable[int]) -> Generator:
        self._stop += [int(t) for t in tokens]
        return self

    def disable_system_speculation(self) -> Generator:
        return self  # pie has no system drafter: nothing to turn off

    def horizon(self, n: int) -> Generator:
        return self  # a scheduling hint for Pie's bidding scheduler; pie's scheduler takes none

    def rebid_each_step(self, enabled: bool) -> Generator:
        return self  # as horizon()

    def constrain(self, c) -> Generator:
        unsupported("constrained generation (Generator.constrain)", "it comes with grammar support")

    def adapter(self, a) -> Generator:
        unsupported("adapters (Generator.adapter)")

    def zo_seed(self, seed: int) -> Generator:
        unsupported("zo (Generator.zo_seed)")

    def probe_each_step(self, index: int, probe: Any) -> ProbeHandle:
        """A probe on every step at `index` (into the step's inputs); the handle reads every Output."""
        slot = 1 + len(self._step_probes)  # slot 0 is the generator's sampler
        self._step_probes.append((int(index), probe))
        return ProbeHandle(slot=slot, kind=probe_kind(probe))

    # ---- state -----------------------------------------------------------------------------------
    @property
    def tokens_generated(self) -> int:
        return self._generated

    @property
    def is_done(self) -> bool:
        return self._done or (self._max_tokens is not None and self._generated >= self._max_tokens)

    # ---- step by step ---------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[GenStep]:
        return self

    async def __anext__(self) -> GenStep:
        if self.is_done:
            raise StopAsyncIteration
        self._ctx._drain_chat()
        return GenStep(self, self._ctx._take_buffer())

    def accept(self, tokens: list[int]) -> list[int]:
        """Register tokens the inferlet sampled itself (after step.clear_sampler()): stop and max_tokens
        apply, and the accepted ones are run with the next step."""
        accepted = self._accept(list(tokens))
        self._ctx._buffer += accepted
        return accepted

    def _accept(self, tokens: list[int]) -> list[int]:
        """Stop / max_tokens truncation and counters (Pie's rules)."""
        for i, t in enumerate(tokens):
            if t in self._stop:
                tokens = tokens[:i]
                self._done = True
                break
        if self._max_tokens is not None:
            left = self._max_tokens - self._generated
            if len(tokens) >= left:
                tokens = tokens[:left]
                self._done = True
        self._generated += len(tokens)
        if tokens:
            self._ctx._note_generated(tokens)
        return tokens

    def _step_seed(self) -> int | None:
        seed = self._sampler.seed
        return None if seed is None else step_seed(seed, self._steps)

    # ---- collecting -----------------------------------------------------------------------------
    async def collect_tokens(self) -> list[int]:
        """Run to the end; every accepted token."""
        if self._step_probes or self._mask is not None:
            out: list[int] = []
            async for step in self:
                out += (await step.execute()).tokens
            return out
        return await self._engine_side()

    async def collect_text(self) -> str:
        """Run to the end; the reply's text (through the chat decoder)."""
        tokens = await self.collect_tokens()
        dec = _chat.Decoder(self._ctx.model)
        parts = []
        for t in tokens:  # one token per feed, as a step-by-step loop would
            ev = dec.feed([t])
            if isinstance(ev, _chat.Event.Done):
                return ev.text
            if isinstance(ev, _chat.Event.Delta):
                parts.append(ev.text)
        return "".join(parts) + dec.finish()

    async def collect_json(
        self, *, schema: str | None = None, parse: Callable[[str], Any] | None = None
    ) -> Any:
        unsupported("collect_json (JSON-constrained generation)", "use collect_text() and json.loads for now")

    async def _engine_side(self) -> list[int]:
        """The rest of the generation as one engine-side generation (pie.runtime.work.Generation)."""
        if self.is_done:
            return []
        ctx, inner = self._ctx, self._ctx._inner
        ctx._check_open()
        ctx._drain_chat()
        left = _UNBOUNDED if self._max_tokens is None else self._max_tokens - self._generated
        # pie's generation takes the buffer as the context's pending tokens
        buffered = ctx._take_buffer()
        start = inner.next_position
        inner._pending, inner._pending_pos = buffered, list(range(start, start + len(buffered)))
        base_seed = self._sampler.seed
        sampler = self._sampler._pie
        if base_seed is not None and self._steps:
            sampler = sampler.with_seed(step_seed(base_seed, self._steps))  # fresh noise, still reproducible
        gen = _PieGeneration(inner, sampler, left, self._stop, ignore_eos=True)
        chat = inner._chat
        cued, chat.cued = chat.cued, False  # this context records the reply itself (Context._record_reply)
        try:
            tokens = await gen.collect_tokens()
        finally:
            chat.cued = cued
            if gen.finish_reason == "stop":  # the stop token leaves the context (Pie's rule)
                if inner._pending:
                    inner._pending.pop()
                    inner._pending_pos.pop()
                else:
                    inner.truncate(1)
            # what pie left buffered goes back to this context's buffer
            ctx._buffer[:0] = inner._pending
            inner._pending, inner._pending_pos = [], []
            inner.next_position = inner._seq.positions[-1] + 1 if inner._seq.positions else 0
        self._steps += len(tokens) + (gen.finish_reason == "stop")
        self._done = True
        return self._accept(list(tokens))


class GenStep:
    """One step of a Generator: tweak (probe, clear_sampler), then `await execute()`."""

    __slots__ = ("_gen", "_pending", "_extra", "_cleared", "_done")

    def __init__(self, gen: Generator, pending: list[int]) -> None:
        self._gen = gen
        self._pending = pending
        self._extra: list[tuple[int, Any]] = []
        self._cleared = False
        self._done = False

    def clear_sampler(self) -> GenStep:
        """Sample nothing this step: read a probe, pick a token, gen.accept([token])."""
        self._cleared = True
        return self

    def probe(self, index: int, probe: Any) -> ProbeHandle:
        """A probe at `index` (into this step's inputs) for this step only."""
        slot = 1 + len(self._gen._step_probes) + len(self._extra)
        self._extra.append((int(index), probe))
        return ProbeHandle(slot=slot, kind=probe_kind(probe))

    async def execute(self) -> Output:
        if self._done:
            raise RuntimeError("this step was already executed; take the next one from the generator")
        self._done = True
        gen, ctx = self._gen, self._gen._ctx
        if not self._pending and self._cleared and not self._extra and not gen._step_probes:
            gen._done = True
            return Output([])
        if not self._pending:  # after flush(): run the last KV token again for its output row
            ctx._unrun_last()
            self._pending = [ctx._buffer.pop(0)]
        fwd = Forward(ctx, drain_buffer=False)
        fwd.input(self._pending)
        h = None
        if self._cleared:
            fwd._reserve_slot()
        else:
            h = fwd.sample([len(self._pending) - 1], gen._sampler)
            fwd._slots[-1].seed = gen._step_seed()
        for idx, probe in [*gen._step_probes, *self._extra]:
            fwd.probe(idx, probe)
        if gen._mask is not None:
            fwd._mask = gen._mask
        try:
            out = await fwd.execute()
        except BaseException:
            ctx._buffer[:0] = self._pending
            raise
        gen._steps += 1
        tokens = [] if h is None else gen._accept([out.token(h)])
        ctx._buffer += tokens[-1:]
        out.tokens, out.auto_sampler = tokens, h
        return out
