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

Constraints (constrain=, collect_json): each step's logit mask comes from the constraints, fed the tokens
accepted since the last step. A grammar's mask is computed in a worker thread while the device runs the
step (llguidance drops the GIL), and applied to the row's logits when they are back (forward.py); the
stop tokens are allowed only where every grammar accepts, and a grammar that cannot go on ends the
generation. Speculation (speculator=, or the system n-gram drafter for argmax): see spec.py; a step then
verifies its drafts in the same pass, and the rejected ones are truncated out of the KV.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from pie.errors import PieError
from pie.sdk.generation import Generation as _PieGeneration
from pie.sdk.sampler import step_seed

from . import brle
from . import chat as _chat
from . import grammar as _grammar
from ._errors import unsupported
from .forward import Forward, Output, ProbeHandle
from .sample import Sampler, probe_kind
from .spec import NgramSpeculator, SpeculationStats

if TYPE_CHECKING:
    from .context import Context

_UNBOUNDED = 1 << 40  # max_tokens None: until a stop token or the model's window
# with system speculation and no draft, this many tokens run engine-side before the drafter looks again;
# doubling (up to the max) while it finds none
_SPEC_CHUNK = 4
_SPEC_CHUNK_MAX = 32


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
        "_constraints",
        "_constraint_pending",
        "_constraint_fed",
        "_speculator",
        "_use_system_spec",
        "_drafter",
        "_stats",
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
        if system_speculation and speculator is not None:
            raise ValueError("speculator= and system_speculation=True are mutually exclusive; pass one")
        if speculator is not None:
            missing = [
                m for m in ("draft", "accept", "rollback") if not callable(getattr(speculator, m, None))
            ]
            if missing:
                raise TypeError(
                    f"speculator= needs draft(), accept() and rollback(); {speculator!r} lacks {missing}"
                )
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
        self._steps = 0  # tokens sampled so far (seeds: one per output position)
        self._done = False
        self._constraints: list[Any] = []
        self._constraint_pending: list[int] = []  # accepted since the constraints last saw tokens
        self._constraint_fed: list[int] = []  # what the grammars got at this step (user constraints: too)
        items = constrain if isinstance(constrain, list | tuple) else [] if constrain is None else [constrain]
        for c in items:
            self._constraints.append(_grammar.build(c, ctx.model))
        self._speculator = speculator
        self._use_system_spec = (
            bool(system_speculation)
            if system_speculation is not None
            else speculator is None and sampler.is_argmax and ctx.model.default_system_speculation()
        )
        self._drafter: NgramSpeculator | None = None  # the system drafter, built at the first step
        self._stats = SpeculationStats()

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
        """No system (n-gram) drafting for this generator."""
        self._use_system_spec = False
        return self

    def speculator(self, s) -> Generator:
        """Draft with a custom Speculator (replaces system speculation)."""
        self._speculator, self._use_system_spec = s, False
        return self

    def horizon(self, n: int) -> Generator:
        return self  # a scheduling hint for Pie's bidding scheduler; pie's scheduler takes none

    def rebid_each_step(self, enabled: bool) -> Generator:
        return self  # as horizon()

    def constrain(self, c) -> Generator:
        """Add a constraint (a Schema or a Constraint); several compose by AND-ing their masks."""
        self._constraints.append(_grammar.build(c, self._ctx.model))
        return self

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
    def speculation_stats(self) -> SpeculationStats:
        """Drafts proposed and accepted so far (acceptance_rate, tokens_per_pass); pie's extension."""
        return self._stats

    @property
    def is_done(self) -> bool:
        return self._done or (self._max_tokens is not None and self._generated >= self._max_tokens)

    # ---- step by step ---------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[GenStep]:
        return self

    async def __anext__(self) -> GenStep:
        if self.is_done:
            raise StopAsyncIteration
        ctx = self._ctx
        ctx._drain_chat()
        if self._use_system_spec and self._drafter is None and self._speculator is None:
            self._drafter = NgramSpeculator(ctx._inner._seq.tokens + ctx._buffer)
        if self._constraints and self._feed_constraints():
            self._done = True  # every grammar is complete and there is no stop token to end on
            raise StopAsyncIteration
        pending = ctx._take_buffer()
        return GenStep(self, pending, self._draft(len(pending)))

    # ---- speculation ----------------------------------------------------------------------------
    def _draft(self, num_pending: int) -> list[int]:
        """Drafts for the next step (none when constrained: masks are per step, not per draft)."""
        spec = self._speculator or (self._drafter if self._use_system_spec else None)
        if spec is None or self._constraints:
            return []
        drafts = [int(t) for t in spec.draft()[0]]
        # no draft past max_tokens (the pass's own sample is one token) or past the model's window
        room = self._ctx._inner._rt.scheduler.max_position - self._ctx._inner.next_position - num_pending
        if self._max_tokens is not None:
            room = min(room, self._max_tokens - self._generated - 1)
        return drafts[: max(0, room)]

    # ---- constraints ----------------------------------------------------------------------------
    def _feed_constraints(self) -> bool:
        """Give the grammars the tokens accepted since the last step; True when they are all complete
        and no stop token can end the output (then the generation is over)."""
        accepted, self._constraint_pending = self._constraint_pending, []
        grammars = [c for c in self._constraints if isinstance(c, _grammar.GrammarConstraint)]
        for c in grammars:
            c.matcher.accept_tokens(accepted)
        self._constraint_fed = accepted
        return bool(grammars) and not self._stop and all(c.matcher.is_terminated for c in grammars)

    def _mask_job(self) -> asyncio.Future:
        """The step's [V] bool logit mask, computed in a worker thread (it overlaps the device pass)."""
        accepted = self._constraint_fed
        vocab = self._ctx.model.vocab_size
        base = np.ones(vocab, dtype=bool) if self._mask is None else self._mask.copy()
        grammars = []
        for c in self._constraints:  # user constraints run here, on the inferlet's thread
            if isinstance(c, _grammar.GrammarConstraint):
                grammars.append(c)
            elif runs := c.step(list(accepted)):
                base &= brle.decode(runs, vocab, f"{type(c).__name__}.step mask")
        stop = np.asarray(self._stop, dtype=np.int64)
        eos = _grammar._stop_ids(self._ctx.model._pie.tokenizer) if grammars else []

        def compute() -> np.ndarray:
            mask = base
            user_stop = base[stop] if stop.size else None  # what the static / user masks say of them
            accepting = True
            for c in grammars:
                allowed = c.matcher.allowed()  # a Matcher built over the tokenizer alone may be shorter
                mask[: allowed.size] &= allowed[: mask.size]
                mask[allowed.size :] = False
                accepting = accepting and c.matcher.is_accepting
            if grammars:
                mask[eos] = False  # llguidance's eos ids: the generator's stop tokens decide
                if stop.size:
                    mask[stop] = user_stop & accepting  # they end the output where every grammar accepts
            if not mask.any():
                raise PieError(
                    "the constraints allow no next token (their masks do not intersect, or a grammar is "
                    "complete with no stop token allowed); check the grammars and stop tokens"
                )
            return mask

        return asyncio.get_running_loop().run_in_executor(None, compute)

    def accept(self, tokens: list[int]) -> list[int]:
        """Register tokens the inferlet sampled itself (after step.clear_sampler()): stop and max_tokens
        apply, and the accepted ones are run with the next step."""
        accepted = self._accept(list(tokens))
        self._ctx._buffer += accepted
        if self._speculator is not None:
            self._speculator.accept(accepted)
        elif self._drafter is not None:
            self._drafter.accept(accepted)
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
            if self._constraints:
                self._constraint_pending += tokens
        return tokens

    def _step_seed(self, offset: int = 0) -> int | None:
        seed = self._sampler.seed
        return None if seed is None else step_seed(seed, self._steps + offset)

    @property
    def _only_system_spec(self) -> bool:
        """Nothing but the system drafter needs steps: draft where it can, engine-side elsewhere."""
        return (
            self._use_system_spec
            and self._speculator is None
            and not (self._step_probes or self._mask is not None or self._constraints)
        )

    async def _collect_system_spec(self) -> list[int]:
        """A verification step whenever the n-gram drafter has a draft; otherwise a short engine-side
        chunk (the scheduler chains its steps without waking the inferlet), then look again."""
        out: list[int] = []
        chunk = _SPEC_CHUNK
        while not self.is_done:
            step = await self.__anext__()
            if step._drafts:
                out += (await step.execute()).tokens
                chunk = _SPEC_CHUNK
                continue
            self._ctx._buffer[:0] = step._pending  # back to the buffer: the chunk runs it
            tokens = await self._engine_side(limit=chunk)
            # text that does not repeat itself rarely starts to: look less often (chunks pipeline better)
            chunk = min(2 * chunk, _SPEC_CHUNK_MAX)
            if self._drafter is not None:
                self._drafter.accept(tokens)
            out += tokens
        return out

    @property
    def _step_by_step(self) -> bool:
        """Whether collecting must run step by step (the engine-side generation has no per-step hooks)."""
        return bool(
            self._step_probes
            or self._mask is not None
            or self._constraints
            or self._speculator is not None
            or self._use_system_spec
        )

    # ---- collecting -----------------------------------------------------------------------------
    async def collect_tokens(self) -> list[int]:
        """Run to the end; every accepted token."""
        if self._only_system_spec:
            return await self._collect_system_spec()
        if self._step_by_step:
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
        """Generate JSON (conforming to `schema`, a JSON Schema string, or any JSON without one) and
        return it parsed: json.loads(text), or parse(text) when `parse` is given."""
        self.constrain(_grammar.JsonSchema(schema) if schema is not None else _grammar.AnyJson())
        text = await self.collect_text()
        if parse is not None:
            return parse(text)
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise PieError(
                f"collect_json: the output is not complete JSON ({e}); it stopped after "
                f"{self._generated} tokens: raise max_tokens (the grammar guarantees valid JSON only "
                f"when the generation ends on its own). Output: {text[:200]!r}"
            ) from None

    async def _engine_side(self, limit: int | None = None) -> list[int]:
        """The rest of the generation (or its next `limit` tokens) as one engine-side generation
        (pie.runtime.work.Generation)."""
        if self.is_done:
            return []
        ctx, inner = self._ctx, self._ctx._inner
        ctx._check_open()
        ctx._drain_chat()
        left = _UNBOUNDED if self._max_tokens is None else self._max_tokens - self._generated
        if limit is not None:
            left = min(left, limit)
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
        # a chunk ends the generation on a stop token or at the model's window (fewer tokens than asked)
        self._done = limit is None or gen.finish_reason == "stop" or len(tokens) < left
        return self._accept(list(tokens))


