"""A driver that runs the ModelExecutor in this process, on one worker thread.

The executor is built, and every batch and page movement executed, on one thread that takes jobs in
submission order, so forward and page_ops run in that order. A forward pass is *launched* (queued on the
device, its results copied to pinned memory asynchronously) and waited for only when no further job is
queued or two passes are already launched: while the device runs step N, the worker launches step N+1.
Results go back to the event loop with call_soon_threadsafe: one wake-up per pass, no thread hand-offs
in between (torch releases the GIL while the worker waits on the device).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import queue
import sys
import threading
from collections import deque
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import InvalidStateError

from pie.drivers.base import Driver
from pie.drivers.protocol import BatchError, Capabilities, ForwardBatch, ForwardResult, PageOps, PageOpsResult
from pie.drivers.spec import ExecutorSpec
from pie.errors import DriverError, PieError

_MAX_LAUNCHED = 2  # passes queued on the device before the worker waits for the oldest
# The event loop's Python (scheduling the next batch) and the worker's (launching it) share the GIL; the
# default 5 ms switch interval would let one hold up the other for a whole decode step.
_SWITCH_INTERVAL_S = 0.0002
_POLL_S = 0.0001  # how often a waiting worker checks whether the oldest launched pass is done


class InProcessDriver(Driver):
    def __init__(self, spec: ExecutorSpec) -> None:
        self.spec = spec
        self.executor = None  # pie.drivers.executor.ModelExecutor once started
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_executor(cls, executor) -> InProcessDriver:
        """A started driver over an executor built elsewhere (pie bench --e2e shares its executor)."""
        d = cls(executor.spec)
        d.executor = executor
        d.capabilities = executor.capabilities
        d._start_thread()
        return d

    # ---- the worker ------------------------------------------------------------------------------
    def _start_thread(self) -> None:
        sys.setswitchinterval(min(sys.getswitchinterval(), _SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._work, name="pie-driver", daemon=True)
        self._thread.start()

    def _submit(self, kind: str, arg) -> ThreadFuture:
        fut: ThreadFuture = ThreadFuture()
        self._jobs.put((kind, arg, fut))
        return fut

    def _work(self) -> None:
        launched: deque = deque()  # (pending pass, future) on the device, oldest first
        while True:
            if launched:
                if len(launched) >= _MAX_LAUNCHED or launched[0][0].ready():
                    wait, fut = launched.popleft()
                    _settle(fut, wait)  # delivered as soon as it is done
                    continue
                try:  # the oldest pass still runs: take the next job meanwhile, or look again shortly
                    kind, arg, fut = self._jobs.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
            else:
                kind, arg, fut = self._jobs.get()
            if kind == "stop":
                while launched:
                    wait, f = launched.popleft()
                    _settle(f, wait)
                _settle(fut, arg)
                return
            if kind == "forward":
                try:
                    launched.append((self.executor.launch(arg), fut))
                except BaseException as e:
                    fut.set_exception(e)
                continue
            while launched:  # page movements and calls see every launched pass done
                wait, f = launched.popleft()
                _settle(f, wait)
            _settle(fut, arg)

    async def _call(self, kind: str, arg):
        return await asyncio.wrap_future(self._submit(kind, arg))

    # ---- the Driver interface ------------------------------------------------------------------------
    async def start(self) -> Capabilities:
        if self.executor is not None:
            raise DriverError("driver already started")
        self._start_thread()
        try:
            self.executor = await self._call("call", self._build)
        except PieError:
            raise
        except Exception as e:
            raise DriverError(
                f"cannot start the model executor for {self.spec.model_path}: {type(e).__name__}: {e}"
            ) from e
        self.capabilities = self.executor.capabilities
        return self.capabilities

    def _build(self):
        from pie.drivers.tp import build_executor

        return build_executor(self.spec, progress=True)  # a group of processes at tensor_parallel_size > 1

    async def forward(self, batch: ForwardBatch) -> ForwardResult:
        if self.executor is None or self._closed:
            raise DriverError("the driver is not running (not started, or shut down)")
        try:
            return await self._call("forward", batch)
        except (PieError, BatchError):
            raise
        except Exception as e:  # e.g. CUDA out of memory: this batch fails, the driver stays up
            raise DriverError(f"forward pass failed: {type(e).__name__}: {e}") from e

    async def page_ops(self, ops: PageOps) -> PageOpsResult:
        if self.executor is None or self._closed:
            raise DriverError("the driver is not running (not started, or shut down)")
        try:
            return await self._call("call", lambda: self.executor.page_ops(ops))
        except (PieError, BatchError):
            raise
        except Exception as e:
            raise DriverError(f"page ops failed: {type(e).__name__}: {e}") from e

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            return
        # passes still launched finish first; then the executor (weights, KV cache) goes on its thread
        await asyncio.wrap_future(self._submit("stop", self._release))
        self._thread.join()

    def abandon(self) -> None:
        """Stop the worker after the job it runs now (a start that timed out), without waiting for it."""
        self._closed = True
        self._jobs.put(("stop", self._release, ThreadFuture()))

    def _release(self) -> None:
        close = getattr(self.executor, "close", None)  # tensor parallel: also stops the other ranks
        mover = getattr(self.executor, "page_mover", None) if close is None else None
        if close is not None:
            close()
        if mover is not None:
            mover.close()  # unpin the swap pool while CUDA is certainly up
        self.executor = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def _settle(fut: ThreadFuture, fn) -> None:
    """Run fn and hand its result (or error) to fut, unless its waiter went away (cancelled)."""
    try:
        result = fn()
    except BaseException as e:
        with contextlib.suppress(InvalidStateError):
            fut.set_exception(e)
        return
    try:
        fut.set_result(result)
    except InvalidStateError:  # cancelled meanwhile
        pass
