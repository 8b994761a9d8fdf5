"""The interface every driver implements; the runtime sees nothing else."""

from __future__ import annotations

from abc import ABC, abstractmethod

from pie.drivers.protocol import Capabilities, ForwardBatch, ForwardResult, PageOps, PageOpsResult
from pie.errors import DriverError


class Driver(ABC):
    """Executes batched forward passes and KV page movements for one model.

    Invariants: `start()` returns the capabilities before any `forward()`;
    `forward()` and `page_ops()` calls may overlap (the driver serializes them, together, in submission
    order: a forward submitted after a page_ops sees the moved pages);
    if the driver dies, every pending and later call raises DriverError promptly.
    """

    capabilities: Capabilities | None = None

    @abstractmethod
    async def start(self) -> Capabilities: ...

    @abstractmethod
    async def forward(self, batch: ForwardBatch) -> ForwardResult: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    async def page_ops(self, ops: PageOps) -> PageOpsResult:
        """Apply KV page movements (see PageOps for the order and the byte layout)."""
        raise DriverError(f"this driver ({type(self).__name__}) cannot move pages")
