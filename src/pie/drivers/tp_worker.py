"""A tensor-parallel rank other than 0 (started by pie.drivers.tp.TPGroup; not run by hand):

    python -m pie.drivers.tp_worker --rank R --size N --device D --init-method URL [--timeout-s S]

Joins the group, then follows rank 0's broadcast messages: ("build", spec) builds this rank's shard of the
model (a later build replaces it), ("forward", batch) runs the same forward pass, ("page_ops", ops)
applies its slice of the page ops, ("release",) drops the model, ("stop",) exits. Any error ends the
process with its message on stderr: rank 0 notices the exit and fails the group (a rank that skipped a
pass would leave the collectives out of step). Exits as well when rank 0 goes away (stdin EOF).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import traceback


def _exit_with_parent() -> None:
    """Rank 0 holds our stdin's write end: EOF means it is gone, and a rank alone has nothing to do."""

    def wait() -> None:
        sys.stdin.buffer.read()
        os._exit(3)

    threading.Thread(target=wait, name="pie-tp-parent", daemon=True).start()


def serve(rank: int, device: str) -> None:
    from pie.distributed import all_gather_object, broadcast_object
    from pie.drivers.executor import ModelExecutor
    from pie.drivers.tp import rank_ops

    executor = None
    while True:
        msg = broadcast_object(None)
        kind = msg[0]
        if kind == "build":
            executor = None
            executor = ModelExecutor(dataclasses.replace(msg[1], device=device))
        elif kind == "forward":
            executor.launch(msg[1])  # rank 0 waits for the results; the collectives keep us in step
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
    _exit_with_parent()
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 owns our lifetime
    from pie.distributed import destroy_tp, init_tp
    from pie.drivers.executor import resolve_device

    try:
        init_tp(args.rank, args.size, resolve_device(args.device), args.init_method, args.timeout_s)
        serve(args.rank, args.device)
    except Exception as e:
        print(f"rank {args.rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        traceback.print_exc()
        # the last line is what rank 0 quotes
        print(f"rank {args.rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    destroy_tp()
    sys.stderr.flush()
    os._exit(0)  # not a normal exit: the stdin watcher thread holds stdin's lock


if __name__ == "__main__":
    sys.exit(main())
