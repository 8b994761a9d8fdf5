"""The engine: one driver, page allocator and scheduler per model; runs inferlets against them.

    engine = Engine(config)                      # or Engine.from_drivers({name: (driver, tokenizer)})
    await engine.start()                         # start drivers, report progress on stderr
    text = await engine.run_inferlet("text-completion", {"prompt": "Hi"})
    await engine.shutdown()

Each run_inferlet call runs the inferlet's `main` in its own task with an InferletScope in a
contextvar (so pie.sdk finds the engine); whatever contexts it leaves open are closed when it ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from pie.drivers.base import Driver
from pie.drivers.protocol import PROTOCOL_VERSION, Capabilities
from pie.errors import DriverError, ModelError
from pie.inferlets.loader import load_inferlet
from pie.models.tokenizer import Tokenizer
from pie.runtime.kvcache import KVCache
from pie.runtime.messaging import Broker
from pie.runtime.pages import DEFAULT_HINT, PageAllocator
from pie.runtime.scheduler import Scheduler
from pie.runtime.scope import InferletScope, set_scope
from pie.runtime.session import Session
from pie.runtime.snapshots import SnapshotStore


@dataclass(eq=False)
class ModelRuntime:
    """Everything the SDK needs about one served model."""

    name: str
    driver: Driver
    tokenizer: Tokenizer | None
    capabilities: Capabilities
    allocator: PageAllocator
    kv: KVCache
    scheduler: Scheduler
    snapshots: SnapshotStore

    def stats(self) -> dict:
        return self.scheduler.stats()


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Engine:
    def __init__(self, config=None, *, in_process: bool = False, progress: Callable[[str], None] = _stderr):
        """config: a pie.config.PieConfig (drivers are created at start()).

        in_process: run every model's executor in this process (InProcessDriver) whatever the
        configured driver type; for tests and debugging.
        """
        self.config = config
        self.in_process = in_process
        self.progress = progress
        self.models: dict[str, ModelRuntime] = {}
        self._given: dict[str, tuple[Driver, Tokenizer | None]] = {}
        self._hints: dict[str, str] = {}
        self.default_model = config.default_model.name if config is not None else None
        self._started = False
        self._given_snapshot_dir: str | Path | None = None
        self.broker = Broker()  # messages between its inferlets (inferlet.messaging)

    @classmethod
    def from_drivers(
        cls,
        drivers: dict[str, tuple[Driver, Tokenizer | None]],
        default: str | None = None,
        progress: Callable[[str], None] = lambda _msg: None,
        snapshot_dir: str | Path | None = None,
    ) -> Engine:
        """An engine over drivers built elsewhere (tests); start() starts those not yet started."""
        if not drivers:
            raise ValueError("from_drivers needs at least one model")
        engine = cls(None, progress=progress)
        engine._given = dict(drivers)
        engine._given_snapshot_dir = snapshot_dir
        engine.default_model = default or next(iter(drivers))
        return engine

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            if self.config is not None:
                for entry in self.config.models:
                    await self._start_model(entry.name, *await self._create(entry), self._hint(entry))
            else:
                for name, (driver, tok) in self._given.items():
                    await self._start_model(name, driver, tok, DEFAULT_HINT)
        except BaseException:
            await self.shutdown()
            raise

    async def _create(self, entry) -> tuple[Driver, Tokenizer]:
        from pie.drivers.factory import create_driver
        from pie.models.hub import resolve_model_dir

        path = resolve_model_dir(entry.hf_repo)
        d = entry.driver
        how = "in-process" if self.in_process else f"{d.type} driver"
        self.progress(
            f"pie: loading model {entry.name!r} ({entry.hf_repo}) with the {how} on {', '.join(d.device)}"
        )
        tokenizer = await asyncio.to_thread(Tokenizer.from_dir, path)
        return create_driver(entry, in_process=self.in_process), tokenizer

    def _hint(self, entry) -> str:
        from pie.drivers.kv_plan import capacity_hint  # knows which keys act on the entry's device

        return capacity_hint(entry, self.config.source)

    async def _start_model(self, name: str, driver: Driver, tok: Tokenizer | None, hint: str) -> None:
        t0 = time.monotonic()
        # registered before start so shutdown() stops a driver whose start fails halfway
        self._given[name] = (driver, tok)
        caps = driver.capabilities or await driver.start()
        if caps.protocol_version != PROTOCOL_VERSION:
            raise DriverError(
                f"model {name!r}: driver speaks protocol {caps.protocol_version}, this pie speaks "
                f"{PROTOCOL_VERSION}; reinstall the driver environment from this pie"
            )
        allocator = PageAllocator(caps.num_pages, hint)
        kv = KVCache(
            allocator,
            caps.page_size,
            getattr(caps, "num_swap_slots", 0),
            caps.extra.get("kv_window") or None,
            num_state_slots=getattr(caps, "num_state_slots", 0),
        )
        scheduler = Scheduler(driver, caps, kv, hint)
        fingerprint = (
            getattr(caps, "kv_fingerprint", "") or f"{caps.architecture}/page{caps.page_size}/{caps.dtype}"
        )
        snapshots = SnapshotStore(kv, scheduler, self._snapshot_dir(name), fingerprint)
        scheduler.start()
        self.models[name] = ModelRuntime(name, driver, tok, caps, allocator, kv, scheduler, snapshots)
        self.progress(
            f"pie: model {name!r} ready in {time.monotonic() - t0:.1f}s: {caps.architecture} on {caps.device} "
            f"({caps.dtype}), {caps.num_pages} KV pages x {caps.page_size} tokens"
        )

    def _snapshot_dir(self, model: str) -> Path | None:
        """<[runtime] snapshot_dir>/<model name> (None: snapshots stay in memory)."""
        runtime = getattr(self.config, "runtime", None) if self.config is not None else None
        base = runtime.snapshot_path() if runtime is not None else None
        if base is None and self._given_snapshot_dir:
            base = Path(self._given_snapshot_dir)
        return None if base is None else base / model

    async def shutdown(self) -> None:
        for rt in self.models.values():
            await rt.snapshots.flush()
        for rt in self.models.values():
            await rt.scheduler.stop()
        errors = []
        for name, (driver, _tok) in self._given.items():
            try:
                await driver.shutdown()
            except Exception as e:  # keep stopping the others
                errors.append(f"{name}: {e}")
        self.models.clear()
        if errors:
            self.progress("pie: some drivers did not shut down cleanly: " + "; ".join(errors))

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    # ---- models and inferlets -------------------------------------------------------------------
    def model(self, name: str | None = None) -> ModelRuntime:
        name = name or self.default_model
        if name not in self.models:
            names = ", ".join(repr(n) for n in self.models) or "none (the engine is not started)"
            raise ModelError(f"no model named {name!r}; configured models: {names}")
        return self.models[name]

    async def run_inferlet(
        self,
        inferlet: str | Path | ModuleType | Callable,
        input: dict | None = None,
        *,
        model: str | None = None,
        session: Session | None = None,
    ) -> str:
        """Run one inferlet to completion and return its result as text.

        model: the model `Model.load()` gives this inferlet (default: the engine's default).
        session: its client (pie.runtime.session; `pie run` gives a StdioSession); None: no client.
        A str result is returned as is; None becomes ""; anything else is JSON (or str) encoded.
        """
        return await self.spawn_inferlet(inferlet, input, model=model, session=session)

    def spawn_inferlet(
        self,
        inferlet: str | Path | ModuleType | Callable,
        input: dict | None = None,
        *,
        model: str | None = None,
        session: Session | None = None,
    ) -> asyncio.Task[str]:
        """Start an inferlet in a task of its own, with its own scope, and return the task: awaiting it
        gives run_inferlet's result; cancelling it ends the inferlet and frees what it holds."""
        main = load_inferlet(inferlet)
        default = self.model(model).name
        program = inferlet if isinstance(inferlet, str | Path) else getattr(inferlet, "__name__", "")
        scope = InferletScope(engine=self, default_model=default, session=session, program=str(program))
        ctx = contextvars.copy_context()
        ctx.run(set_scope, scope)
        return asyncio.get_running_loop().create_task(_run_main(main, dict(input or {}), scope), context=ctx)


async def _run_main(main: Callable, input: dict, scope: InferletScope) -> str:
    try:
        result = await main(input)
    finally:
        scope.close_all()
    if result is None:  # Pie's SDK: set_return(value) gives the result of a main that returns nothing
        result = scope.returned
    return _as_text(result)


def _as_text(result) -> str:
    if result is None:
        return ""
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(result)
