"""Continuous batching for one driver: decode first, prefill in the leftover budget, memory on demand.

Each step:
  1. Decodes first: every work with at most DECODE_TOKENS slots left to compute (generation steps,
     one-token passes, speculative verifications), least recently run first, within max_batch_size.
     While prefills wait, decodes leave them at least one batch row and PREFILL_RESERVE tokens, so
     neither kind starves the other.
  2. Prefills fill the leftover token budget in arrival order, chunked (chunked prefill).
  3. Pages are allocated here, when a chunk is scheduled. When they run out, evictable prefix-cache
     pages go first, then a victim sequence is preempted (see _victim for the policy). A pass that has
     not started yet does not preempt work in progress: it waits (admission control). Only a context
     that alone needs more pages than the whole cache fails, with a message naming the numbers.
  4. Each chunk pins the pages it reads and writes until its batch ends; page movements the step needs
     (copies, swaps) are sent to the driver just before the batch, in order.

Hybrid models (recurrent layers): a sequence needs a recurrent-state slot to run; when none is free, an
idle sequence's slot is taken (it is dropped, to be recomputed), chosen like a preemption victim; a
sequence whose state fell out of step with its KV (a failed or cancelled pass) is recomputed from token 0.

Generations (work.Generation) step inside this loop: their sampled token is fed back on the device, so
while a batch of only generation steps runs, the next one is built and queued behind it (two batches
in flight); the inferlet is woken only when it wants tokens. A batch whose driver call raises fails
exactly the works in it; the loop goes on with the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from pie.drivers.base import Driver
from pie.drivers.protocol import BatchError, Capabilities, ForwardBatch, ForwardResult, PageOps, PageOpsResult
from pie.errors import DriverError, PieError
from pie.runtime.batching import _RECORD, Chunk, FedSteps, build_batch, check_result, split_result
from pie.runtime.kvcache import KVCache
from pie.runtime.pages import OutOfPagesError
from pie.runtime.sequence import DROPPED, RESIDENT, SWAPPED, Sequence
from pie.runtime.work import DECODE_TOKENS, Generation, Work, merge_parts, sampler_rows, step_seed

log = logging.getLogger(__name__)

_MEMORY_POLL_S = 0.01  # how often a scheduler with nothing to run but work waiting for memory looks again
PREFILL_RESERVE = 256  # tokens per step kept for waiting prefills while decodes fill the batch


@dataclass(eq=False)
class _Batch:
    number: int
    chunks: list[Chunk]
    batch: ForwardBatch
    task: asyncio.Task
    only_steps: bool  # every chunk is a generation step: the next batch may be queued behind it
    pinned: np.ndarray  # pages pinned by the batch
    fed: FedSteps  # its first rows: generation steps fed on the device


class Scheduler:
    def __init__(self, driver: Driver, caps: Capabilities, kv: KVCache, hint: str = "") -> None:
        self.driver = driver
        self.caps = caps
        self.kv = kv
        self.hint = hint
        self.max_position = int(caps.extra.get("max_position_embeddings") or (1 << 62))
        self.works: list[Work] = []  # active works, in arrival order
        self.seqs: dict[int, Sequence] = {}  # live sequences (victims are chosen among them)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._inflight: deque[_Batch] = deque()
        self._dead: BaseException | None = None
        self._arrivals = 0
        self.num_steps = 0
        self.pipelining = True
        self._fed = FedSteps()  # the fed steps of the batch being planned (see _plan)
        self.last_step_s = 0.0  # how long the driver took for the last batch (inferlet.scheduling.latency)
        # priority of the last context preempted for room and the step it happened in (scheduling.rent)
        self.last_victim_priority, self.last_victim_step = 0.0, -1

    # ---- public --------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pie-scheduler")

    async def stop(self) -> None:
        """Stop stepping; every queued or in-flight work fails with DriverError."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._dead = self._dead or DriverError("the engine has shut down")
        self._fail_all(DriverError("the engine shut down before this forward pass ran"))

    def check_alive(self) -> None:
        if self._dead is not None:
            raise DriverError(f"cannot run forward passes: {self._dead}")

    def add_sequence(self, seq: Sequence) -> Sequence:
        self.seqs[seq.id] = seq
        return seq

    def release(self, seq: Sequence) -> None:
        """Free a sequence; its queued work is dropped, a chunk in flight finishes first."""
        if seq.work is not None:
            self._fail(
                seq.work, DriverError("the context was released while this pass was queued or running")
            )
        self.seqs.pop(seq.id, None)
        self.kv.release(seq)
        self._wake.set()  # its pages may be what a waiting pass needs

    def suspend(self, seq: Sequence) -> int:
        """Preempt seq now at its owner's request (Pie's Context.suspend): its pages go to host swap
        slots, or are dropped to be recomputed, and come back before its next pass. Returns the pages it
        gave back (now free, or held only by the prefix cache, which lets them go on demand); pages shared
        with forks or snapshots stay."""
        if seq.work is not None or seq.inflight:
            raise PieError("cannot suspend a context while a pass runs on it; await the pass first")
        if seq.state != RESIDENT or not seq.pages:
            return 0
        free = self.kv.freeable(seq)
        swap = self.kv.num_swap_slots > 0 and free <= len(self.kv._free_slots)
        if seq.causal_len < seq.kv_len and not swap:
            raise PieError(
                "cannot suspend this context: its KV was computed under a custom attention mask, so it "
                "cannot be recomputed, and there are no free host swap slots to keep it"
            )
        self.kv.preempt(seq, swap=swap)
        self._wake.set()  # its pages may be what a waiting pass needs
        return free

    def submit(self, w: Work) -> asyncio.Future:
        """Queue a pass; the future resolves to its ForwardResult (outputs in the caller's order)."""
        self.check_alive()
        self._check_idle(w.seq)
        w.validate(
            self.caps.vocab_size, self.caps.max_dist_size, self.caps.max_batch_tokens, self.max_position
        )
        self._check_fits(w.seq.num_tokens + w.num_tokens)
        if self.kv.recurrent:
            self._check_recurrent(w)
        fut = asyncio.get_running_loop().create_future()
        w.enter(fut)
        fut.add_done_callback(lambda f, w=w: self._on_done(w, f))
        self._add(w)
        return fut

    def generate(self, g: Generation) -> None:
        """Start an engine-side generation; g.event is set as tokens arrive (see Generation.wake_at)."""
        self.check_alive()
        self._check_idle(g.seq)
        g.validate(
            self.caps.vocab_size, self.caps.max_dist_size, self.caps.max_batch_tokens, self.max_position
        )
        g.enter(None)
        if g.max_tokens == 0:
            g.finish_reason = "length"
            g.final_token = None
            g.seq.tokens, g.seq.positions = g.seq.tokens[: g.base], g.seq.positions[: g.base]
            g.notify()
            return
        self._add(g)

    def _add(self, w: Work) -> None:
        w.arrival = self._arrivals
        self._arrivals += 1
        w.seq.work = w
        self.works.append(w)
        self._wake.set()

    def _check_idle(self, seq: Sequence) -> None:
        if seq.closed:
            raise DriverError("this context was released")
        if seq.work is not None:
            raise BatchError("a pass or generation is already running on this context; await it first")

    def _check_recurrent(self, w: Work) -> None:
        """What a hybrid model's recurrent layers cannot honour, refused where the pass enters."""
        arch = self.caps.architecture
        if w.mask is not None:
            raise BatchError(
                f"{arch} has recurrent (Gated DeltaNet) layers, which see every earlier token in order: a "
                "custom attention mask cannot be honoured; run the pass without one"
            )
        seq, pos = w.seq, w.positions
        start = seq.positions[-1] + 1 if seq.positions else int(pos[0])
        if int(pos[0]) != start or (len(pos) > 1 and np.any(np.diff(pos) != 1)):
            raise BatchError(
                f"{arch} has recurrent layers, which see tokens in order whatever their positions: positions "
                f"must be consecutive, continuing the context (expected {start}, {start + 1}, ...; got "
                f"{', '.join(map(str, pos[:4].tolist()))}{', ...' if len(pos) > 4 else ''})"
            )

    def _check_fits(self, num_tokens: int) -> None:
        need = -(-num_tokens // self.kv.ps)
        if self.kv.window is not None:  # resident at once: the window plus one chunk, beside the hole page
            need = min(need, -(-(self.kv.window + self.caps.max_batch_tokens) // self.kv.ps) + 2)
        if need > self.kv.alloc.num_pages:
            raise OutOfPagesError(
                f"this context needs {need} KV pages for {num_tokens} tokens, more than the whole cache "
                f"({self.kv.alloc.num_pages} pages of {self.kv.ps} tokens); {self.hint}"
            )

    @property
    def num_queued(self) -> int:
        return len(self.works)

    # ---- the loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                while self.works and self._may_launch():
                    chunks = self._plan()
                    if not chunks and not self._fed.gens:
                        break
                    self._launch(chunks)
                if not self._inflight:
                    self._wake.clear()
                    if self._plannable():  # waiting for memory: a release wakes us (others free it
                        # too, e.g. a truncate or a deleted snapshot), so also look again shortly
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), _MEMORY_POLL_S)
                    else:
                        await self._wake.wait()
                    continue
                head = self._inflight[0]
                await asyncio.wait([head.task])
                self._inflight.popleft()
                self._finish(head)
                await asyncio.sleep(0)  # let woken inferlets queue their next passes
        except asyncio.CancelledError:
            for b in self._inflight:  # let the driver finish them before anyone shuts the driver down
                await asyncio.gather(b.task, return_exceptions=True)
            raise
        except BaseException as e:  # a bug here must not leave inferlets waiting forever
            log.exception("scheduler loop crashed")
            self._dead = e
            self._fail_all(DriverError(f"scheduler crashed: {type(e).__name__}: {e}"))
            raise

    def _may_launch(self) -> bool:
        if not self._inflight:
            return True
        return self.pipelining and len(self._inflight) == 1 and self._inflight[0].only_steps

    def _plannable(self) -> bool:
        return any(self._wants(w) for w in self.works)

    def _wants(self, w: Work) -> bool:
        if w.failed:
            return False
        if w.is_generation:
            g: Generation = w  # type: ignore[assignment]
            if g.steps == 0:
                return w.seq.kv_len < w.seq.num_tokens
            if not g.wants_step():
                return False
            # its previous step must have returned, or be the batch in flight (fed back on the device)
            return g.done_steps == g.steps or (
                g.done_steps == g.steps - 1
                and bool(self._inflight)
                and self._inflight[-1].number == g.last_batch
            )
        return w.seq.kv_len < w.seq.num_tokens

    # ---- planning ------------------------------------------------------------------------
    def _plan(self) -> list[Chunk]:
        budget, rows = self.caps.max_batch_tokens, self.caps.max_batch_size
        ps = self.kv.ps
        last = self._inflight[-1].number if self._inflight else -2
        steps: list[Generation] = []  # generation steps fed from the batch in flight (the hot path)
        decodes: list[Work] = []
        prefills: list[Work] = []
        for w in self.works:
            if w.failed:
                continue
            seq = w.seq
            if w.is_generation and w.steps:  # type: ignore[attr-defined]
                g: Generation = w  # type: ignore[assignment]
                if g.finish_reason is not None or g.error is not None or g.steps >= g.max_tokens:
                    continue
                ahead = g.steps - g.done_steps
                if ahead == 1:
                    if g.last_batch == last and seq.kv_len == len(seq.tokens) and seq.state == RESIDENT:
                        steps.append(g)
                    continue
            left = len(seq.tokens) - seq.kv_len
            if left > 0:
                (decodes if left <= DECODE_TOKENS else prefills).append(w)
        chunks: list[Chunk] = []
        in_plan: set[int] = set()
        dec_budget, dec_rows = budget, rows
        if prefills:
            dec_budget = budget - min(PREFILL_RESERVE, budget // 2)
            dec_rows = max(1, rows - 1)
        if len(steps) + len(decodes) > dec_rows:  # rows run out: least recently run first
            steps.sort(key=lambda w: w.seq.last_step)
            decodes.sort(key=lambda w: w.seq.last_step)
        max_pos = self.max_position
        number = self.num_steps  # the batch this plan becomes
        fed = self._fed = FedSteps()
        f_gens, f_his, f_pos, f_pages, f_feeds, f_recs = (
            fed.gens,
            fed.his,
            fed.positions,
            fed.pages,
            fed.feeds,
            fed.records,
        )
        for g in steps:
            if len(f_gens) >= dec_rows or dec_budget <= 0:
                break
            seq = g.seq
            nt = len(seq.tokens)
            pos = seq.positions[-1] + 1
            if pos >= max_pos:
                continue  # ends with "length" when its last step returns
            # a new page when the last is full; no copy-on-write check: the page a fed step writes was
            # written by its previous step, and nothing shares a generating context's partial page
            pages = seq.pages
            if nt >= len(pages) * ps:
                if not self._reserve(seq, nt + 1, in_plan, True):
                    continue
                pages = seq.pages
            seq.tokens.append(-1)  # filled on the device from the batch in flight, here when it returns
            seq.positions.append(pos)
            if g.seed is None:
                rec = g.record
                if rec is None:
                    rec = g.record = g.samplers.view(_RECORD)
            else:
                samp = g.samplers.copy()
                samp["seed"] = step_seed(g.seed, g.steps)
                rec = samp.view(_RECORD)
            g.steps += 1
            if seq.causal_len >= nt:
                seq.causal_len = nt + 1
            seq.kv_len = seq.state_len = nt + 1
            in_plan.add(seq.id)
            # launch bookkeeping here (rows 0..n-1 of the batch are these steps, in this order)
            seq.inflight += 1
            seq.last_step = number
            g.inflight += 1
            f_feeds.append(g.last_row)
            g.last_batch = number
            g.last_row = len(f_gens)
            f_gens.append(g)
            f_his.append(nt + 1)
            f_pos.append(pos)
            f_pages += pages[: nt // ps + 1]
            f_recs.append(rec)
            if g.return_logprobs:
                fed.return_logprobs = True
            budget -= 1
            dec_budget -= 1
        for w in decodes:
            if len(chunks) + len(f_gens) >= dec_rows or budget <= 0:
                break
            c = self._chunk(w, min(budget, dec_budget), in_plan, may_preempt=True)
            if c is not None:
                chunks.append(c)
                budget -= c.hi - c.lo
                dec_budget -= c.hi - c.lo
        for w in prefills:
            if len(chunks) + len(f_gens) >= rows or budget <= 0:
                break
            # a prefill under way may take pages from others; a new one, or one resuming from scratch
            # after a preemption, waits for free memory (admission control, no thrashing)
            c = self._chunk(w, budget, in_plan, may_preempt=w.started and w.seq.kv_len > 0)
            if c is None:
                if not w.started:
                    break  # admission is FIFO: a later prompt does not overtake one waiting for memory
                continue
            chunks.append(c)
            budget -= c.hi - c.lo
        return chunks

    def _chunk(self, w: Work, budget: int, in_plan: set[int], may_preempt: bool) -> Chunk | None:
        """Schedule the next chunk of w within `budget` tokens, allocating its pages; None if it must wait."""
        if budget <= 0:
            return None
        seq = w.seq
        g: Generation | None = w if w.is_generation else None  # type: ignore[assignment]
        if self.kv.recurrent and not self._state_slot(seq, in_plan, may_preempt):
            return None
        if seq.state == SWAPPED:
            need = self.kv.resume_cost(seq)
            if not self._make_room(need, seq, in_plan, may_preempt) or not self.kv.ensure_resident(seq):
                return None
        if seq.state == DROPPED:
            seq.state = RESIDENT
        if seq.kv_len % self.kv.ps == 0:
            # prefix cache: never past the first output row or the pass's own masked rows, and
            # at least one token is left to compute
            limit = seq.num_tokens - 1 - seq.kv_len
            if w.mask is not None:
                limit = min(limit, w.base - seq.kv_len)
            if g is None and w.out_slots is not None and w.out_slots.shape[0]:
                limit = min(limit, int(w.out_slots[0]) - seq.kv_len)
            if limit >= self.kv.ps:
                self.kv.match_prefix(seq, limit)
        lo = seq.kv_len
        n = seq.num_tokens - lo
        if n <= 0:
            return None
        if n > budget:
            if not w.chunkable:
                return None
            n = budget
        hi = lo + n
        if lo % self.kv.ps and lo // self.kv.ps < len(seq.pages):
            if self.kv.alloc.is_shared(seq.pages[lo // self.kv.ps]) and not self._cow(
                seq, lo, in_plan, may_preempt
            ):
                return None
        if not self._reserve(seq, hi, in_plan, may_preempt):
            return None
        # outputs in [lo, hi)
        if g is not None:
            if hi == seq.num_tokens:
                out = None  # a step: its one output is slot hi - 1
                samp = g.samplers
                if g.seed is not None:
                    samp = samp.copy()
                    samp["seed"] = step_seed(g.seed, g.steps)
                g.steps += 1
            else:
                out, samp = _EMPTY_OUT, _EMPTY_SAMP
        else:
            a, b = np.searchsorted(w.out_slots, [lo, hi]).tolist()
            out, samp = w.out_slots[a:b], w.sorted_samplers[a:b]
        if seq.causal_len >= lo and (w.mask is None or hi <= w.base):
            seq.causal_len = max(seq.causal_len, hi)
        seq.kv_len = seq.state_len = hi
        w.started = True
        in_plan.add(seq.id)
        return Chunk(w, lo, hi, out, samp, -1, out is None)

    def _state_slot(self, seq: Sequence, in_plan: set[int], may_preempt: bool) -> bool:
        """Hybrid models: seq holds a state slot matching its KV (recomputed from token 0 when its state
        fell out of step); False when no slot can be had now."""
        kv = self.kv
        if seq.kv_len and not kv.has_state(seq):  # a failed or cancelled pass moved the state or the KV
            if seq.inflight:
                return False
            kv.drop(seq)
            kv.stats.preemptions -= 1  # a recompute, not a preemption
            seq.state = RESIDENT
        while not kv.take_state_slot(seq):
            victim = self._state_victim(seq, in_plan, only_idle=not may_preempt)
            if victim is None:
                return False
            kv.drop(victim)  # its slot (and pages) go; its next pass recomputes it
        return True

    def _state_victim(self, seq: Sequence, in_plan: set[int], only_idle: bool) -> Sequence | None:
        """A sequence holding a state slot that may give it up: idle first, then the lowest priority,
        then the most recently started work (as _victim)."""
        best, best_key = None, None
        for s in self.seqs.values():
            if s is seq or s.state_slot < 0 or s.id in in_plan or s.inflight or s.closed:
                continue
            if only_idle and s.work is not None:
                continue
            key = (s.work is None, -s.priority, s.work.arrival if s.work is not None else -1)
            if best_key is None or key > best_key:
                best, best_key = s, key
        return best

    def _cow(self, seq: Sequence, slot: int, in_plan: set[int], may_preempt: bool) -> bool:
        """Copy-on-write: slot's page is shared (a fork's, a snapshot's, the prefix cache's); give seq its
        own copy before writing there. False when no page can be had now."""
        if not self._make_room(1, seq, in_plan, may_preempt):
            return False
        self.kv.cow(seq, slot // self.kv.ps)
        return True

    def _reserve(self, seq: Sequence, kv_end: int, in_plan: set[int], may_preempt: bool) -> bool:
        need = self.kv.pages_needed(seq, kv_end)
        if need == 0:
            return True
        try:
            self._check_fits(kv_end)
        except OutOfPagesError as e:  # this context alone outgrew the whole cache: it fails, nothing else
            if seq.work is not None:
                self._fail(seq.work, e)
            return False
        if not self._make_room(need, seq, in_plan, may_preempt):
            return False
        return self.kv.grow(seq, kv_end)

    def _make_room(self, need: int, seq: Sequence, in_plan: set[int], may_preempt: bool) -> bool:
        while self.kv.alloc.num_free < need:
            if self.kv.evict(need - self.kv.alloc.num_free):
                continue
            victim = self._victim(seq, in_plan, only_idle=not may_preempt)
            if victim is not None:
                self.last_victim_priority, self.last_victim_step = victim.priority, self.num_steps
                self.kv.preempt(victim, swap=self.kv.num_swap_slots > 0)
                continue
            # nobody frees a page alone: pages shared by several idle contexts (forks, a swapped-out
            # fork's partner) go once every holder lets go, so drop idle holders to recompute later
            holder = self._idle_holder(seq, in_plan)
            if holder is None:
                return False
            self.kv.drop(holder)
        return True

    def _idle_holder(self, seq: Sequence, in_plan: set[int]) -> Sequence | None:
        """The most recently created idle context that still holds device pages and can be recomputed."""
        for s in sorted(self.seqs.values(), key=lambda s: -s.id):
            if s is seq or s.id in in_plan or s.work is not None or s.inflight or s.closed:
                continue
            if s.causal_len < s.kv_len or not any(p >= 0 for p in s.pages):
                continue
            return s
        return None

    def _victim(self, seq: Sequence, in_plan: set[int], only_idle: bool) -> Sequence | None:
        """Victim policy: among resident sequences with no batch in flight, not in this step and not the
        one asking, that preempting would free pages (and that can be restored exactly: swapped, or
        recomputed when their whole history was causal): idle contexts (no pass waiting, e.g. an agent
        waiting on a tool) first, then the lowest priority (scheduling hints), then the most recently
        started work (LIFO, as vLLM does). A pass that has not started may only take idle contexts' pages, and
        work never takes the pages of work with a higher priority (it waits)."""
        best, best_key = None, None
        swap_ok = self.kv.num_swap_slots > 0
        for s in self.seqs.values():
            if s is seq or s.id in in_plan or s.inflight or s.state != RESIDENT or s.closed:
                continue
            if only_idle and s.work is not None:
                continue
            if s.work is not None and seq.work is not None and s.priority > seq.priority:
                continue  # a lower bid waits rather than take a higher bid's pages (it is the victim later)
            free = self.kv.freeable(s)
            if not free:
                continue
            if s.causal_len < s.kv_len and not (swap_ok and free <= len(self.kv._free_slots)):
                continue  # history computed under a custom mask cannot be recomputed exactly
            arrival = s.work.arrival if s.work is not None else -1
            key = (s.work is None, -s.priority, arrival)
            if best_key is None or key > best_key:
                best, best_key = s, key
        return best

    # ---- launching and finishing -------------------------------------------------------------
    def _launch(self, chunks: list[Chunk]) -> None:
        """Send the planned batch: the fed steps _plan gathered (rows first), then `chunks`."""
        number = self.num_steps
        self.num_steps += 1
        fed, self._fed = self._fed, FedSteps()
        row = len(fed.gens)
        decoded = row
        for c in chunks:
            w = c.work
            seq = w.seq
            seq.inflight += 1
            seq.last_step = number
            w.inflight += 1
            if c.is_step:
                w.last_batch, w.last_row = number, row  # type: ignore[attr-defined]
                row += 1
                decoded += c.hi - c.lo == 1
            else:
                row += c.out_slots.shape[0]
        batch = build_batch(chunks, self.kv.ps, fed, recurrent=self.kv.recurrent)
        # every page a chunk reads or writes stays pinned until the batch ends
        pinned = batch.kv_page_indices
        self.kv.alloc.pin(pinned)
        self.kv.stats.tokens_decoded += decoded
        self.kv.stats.tokens_prefilled += batch.num_tokens - decoded
        loop = asyncio.get_running_loop()
        for ops in self.kv.take_ops():
            loop.create_task(self._page_ops(ops), name="pie-page-ops")
        task = loop.create_task(self._forward(batch), name="pie-forward")
        only_steps = all(c.is_step for c in chunks)
        self._inflight.append(_Batch(number, chunks, batch, task, only_steps, pinned, fed))

    async def page_io(self, ops: PageOps) -> PageOpsResult:
        """Run page operations (e.g. reads for a snapshot file) in order with the batches."""
        self.check_alive()
        loop = asyncio.get_running_loop()
        for pre in self.kv.take_ops():  # copies queued before (a snapshot's partial page) go first
            loop.create_task(self._page_ops(pre), name="pie-page-ops")
        return await loop.create_task(self.driver.page_ops(ops), name="pie-page-io")

    async def _page_ops(self, ops) -> None:
        try:
            await self.driver.page_ops(ops)
        except Exception as e:  # the next batch fails too (its pages are wrong): stop cleanly
            log.error("page operations failed: %s", e)
            self._dead = DriverError(f"KV page operations failed: {e}")

    async def _forward(self, batch: ForwardBatch) -> ForwardResult:
        t0 = time.perf_counter()
        result = await self.driver.forward(batch)
        self.last_step_s = time.perf_counter() - t0
        return result

    def _finish(self, b: _Batch) -> None:
        try:
            result = b.task.result()
            problem = check_result(result, b.batch)
            if problem:
                raise DriverError(problem)
            if self._dead is not None:
                raise DriverError(str(self._dead))
        except (DriverError, BatchError) as e:
            err: Exception | None = _same_error(e)
        except Exception as e:
            err = DriverError(f"driver failed: {type(e).__name__}: {e}")
        else:
            err = None
        self.kv.alloc.unpin(b.pinned)
        fed = b.fed
        if err is not None:
            ends = [(g, h - 1) for g, h in zip(fed.gens, fed.his, strict=True)]
            ends += [(c.work, c.lo) for c in b.chunks]
            for w, _ in ends:
                w.seq.inflight -= 1
                w.inflight -= 1
            for w, lo in ends:
                self._fail(w, err, rollback_to=lo)
            for w, _ in ends:  # works whose last batch just ended
                if w.inflight == 0 and not w.retired:
                    self._retire(w)
            return
        tokens = result.tokens.tolist()
        logprobs = result.logprobs
        step_done = self._step_done
        ps, max_pos = self.kv.ps, self.max_position
        for row, (g, hi) in enumerate(zip(fed.gens, fed.his, strict=True)):
            seq = g.seq
            seq.inflight -= 1
            g.inflight -= 1
            if g.failed or seq.closed:
                if g.inflight == 0 and not g.retired:
                    self._retire(g)
                continue
            t = tokens[row]
            toks = seq.tokens
            # the common step, inline: the next step already holds a placeholder for this token, nothing
            # stops, no stop strings, no page filled, nobody to wake (everything else: _step_done)
            if (
                hi < len(toks)
                and logprobs is None
                and g.detok is None
                and g.finish_reason is None
                and g.error is None
                and t not in g.stop_ids
                and len(g.tokens) + 1 < g.max_tokens
                and len(g.tokens) + 1 < g.wake_at
                and hi < (len(seq.hashes) + 1) * ps
                and seq.positions[hi - 1] + 1 < max_pos
                and self.kv.window is None
            ):
                g.done_steps += 1
                toks[hi] = t
                g.tokens.append(t)
                continue
            step_done(g, hi, t, None if logprobs is None else float(logprobs[row]))
        row = len(fed.gens)
        parts = None
        for i, c in enumerate(b.chunks):
            w = c.work
            w.seq.inflight -= 1
            w.inflight -= 1
            if w.failed or w.seq.closed:
                if w.inflight == 0 and not w.retired:
                    self._retire(w)
                row += 1 if c.is_step else c.out_slots.shape[0]
                continue
            if c.is_step:
                step_done(w, c.hi, tokens[row], None if logprobs is None else float(logprobs[row]))
                row += 1
                continue
            row += c.out_slots.shape[0]
            if w.is_generation:  # an early chunk of a first step
                continue
            if parts is None:
                parts = split_result(result, b.batch, b.chunks, len(fed.gens))
            w.parts.append(parts[i])
            self.kv.register(w.seq, c.hi)
            if self.kv.window is not None:
                self.kv.release_outside_window(w.seq, c.hi)
            if c.hi == w.end and w.inflight == 0:
                self._complete(w)
                if not w.future.done():
                    w.future.set_result(merge_parts(w))

    def _retire(self, w: Work) -> None:
        """A work that failed or finished and has no batch in flight any more leaves the scheduler."""
        w.retired = True
        if w.seq.work is w:
            w.seq.work = None
        if w in self.works:
            self.works.remove(w)
        if w.is_generation:
            w.event.set()  # type: ignore[attr-defined]

    def cancel(self, g: Generation) -> None:
        """Stop a generation (its consumer went away); a step in flight finishes first."""
        self._fail(g, DriverError("the generation was cancelled"))

    async def wait_idle(self, g: Generation) -> None:
        """Until no batch holding a step of g is in flight (then its context may run passes again)."""
        while g.inflight and self._task is not None:
            g.event.clear()
            await g.event.wait()

    def _step_done(self, g: Generation, hi: int, t: int, logprob: float | None) -> None:
        seq = g.seq
        g.done_steps += 1
        nxt = hi  # slot the sampled token goes to
        has_slot = nxt < len(seq.tokens)  # the next step was queued with a placeholder there
        if has_slot:
            seq.tokens[nxt] = t
        if g.finish_reason is None and g.error is None:
            if t in g.stop_ids:
                g.finish_reason = "stop"
                g.stop_token = t
            else:
                g.tokens.append(t)
                if logprob is not None and g.want_logprobs:
                    g.logprobs.append(logprob)
                if g.detok is not None:
                    self._check_stop_strings(g, t)
                if g.finish_reason is None and (
                    len(g.tokens) >= g.max_tokens or seq.positions[nxt - 1] + 1 >= self.max_position
                ):
                    g.finish_reason = "length"
            if g.finish_reason is not None:
                if not has_slot:
                    g.final_token = t
            elif not has_slot:
                seq.tokens.append(t)
                seq.positions.append(seq.positions[-1] + 1)
        if nxt >= (len(seq.hashes) + 1) * self.kv.ps:  # a page filled up: into the prefix cache
            self.kv.register(seq, nxt)
        if self.kv.window is not None:
            self.kv.release_outside_window(seq, nxt)
        if g.finish_reason is not None:
            if g.inflight == 0:
                self._complete(g)
                self._retire(g)
            g.event.set()
        elif len(g.tokens) >= g.wake_at:
            g.event.set()

    def _check_stop_strings(self, g: Generation, t: int) -> None:
        start = max(0, len(g.text) - max(len(s) for s in g.stop_strings) + 1)
        g.text += g.detok.push([t])  # type: ignore[attr-defined]
        hits = [i for i in (g.text.find(s, start) for s in g.stop_strings) if i >= 0]
        if hits:
            g.text_cut = min(hits)
            g.finish_reason = "stop"

    def _complete(self, w: Work) -> None:
        seq = w.seq
        if seq.work is w:
            seq.work = None
        if w in self.works:
            self.works.remove(w)
        self.kv.register(seq, seq.kv_len)

    # ---- failure and cleanup ---------------------------------------------------------------
    def _on_done(self, w: Work, fut: asyncio.Future) -> None:
        if fut.cancelled():
            self._drop(w, None)

    def _drop(self, w: Work, err: Exception | None) -> None:
        if w.failed:
            return
        w.failed = True
        if w in self.works:
            self.works.remove(w)
        if w.seq.work is w and w.inflight == 0:
            w.seq.work = None
        if w.is_generation:
            g: Generation = w  # type: ignore[assignment]
            g.error = err or DriverError("the generation was cancelled")
            g.event.set()

    def _fail(self, w: Work, err: Exception, rollback_to: int | None = None) -> None:
        seq = w.seq
        if not w.failed:
            self._drop(w, err)
            if not seq.closed:
                # a pass (or a generation that sampled nothing yet) is undone; its tokens go back to the
                # context's buffer. A generation keeps the tokens it produced: they are still to compute.
                keep = w.base if not w.is_generation or w.done_steps == 0 else None  # type: ignore[attr-defined]
                if rollback_to is not None:
                    seq.kv_len = min(seq.kv_len, rollback_to)
                if keep is not None:
                    seq.kv_len = min(seq.kv_len, keep)
                    del seq.tokens[keep:], seq.positions[keep:]
                while seq.tokens and seq.tokens[-1] < 0:
                    seq.tokens.pop()
                    seq.positions.pop()
                seq.kv_len = min(seq.kv_len, seq.num_tokens)
                seq.causal_len = min(seq.causal_len, seq.kv_len)
                del seq.hashes[seq.kv_len // self.kv.ps :]
            if w.future is not None and not w.future.done():
                w.future.set_exception(err)
        if w.inflight == 0 and seq.work is w:
            seq.work = None

    def _fail_all(self, err: Exception) -> None:
        inflight = [c.work for b in self._inflight for c in b.chunks] + [
            g for b in self._inflight for g in b.fed.gens
        ]
        for w in list(self.works) + inflight:
            self._fail(w, err)
            w.inflight = 0
            if w.seq.work is w:
                w.seq.work = None
        self._inflight.clear()

    # ---- stats ---------------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.kv.stats
        a = self.kv.alloc
        return {
            "steps": self.num_steps,
            "tokens_prefilled": s.tokens_prefilled,
            "tokens_decoded": s.tokens_decoded,
            "prefix_tokens_reused": s.prefix_tokens_reused,
            "preemptions": s.preemptions,
            "preempted_recompute": s.preempted_recompute,
            "pages_swapped_out": s.pages_swapped_out,
            "pages_swapped_in": s.pages_swapped_in,
            "pages_copied": s.pages_copied,
            "pages_evicted": s.pages_evicted,
            "pages_released": s.pages_released,
            "pages_total": a.num_pages,
            "pages_used": a.num_used,
            "pages_free": a.num_free,
            "pages_cached": self.kv.num_cached,
            "snapshots": len(self.kv.snapshots),
            "queued": len(self.works),
        }


_EMPTY_OUT = np.zeros(0, np.int64)
_EMPTY_SAMP = sampler_rows(0)


def _same_error(e: Exception) -> Exception:
    """A fresh exception of e's type and message for each failed pass."""
    try:
        return type(e)(str(e))
    except Exception:
        return DriverError(str(e))
