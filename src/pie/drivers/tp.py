"""Tensor parallelism across processes: one process per device, rank 0 in the driver.

    build_executor(spec)  ->  ModelExecutor (tensor_parallel_size 1) or TensorParallelExecutor

Rank 0 (this process: the cuda_native driver, or the dev driver's child) starts ranks 1..n-1 as
subprocesses (`python -m pie.drivers.tp_worker`), joins the torch.distributed group with them (NCCL on
CUDA, gloo on CPU, pie.distributed) and then drives them: every forward batch and page op is sent to them
(pickled, down each worker's stdin pipe) before rank 0 runs it itself, and the other ranks run the same
ModelExecutor code on their shard. Only rank 0 samples and returns results; page reads come back over the
gloo control group.

Supervision: a monitor thread polls the workers; when one exits, the failure (its exit status and the
last lines it wrote to stderr) is recorded, the collectives are aborted so no rank stays blocked, the
other workers are killed, and every in-flight and later call fails with a DriverError naming the rank.
Workers die with rank 0 (their stdin is a pipe from it; EOF ends them, and PR_SET_PDEATHSIG on Linux).
Collectives and the join are bounded by spec.tp_timeout_s.

Page ops: a KV page is split over the ranks (each holds its KV heads), so a page's raw bytes are the
ranks' bytes concatenated, rank 0 first: reads gather every rank's slice, writes hand each rank its slice.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from pie.drivers.protocol import BatchError, ForwardBatch, ForwardResult, PageOps, PageOpsResult
from pie.drivers.spec import ExecutorSpec
from pie.errors import DriverError

log = logging.getLogger(__name__)
_POLL_S = 0.05  # how often the monitor looks at the workers
_STDERR_LINES = 20  # a worker's last stderr lines kept for the error message


def build_executor(spec: ExecutorSpec, progress: bool = False):
    """The executor for `spec`: a plain ModelExecutor at tensor_parallel_size 1, else a group of processes
    (started here, closed with the executor's `close`)."""
    from pie.drivers.executor import ModelExecutor

    if spec.tensor_parallel_size == 1:
        return ModelExecutor(spec, progress=progress)
    group = TPGroup(rank_devices(spec), timeout_s=spec.tp_timeout_s)
    try:
        executor = group.build(spec, progress=progress)
    except BaseException:
        group.close()
        raise
    executor.owns_group = True
    return executor


def rank_devices(spec: ExecutorSpec) -> list[str]:
    devices = list(spec.devices or [spec.device])
    if len(devices) != spec.tensor_parallel_size:
        raise DriverError(
            f"tensor_parallel_size {spec.tensor_parallel_size} needs one device per rank, but "
            f"{len(devices)} devices are given ({', '.join(devices)}); list {spec.tensor_parallel_size} devices"
        )
    return devices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Worker:
    """One rank's subprocess and the tail of its stderr (echoed to ours)."""

    def __init__(self, rank: int, cmd: list[str], env: dict) -> None:
        self.rank = rank
        # stdout onto our stderr: rank 0's stdout may be a result (pie bench --json)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=2, stderr=subprocess.PIPE, env=env)
        self.tail: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._reader = threading.Thread(target=self._read, name=f"pie-tp-rank{rank}-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            print(f"[tp rank {self.rank}] {line}", file=sys.stderr, flush=True)

    def describe_exit(self) -> str:
        self._reader.join(timeout=1.0)
        code = self.proc.returncode
        how = (
            f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        )
        last = [ln for ln in self.tail if ln.strip()]
        return how + (f"; its last output: {last[-1]}" if last else "")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass


class TPGroup:
    """Ranks 1..n-1 as subprocesses, and this process as rank 0 of their torch.distributed group."""

    def __init__(self, devices: list[str], timeout_s: float = 300.0) -> None:
        from pie.distributed import init_tp
        from pie.drivers.executor import resolve_device

        self.devices, self.size, self.timeout_s = devices, len(devices), timeout_s
        self.failure: str | None = None
        self._closed = False
        device0 = resolve_device(devices[0])
        for d in devices[1:]:
            resolve_device(d)  # a bad device fails here, by name, before anything starts
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.workers = [
            _Worker(
                r,
                [
                    sys.executable,
                    "-m",
                    "pie.drivers.tp_worker",
                    "--rank",
                    str(r),
                    "--size",
                    str(self.size),
                    "--device",
                    devices[r],
                    "--init-method",
                    init_method,
                    "--timeout-s",
                    str(timeout_s),
                    "--parent-pid",
                    str(os.getpid()),
                ],  # fmt: skip
                env,
            )
            for r in range(1, self.size)
        ]
        self._monitor = threading.Thread(target=self._watch, name="pie-tp-monitor", daemon=True)
        self._monitor.start()
        try:
            init_tp(0, self.size, device0, init_method, timeout_s)
        except Exception as e:
            self.close()
            raise DriverError(self._explain(f"tensor-parallel group did not form: {e}")) from None

    # ---- supervision ----
    def _watch(self) -> None:
        while not self._closed:
            for w in self.workers:
                if w.proc.poll() is not None and not self._closed:
                    self._fail(f"tensor-parallel rank {w.rank} ({self.devices[w.rank]}) {w.describe_exit()}")
                    return
            time.sleep(_POLL_S)

    def _fail(self, message: str) -> None:
        from pie.distributed import abort_tp

        if self.failure is not None:
            return
        self.failure = message + "; the model's other ranks were stopped: restart the driver"
        log.error("%s", self.failure)
        abort_tp()  # unblocks rank 0 if it waits in a collective with the dead rank
        for w in self.workers:
            w.kill()

    def _explain(self, what: str) -> str:
        """The recorded rank failure, else `what`. A collective that fails usually means a rank died: give
        the monitor a few seconds to see the exit (the socket closes before the process is reaped)."""
        deadline = time.monotonic() + 3.0
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        return self.failure or what

    def send(self, msg: tuple) -> None:
        """Hand one message to every other rank: pickled onto its stdin pipe (a length, then the bytes).
        A pipe write is microseconds where a gloo broadcast is a round trip, and rank 0 starts its own
        part of a pass right after (the ranks meet again in the pass's collectives)."""
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        frame = memoryview(struct.pack("<Q", len(data)) + data)
        for w in self.workers:
            fd = w.proc.stdin.fileno()
            sent = 0
            while sent < len(frame):  # a blocking pipe: large frames go out as the rank reads them
                sent += os.write(fd, frame[sent:])

    def check(self) -> None:
        if self.failure is not None:
            raise DriverError(self.failure)
        if self._closed:
            raise DriverError("the tensor-parallel group is closed")

    def call(self, fn: Callable, what: str):
        """Run fn (collectives with the other ranks); a rank that died turns any error into its story."""
        self.check()
        try:
            return fn()
        except BatchError:
            raise
        except Exception as e:
            message = self._explain(f"{what} failed on rank 0: {type(e).__name__}: {e}")
            if self.failure is None:  # rank 0 itself failed mid-pass: the ranks are out of step now
                self._fail(message)
            raise DriverError(self.failure) from None

    # ---- work ----
    def build(self, spec: ExecutorSpec, progress: bool = False) -> TensorParallelExecutor:
        """Every rank builds its shard of `spec`'s model (rank r on devices[r])."""
        from pie.drivers.executor import ModelExecutor

        spec = dataclasses.replace(spec, devices=list(self.devices), tensor_parallel_size=self.size)

        def run():
            self.send(("build", spec))
            return ModelExecutor(dataclasses.replace(spec, device=self.devices[0]), progress=progress)

        try:
            local = self.call(run, "building the model")
        except DriverError:
            raise
        return TensorParallelExecutor(self, local)

    def close(self) -> None:
        """Stop the workers (a clean "stop" when they are healthy) and leave the group; idempotent."""
        from pie.distributed import abort_tp, destroy_tp

        if self._closed:
            return
        healthy = self.failure is None and all(w.proc.poll() is None for w in self.workers)
        self._closed = True
        if healthy:
            try:
                self.send(("stop",))
            except Exception as e:
                log.debug("tp stop: %s", e)
                healthy = False
        for w in self.workers:
            if healthy:
                try:
                    w.proc.wait(timeout=10.0)
                except subprocess.TimeoutExpired:
                    pass
            w.kill()
            if w.proc.stdin is not None:
                w.proc.stdin.close()
        if not healthy:
            abort_tp()
        destroy_tp()


class TensorParallelExecutor:
    """Rank 0's executor (`local`) plus the broadcast of every call to the other ranks; otherwise it
    reads like a ModelExecutor (unknown attributes are the local executor's)."""

    def __init__(self, group: TPGroup, local) -> None:
        self.group, self.local = group, local
        self.owns_group = False
        self.local_page_nbytes = local.page_mover.page_nbytes

    def __getattr__(self, name: str):
        return getattr(self.local, name)

    @property
    def capabilities(self):
        caps = self.local.capabilities
        fp = hashlib.sha256(f"{caps.kv_fingerprint}/tp{self.group.size}".encode()).hexdigest()[:16]
        return dataclasses.replace(
            caps,
            page_nbytes=self.local_page_nbytes * self.group.size,
            kv_fingerprint=f"{self.local.model_config.model_type}-tp{self.group.size}-{fp}",
            device=",".join(self.group.devices),
        )

    @property
    def graphs(self):
        """The CUDA-graph runner, with `prepare` run on every rank (a capture holds collectives)."""
        return None if self.local.graphs is None else _GroupGraphs(self)

    def time_collectives(self, tokens: int, outputs: int, iters: int = 20) -> float:
        """Seconds the collectives of one pass of `tokens` tokens and `outputs` logits rows take alone
        (pie.distributed.time_step_collectives, on every rank)."""
        from pie.distributed import time_step_collectives

        cfg = self.local.model_config
        vocab_per_rank = -(-cfg.vocab_size // self.group.size)
        args = (tokens, outputs, cfg.hidden_size, vocab_per_rank, cfg.num_layers, self.local.dtype, iters)

        def run():
            self.group.send(("time_collectives", args))
            return time_step_collectives(*args)

        return self.group.call(run, "timing the collectives")

    def execute(self, batch: ForwardBatch) -> ForwardResult:
        return self.launch(batch)()

    def launch(self, batch: ForwardBatch) -> Callable[[], ForwardResult]:
        self.group.check()
        self.local.check_batch(batch)  # a bad batch fails here, before the other ranks see it

        def run():
            self.group.send(("forward", batch))
            return self.local.launch(batch, checked=True)

        return _Pending(self.group.call(run, "forward pass"), self.group)

    def page_ops(self, ops: PageOps) -> PageOpsResult:
        from pie.distributed import all_gather_object

        ops.validate(
            self.local.num_pages, self.local.page_mover.num_swap_slots, self.capabilities.page_nbytes
        )

        def run():
            self.group.send(("page_ops", ops))
            res = self.local.page_ops(rank_ops(ops, 0, self.local_page_nbytes))
            return gather_read(res, all_gather_object(None), self.local_page_nbytes)

        return self.group.call(run, "page ops")

    def close(self) -> None:
        mover = getattr(self.local, "page_mover", None)
        if mover is not None:
            mover.close()
        self.local = None
        if self.group.failure is None and not self.group._closed:
            try:
                self.group.send(("release",))
            except Exception as e:
                log.debug("tp release: %s", e)
        if self.owns_group:
            self.group.close()


def rank_ops(ops: PageOps, rank: int, local_nbytes: int) -> PageOps:
    """The ops one rank applies: its byte columns of write_data (the rest is the same everywhere)."""
    if ops.write_data is None or not len(ops.write):
        return ops
    cols = slice(rank * local_nbytes, (rank + 1) * local_nbytes)
    return dataclasses.replace(ops, write_data=np.ascontiguousarray(ops.write_data[:, cols]))


def gather_read(res: PageOpsResult, others: list, local_nbytes: int) -> PageOpsResult:
    """Rank 0's read pages joined with the others' (all_gather_object's list: index r is rank r's data)."""
    if res.data is None:
        return res
    parts = [res.data] + [o for o in others[1:]]
    return PageOpsResult(data=np.concatenate(parts, axis=1))


class _GroupGraphs:
    """executor.graphs of a group: `prepare` (capture) on every rank; the rest is rank 0's runner."""

    def __init__(self, executor: TensorParallelExecutor) -> None:
        self._executor = executor

    def __getattr__(self, name: str):
        return getattr(self._executor.local.graphs, name)

    def prepare(self, batch_size: int) -> bool:
        def run():
            self._executor.group.send(("prepare_graph", batch_size))
            return self._executor.local.graphs.prepare(batch_size)

        return self._executor.group.call(run, "capturing a CUDA graph")


class _Pending:
    """A launched pass of the group: waiting also watches for a dead rank (no hang on its collectives)."""

    __slots__ = ("pending", "group")

    def __init__(self, pending, group: TPGroup) -> None:
        self.pending, self.group = pending, group

    def ready(self) -> bool:
        return self.group.failure is not None or self.pending.ready()

    def __call__(self) -> ForwardResult:
        event = getattr(self.pending, "event", None)
        while event is not None and not event.query():  # spin (as a CUDA event wait does), watching the ranks
            self.group.check()
            time.sleep(0)
        self.group.check()
        return self.pending()


def layout_estimate(model_path: str, tp: int, dtype: str = "bfloat16", page_size: int = 32) -> list[dict]:
    """Per rank: its weight bytes (the shard's parameters, built on the meta device: nothing allocated) and
    its KV bytes per page of page_size tokens. Raises DriverError when the model does not split over tp."""
    import torch

    from pie.distributed import simulated_rank
    from pie.drivers.executor import resolve_dtypes, tensor_parallel_problem
    from pie.drivers.kv_plan import page_bytes
    from pie.models.config import read_model_config
    from pie.models.registry import get_model_class

    cfg = read_model_config(model_path)
    cls = get_model_class(cfg.model_type)
    problem = tensor_parallel_problem(cfg, cls, tp)
    if problem is not None:
        raise DriverError(problem)
    act, _ = resolve_dtypes(dtype, "auto")
    elem = torch.empty((), dtype=act).element_size()
    out = []
    for rank in range(tp):
        with simulated_rank(rank, tp), torch.device("meta"):
            model = cls(cfg)
        weights = sum(p.numel() for p in model.parameters()) * elem
        out.append(
            {"rank": rank, "weights_bytes": weights, "kv_page_bytes": page_bytes(cfg, page_size, act, tp)}
        )
    return out
