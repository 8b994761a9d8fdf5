"""Continuous batching for one driver.

Each step takes a FIFO prefix of the queued passes of all live inferlets, within the
driver's max_batch_tokens and max_batch_size; a pass that does not fit is prefilled in chunks
(see batching.py). One batch is in flight per driver; while it runs, the loop builds the next
one from what is queued, and rebuilds it after the step only if it had room and more work came.

Pages are the contexts' business (they allocate before submitting). A context may free its pages
while its pass is still in flight: the driver runs batches in order, so a stale write to a freed
page lands before any batch of the page's next owner, which only reads slots it wrote itself.

A batch whose driver call raises fails exactly the passes in it (same error type and message);
the loop goes on with the rest of the queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from pie.drivers.base import Driver
from pie.drivers.protocol import BatchError, Capabilities, ForwardBatch, ForwardResult
from pie.errors import DriverError
from pie.runtime.batching import Chunk, build_batch, check_result, select, split_result
from pie.runtime.passes import PassRequest, merge_parts

log = logging.getLogger(__name__)


@dataclass
class _Plan:
    chunks: list[Chunk]
    batch: ForwardBatch
    version: int  # queue version it was selected from
    is_full: bool  # no more work could have joined it


class Scheduler:
    def __init__(self, driver: Driver, caps: Capabilities) -> None:
        self.driver = driver
        self.caps = caps
        self._queue: deque[PassRequest] = deque()
        self._version = 0  # bumped whenever the queue gains or loses work
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._inflight: list[Chunk] = []
        self._dead: BaseException | None = None
        self.num_steps = 0

    # ---- public --------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pie-scheduler")

    async def stop(self) -> None:
        """Stop stepping; every queued or in-flight pass fails with DriverError."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._fail_all(DriverError("the engine shut down before this forward pass ran"))
        self._dead = self._dead or DriverError("the engine has shut down")

    def submit(self, p: PassRequest) -> asyncio.Future:
        """Queue a pass; the future resolves to its ForwardResult (outputs in the caller's order)."""
        if self._dead is not None:
            raise DriverError(f"cannot run forward passes: {self._dead}")
        p.validate(
            self.caps.page_size, self.caps.vocab_size, self.caps.max_dist_size, self.caps.max_batch_tokens
        )
        fut = asyncio.get_running_loop().create_future()
        p.prepare(fut)
        fut.add_done_callback(lambda f, p=p: self._on_done(p, f))
        self._queue.append(p)
        self._version += 1
        self._wake.set()
        return fut

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    # ---- the loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        plan: _Plan | None = None
        inflight: asyncio.Task | None = None
        try:
            while True:
                if plan is None and self._has_work():
                    plan = self._plan()  # built while the previous step runs
                if inflight is not None:
                    await asyncio.wait([inflight])
                    self._finish(inflight)
                    inflight = None
                    await asyncio.sleep(0)  # let woken inferlets queue their next passes
                    if plan is not None and not plan.is_full and plan.version != self._version:
                        plan = None  # more work came (or some left): select again
                    if plan is None and self._has_work():
                        plan = self._plan()
                if plan is None:
                    self._wake.clear()
                    if not self._has_work():
                        await self._wake.wait()
                    continue
                if plan.version != self._version and any(c.p.dropped for c in plan.chunks):
                    plan = self._plan()  # a pass in it was cancelled or failed
                    if plan is None:
                        continue
                inflight = self._launch(plan)
                plan = None
        except asyncio.CancelledError:
            if inflight is not None:  # let the driver finish it before anyone shuts the driver down
                await asyncio.gather(inflight, return_exceptions=True)
            raise
        except BaseException as e:  # a bug here must not leave inferlets waiting forever
            log.exception("scheduler loop crashed")
            self._dead = e
            self._fail_all(DriverError(f"scheduler crashed: {type(e).__name__}: {e}"))
            raise

    def _has_work(self) -> bool:
        return bool(self._queue)

    def _plan(self) -> _Plan | None:
        chunks = select(self._queue, self.caps.max_batch_tokens, self.caps.max_batch_size)
        if not chunks:
            return None
        tokens = sum(c.count for c in chunks)
        full = tokens == self.caps.max_batch_tokens or len(chunks) == self.caps.max_batch_size
        return _Plan(chunks, build_batch(chunks, self.caps.page_size), self._version, full)

    def _launch(self, plan: _Plan) -> asyncio.Task:
        # commit: advance each pass; fully scheduled ones (a prefix of the queue) leave it
        for c in plan.chunks:
            c.p.scheduled = c.start + c.count
        while self._queue and self._queue[0].scheduled == self._queue[0].num_tokens:
            self._queue.popleft()
        self._inflight = plan.chunks
        self.num_steps += 1
        batch = plan.batch
        return asyncio.get_running_loop().create_task(self._forward(batch), name="pie-forward")

    async def _forward(self, batch: ForwardBatch) -> tuple[ForwardBatch, ForwardResult]:
        return batch, await self.driver.forward(batch)

    def _finish(self, task: asyncio.Task) -> None:
        chunks, self._inflight = self._inflight, []
        try:
            batch, result = task.result()
            problem = check_result(result, batch)
            if problem:
                raise DriverError(problem)
        except (DriverError, BatchError) as e:
            err: Exception = _same_error(e)
        except Exception as e:
            err = DriverError(f"driver failed: {type(e).__name__}: {e}")
        else:
            err = None
        if err is not None:
            for c in chunks:
                self._fail(c.p, err)
            return
        for c, part in zip(chunks, split_result(result, batch, chunks), strict=True):
            p = c.p
            p.parts.append(part)
            p.completed = c.start + c.count
            if p.completed == p.num_tokens and not p.future.done():
                p.future.set_result(merge_parts(p))

    # ---- failure and cleanup ---------------------------------------------------------------
    # A dropped pass leaves the queue at once; a chunk of it already in flight runs to its end.
    def _on_done(self, p: PassRequest, fut: asyncio.Future) -> None:
        if fut.cancelled():
            self._drop(p)

    def _drop(self, p: PassRequest) -> None:
        if p.dropped:
            return
        p.dropped = True
        self._version += 1
        if p.scheduled < p.num_tokens:
            self._queue.remove(p)

    def _fail(self, p: PassRequest, err: Exception) -> None:
        self._drop(p)
        if not p.future.done():
            p.future.set_exception(err)

    def _fail_all(self, err: Exception) -> None:
        passes = [c.p for c in self._inflight] + list(self._queue)
        self._inflight = []
        for p in passes:
            self._fail(p, err)


def _same_error(e: Exception) -> Exception:
    """A fresh exception of e's type and message for each failed pass (one shared instance would
    collect every awaiting task's traceback)."""
    try:
        return type(e)(str(e))
    except Exception:
        return DriverError(str(e))
