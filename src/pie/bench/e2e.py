"""End-to-end decode through the runtime and the SDK, beside the executor-only figure of the same batch.

N inferlets each prefill `context` tokens, meet at a barrier, then generate `steps` tokens with
`ctx.generate(...).collect_tokens()` (engine-side generation). The decode phase is timed from the barrier
to the last token; the same executor serves both measurements (weights and KV are not duplicated).

`noop_host_cost` drives the same runtime against a driver that returns at once, on the CPU: what remains
is the host cost of the runtime and the SDK per sequence per step, which the device's step must hide.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pie.drivers.base import Driver
from pie.drivers.protocol import (
    PROTOCOL_VERSION,
    Capabilities,
    ForwardBatch,
    ForwardResult,
    PageOps,
    PageOpsResult,
)

Progress = Callable[[str], None]


@dataclass
class E2EFigure:
    batch: int
    steps: int
    decode_s: float  # wall time of the decode phase (barrier -> last token)
    batches: int  # forward passes the runtime ran during it

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.steps / self.decode_s

    @property
    def step_s(self) -> float:
        return self.decode_s / self.steps


class NoopDriver(Driver):
    """Returns token 5 for every output at once: the runtime's own cost, without a model."""

    def __init__(self, page_size: int = 16, num_pages: int = 1 << 16) -> None:
        self.capabilities = Capabilities(
            PROTOCOL_VERSION, "noop", num_pages, page_size, 32000, 16384, 512, 32, "cpu", "none",
            extra={"max_position_embeddings": 1 << 20},
        )  # fmt: skip
        self.forwards = 0

    async def start(self) -> Capabilities:
        return self.capabilities

    async def shutdown(self) -> None:
        pass

    async def page_ops(self, ops: PageOps) -> PageOpsResult:
        return PageOpsResult()

    async def forward(self, batch: ForwardBatch) -> ForwardResult:
        self.forwards += 1
        await asyncio.sleep(0)
        return ForwardResult(tokens=np.full(batch.num_outputs, 5, np.int64))


async def _measure(driver: Driver, batch: int, context: int, steps: int, vocab: int, seed: int) -> E2EFigure:
    from pie.runtime.engine import Engine
    from pie.sdk import Context, Model

    engine = Engine.from_drivers({"bench": (driver, None)})
    await engine.start()
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, vocab, size=(batch, context)).tolist()
    ready = 0
    go = asyncio.Event()
    t0 = [0.0]

    async def inferlet(inp: dict) -> str:
        nonlocal ready
        ctx = Context(Model.load()).append(inp["prompt"])
        await ctx.flush()
        ready += 1
        if ready == batch:
            t0[0] = time.perf_counter()
            go.set()
        await go.wait()
        toks = await ctx.generate(max_tokens=steps, ignore_eos=True).collect_tokens()
        return str(len(toks))

    try:
        steps0 = engine.model().scheduler.num_steps
        outs = await asyncio.gather(*(engine.run_inferlet(inferlet, {"prompt": p}) for p in prompts))
        dt = time.perf_counter() - t0[0]
        if any(o != str(steps) for o in outs):
            raise RuntimeError(f"an inferlet generated the wrong number of tokens: {outs[:4]}")
        n = engine.model().scheduler.num_steps - steps0
    finally:
        await engine.shutdown()
    return E2EFigure(batch, steps, dt, n)


def run_e2e(
    driver: Driver, batches: tuple[int, ...], context: int, steps: int, vocab: int, progress: Progress
) -> list[E2EFigure]:
    """One engine per batch size over `driver` (already started; it is not shut down here)."""
    figs = []
    for b in batches:
        progress(f"e2e: {b} inferlets x {steps} tokens through the SDK")
        figs.append(asyncio.run(_measure(_Borrowed(driver), b, context, steps, vocab, seed=b)))
    return figs


def noop_host_cost(batches: tuple[int, ...] = (1, 64, 256), steps: int = 200) -> list[E2EFigure]:
    return [asyncio.run(_measure(NoopDriver(), b, 32, steps, 32000, seed=b)) for b in batches]


class _Borrowed(Driver):
    """A started driver lent to an engine that must not shut it down."""

    def __init__(self, inner: Driver) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities

    async def start(self) -> Capabilities:
        return self.inner.capabilities

    async def shutdown(self) -> None:
        pass

    async def forward(self, batch: ForwardBatch) -> ForwardResult:
        return await self.inner.forward(batch)

    async def page_ops(self, ops: PageOps) -> PageOpsResult:
        return await self.inner.page_ops(ops)
