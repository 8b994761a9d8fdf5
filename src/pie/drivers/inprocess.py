"""A driver that runs the ModelExecutor in this process, on one worker thread.

The executor is built and every batch and page movement executed on the same single thread (FIFO),
so forward and page_ops calls run in submission order and the event loop stays free to schedule the next batch while
torch works (torch releases the GIL inside its kernels).
"""

from __future__ import annotations

import asyncio
import gc
from concurrent.futures import ThreadPoolExecutor

from pie.drivers.base import Driver
from pie.drivers.protocol import BatchError, Capabilities, ForwardBatch, ForwardResult, PageOps, PageOpsResult
from pie.drivers.spec import ExecutorSpec
from pie.errors import DriverError, PieError


class InProcessDriver(Driver):
    def __init__(self, spec: ExecutorSpec) -> None:
        self.spec = spec
        self.executor = None  # pie.drivers.executor.ModelExecutor once started
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pie-driver")
        # waits for launched batches, so the driver thread can launch the next one meanwhile (FIFO)
        self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pie-driver-wait")
        self._closed = False

    @classmethod
    def from_executor(cls, executor) -> InProcessDriver:
        """A started driver over an executor built elsewhere (pie bench --e2e shares its executor)."""
        d = cls(executor.spec)
        d.executor = executor
        d.capabilities = executor.capabilities
        return d

    def _build(self):
        from pie.drivers.executor import ModelExecutor

        return ModelExecutor(self.spec, progress=True)

    async def start(self) -> Capabilities:
        if self.executor is not None:
            raise DriverError("driver already started")
        loop = asyncio.get_running_loop()
        try:
            self.executor = await loop.run_in_executor(self._pool, self._build)
        except PieError:
            raise
        except Exception as e:
            raise DriverError(
                f"cannot start the model executor for {self.spec.model_path}: {type(e).__name__}: {e}"
            ) from e
        self.capabilities = self.executor.capabilities
        return self.capabilities

    async def forward(self, batch: ForwardBatch) -> ForwardResult:
        if self.executor is None or self._closed:
            raise DriverError("the driver is not running (not started, or shut down)")
        loop = asyncio.get_running_loop()
        try:
            done = await loop.run_in_executor(self._pool, self.executor.launch, batch)
            return await loop.run_in_executor(self._waiter, done)
        except (PieError, BatchError):
            raise
        except Exception as e:  # e.g. CUDA out of memory: this batch fails, the driver stays up
            raise DriverError(f"forward pass failed: {type(e).__name__}: {e}") from e

    async def page_ops(self, ops: PageOps) -> PageOpsResult:
        if self.executor is None or self._closed:
            raise DriverError("the driver is not running (not started, or shut down)")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self.executor.page_ops, ops)
        except (PieError, BatchError):
            raise
        except Exception as e:
            raise DriverError(f"page ops failed: {type(e).__name__}: {e}") from e

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        # wait for a batch still running, then drop the executor (weights, KV cache) on its thread
        await asyncio.get_running_loop().run_in_executor(self._pool, self._release)
        self._pool.shutdown(wait=True)
        self._waiter.shutdown(wait=True)

    def _release(self) -> None:
        mover = getattr(self.executor, "page_mover", None)
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
