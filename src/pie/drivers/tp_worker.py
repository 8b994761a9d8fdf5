"""A tensor-parallel rank other than 0 (started by pie.drivers.tp.TPGroup; not run by hand):

    python -m pie.drivers.tp_worker --rank R --size N --device D --init-method URL [--timeout-s S]

Joins the group, then follows rank 0's messages (pickled frames on stdin: an 8-byte length, then the bytes): ("build", spec) builds this rank's shard of the
model (a later build replaces it), ("forward", batch) runs the same forward pass, ("page_ops", ops)
applies its slice of the page ops, ("release",) drops the model, ("stop",) exits. Any error ends the
process with its message on stderr: rank 0 notices the exit and fails the group (a rank that skipped a
pass would leave the collectives out of step). Exits as well when rank 0 goes away (stdin EOF; while busy,
PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import struct
import sys
import traceback


def _read_exact(fd: int, n: int) -> bytes:
    """n bytes from fd; EOFError when rank 0 closed the pipe (it is gone or done)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise EOFError
        got += k
    return bytes(buf)


def receive(fd: int = 0):
    """The next message from rank 0."""
    (n,) = struct.unpack("<Q", _read_exact(fd, 8))
    return pickle.loads(_read_exact(fd, n))


def serve(rank: int, device: str) -> None:
    from pie.distributed import all_gather_object
    from pie.drivers.executor import ModelExecutor
    from pie.drivers.tp import rank_ops

    executor = None
    while True:
        msg = receive()
        kind = msg[0]
        if kind == "build":
            executor = None
            executor = ModelExecutor(dataclasses.replace(msg[1], device=device))
        elif kind == "forward":
            executor.launch(
                msg[1], checked=True
            )  # rank 0 checked it, and waits for the results; the collectives keep us in step
        elif kind == "page_ops":
            nbytes = executor.page_mover.page_nbytes
            res = executor.page_ops(rank_ops(msg[1], rank, nbytes))
            all_gather_object(res.data)
        elif kind == "prepare_graph":
            if executor.graphs is not None:
                executor.graphs.prepare(msg[1])
        elif kind == "time_collectives":
            from pie.distributed import time_step_collectives

            time_step_collectives(*msg[1])
        elif kind == "release":
            executor = None
        elif kind == "stop":
            return
        else:
            raise RuntimeError(f"unknown message {kind!r} from rank 0")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pie.drivers.tp_worker")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--init-method", required=True)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--parent-pid", type=int)
    args = p.parse_args(argv)
    from pie.cli.logs import configure as configure_logging

    configure_logging()
    if args.parent_pid is not None:
        from pie.drivers.dev.server import die_with_parent

        die_with_parent(args.parent_pid)
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 owns our lifetime
    from pie.distributed import destroy_tp, init_tp
    from pie.drivers.executor import resolve_device

    try:
        init_tp(args.rank, args.size, resolve_device(args.device), args.init_method, args.timeout_s)
        serve(args.rank, args.device)
    except EOFError:  # rank 0 is gone: nothing left to do
        os._exit(3)
    except Exception as e:
        print(f"rank {args.rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        traceback.print_exc()
        # the last line is what rank 0 quotes
        print(f"rank {args.rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    destroy_tp()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (CUDA / NCCL state of a finished rank)


if __name__ == "__main__":
    sys.exit(main())
