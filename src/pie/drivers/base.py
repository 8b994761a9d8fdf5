"""The interface every driver implements; the runtime sees nothing else."""

from __future__ import annotations

from abc import ABC, abstractmethod

from pie.drivers.protocol import Capabilities, ForwardBatch, ForwardResult


class Driver(ABC):
    """Executes batched forward passes for one model.

    Invariants: `start()` returns the capabilities before any `forward()`;
    `forward()` calls may overlap (the driver serializes them in order);
    if the driver dies, every pending and later `forward()` raises DriverError promptly.
    """

    capabilities: Capabilities | None = None

    @abstractmethod
    async def start(self) -> Capabilities: ...

    @abstractmethod
    async def forward(self, batch: ForwardBatch) -> ForwardResult: ...

    @abstractmethod
    async def shutdown(self) -> None: ...