class GenStep:
    """One step of a Generator: tweak (probe, clear_sampler), then `await execute()`."""

    __slots__ = ("_gen", "_pending", "_drafts", "_extra", "_cleared", "_done")

    def __init__(self, gen: Generator, pending: list[int], drafts: list[int] | None = None) -> None:
        self._gen = gen
        self._pending = pending
        self._drafts = list(drafts or [])  # speculative tokens verified in this step's pass
        self._extra: list[tuple[int, Any]] = []
        self._cleared = False
        self._done = False

    def clear_sampler(self) -> GenStep:
        """Sample nothing this step: read a probe, pick a token, gen.accept([token])."""
        self._cleared = True
        self._drafts = []  # nothing verifies drafts without the sampler
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
        drafts, last = self._drafts, len(self._pending) - 1
        fwd = Forward(ctx, drain_buffer=False)
        fwd.input(self._pending + drafts)
        # slots: the sampler (slot 0), the probes (handles already given out), then one sample per draft
        h = hd = None
        if self._cleared:
            fwd._reserve_slot()
        else:
            h = fwd.sample([last], gen._sampler)
            fwd._slots[-1].seed = gen._step_seed()
        for idx, probe in [*gen._step_probes, *self._extra]:
            fwd.probe(idx, probe)
        if drafts:
            hd = fwd.sample(list(range(last + 1, last + 1 + len(drafts))), gen._sampler)
            for i, slot in enumerate(fwd._slots[-len(drafts) :]):
                slot.seed = gen._step_seed(i + 1)  # the seed plain decoding gives that output position
        if gen._constraints:
            fwd._mask_job = gen._mask_job()
        elif gen._mask is not None:
            fwd._mask = gen._mask
        try:
            out = await fwd.execute()
        except BaseException:
            ctx._buffer[:0] = self._pending
            raise
        if h is None:
            gen._steps += 1
            out.tokens, out.auto_sampler = [], None
            return out
        sampled = [out.token(h), *(out.tokens_at(hd) if hd is not None else [])]
        # keep drafts while the model's own sample at the previous position agrees; then its next token
        got = sampled[:1]
        for i, d in enumerate(drafts):
            if d != sampled[i]:
                break
            got.append(sampled[i + 1])
        matched = len(got) - 1
        gen._steps += len(got)
        tokens = gen._accept(list(got))
        # the KV holds every draft; keep those that are output tokens, drop the rest
        in_kv = min(len(tokens), matched)
        if len(drafts) - in_kv:
            ctx._inner.truncate(len(drafts) - in_kv)
        if len(tokens) > matched:
            ctx._buffer.append(tokens[-1])  # the model's next token runs with the next step
        if drafts:
            st = gen._stats
            st.passes, st.drafted, st.accepted = (
                st.passes + 1,
                st.drafted + len(drafts),
                st.accepted + matched,
            )
        if gen._speculator is not None:  # Pie's order: accept what the verifier produced, then rollback
            gen._speculator.accept(list(got))
            if len(drafts) - matched:
                gen._speculator.rollback(len(drafts) - matched)
        elif gen._drafter is not None:
            gen._drafter.accept(tokens)
        out.tokens, out.auto_sampler = tokens, h
        return out
