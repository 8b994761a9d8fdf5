"""The dev driver's child process: builds a ModelExecutor and serves forward passes and page ops over a socket.

    python -m pie.drivers.dev.server --fd N [--executor module:callable]
        [--heartbeat-fd M --heartbeat-s S] [--parent-pid P]

fd N is this end of a connected socketpair (passed with pass_fds); stdout/stderr are plain
logs that the parent captures. One thread, one request at a time, in arrival order: the
parent may pipeline several forwards and page ops, the executor still sees them serially and in order
(the Driver contract).

A forward that raises (a BatchError, a ValueError from the model code, ...) is answered with an
error for that request only and the server keeps serving; only the channel closing, a shutdown
message or the process dying ends it.

Liveness is out of band (pie.drivers.dev.heartbeat): a thread beats on the --heartbeat-fd pipe
while the main thread computes. With --parent-pid the child dies with its parent (Linux
PR_SET_PDEATHSIG), so a parent killed mid-shutdown never leaves a driver behind.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable

from pie.drivers.dev import wire
from pie.drivers.dev.heartbeat import start_beating
from pie.drivers.protocol import PROTOCOL_VERSION, BatchError, ForwardBatch, PageOps
from pie.drivers.spec import ExecutorSpec
from pie.errors import PieError

# ModelExecutor, or at tensor_parallel_size > 1 this process as rank 0 of a group it starts (pie.drivers.tp)
DEFAULT_EXECUTOR = "pie.drivers.tp:build_executor"


def log(msg: str) -> None:
    print(f"dev server: {msg}", file=sys.stderr, flush=True)


def load_factory(target: str) -> Callable:
    """`module:callable` -> the callable; errors name the target and the reason."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--executor must look like module:callable, got {target!r}")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name} ({module.__file__}) has no attribute {attr!r}") from None


def handshake(chan: wire.SyncChannel, executor_target: str):
    """Answer the hello; returns the executor, or None after reporting an error to the parent."""
    msg = chan.recv()
    if msg is None:
        raise EOFError("the parent closed the channel before hello")
    if msg["type"] != "hello":
        chan.send(wire.error(f"expected hello, got {msg['type']!r}"))
        return None
    if msg.get("version") != PROTOCOL_VERSION:
        chan.send(
            wire.error(
                f"protocol version mismatch: the pie client speaks version {msg.get('version')}, this dev "
                f"driver ({__file__}) speaks version {PROTOCOL_VERSION}; run both from the same pie install"
            )
        )
        return None
    try:
        spec = ExecutorSpec.from_wire(msg["spec"])
        executor = load_factory(executor_target)(spec, progress=True)
        caps = executor.capabilities
    except Exception as e:
        tb = traceback.format_exc()
        # A PieError's message is written for users; anything else needs its traceback to be fixed.
        message = str(e) if isinstance(e, PieError) else f"{type(e).__name__}: {e}"
        log(f"startup failed: {message}" if isinstance(e, PieError) else f"startup failed:\n{tb}")
        chan.send(wire.error(message, traceback=tb, kind=type(e).__name__))
        return None
    chan.send(wire.ready(PROTOCOL_VERSION, caps))
    log(f"ready: {caps.architecture} on {caps.device} ({caps.dtype}), {caps.num_pages} KV pages")
    return executor


def serve(chan: wire.SyncChannel, executor) -> int:
    """Forward loop. Returns the exit status."""
    while True:
        msg = chan.recv()
        if msg is None:
            raise EOFError("the parent closed the channel")
        kind = msg["type"]
        if kind == "shutdown":
            chan.send(wire.bye())
            return 0
        if kind not in ("forward", "page_ops"):
            chan.send(wire.error(f"unexpected message {kind!r} after the handshake", id=msg.get("id")))
            continue
        rid = msg["id"]
        try:
            if kind == "forward":
                reply = wire.result(rid, executor.execute(ForwardBatch.from_wire(msg["batch"])))
            else:
                reply = wire.page_result(rid, executor.page_ops(PageOps.from_wire(msg["ops"])))
        except Exception as e:
            # A bad batch is the caller's problem: one line. Anything else: the traceback, for debugging.
            tb = "" if isinstance(e, BatchError) else traceback.format_exc()
            log(f"{kind} {rid} failed: {type(e).__name__}: {e}" + (f"\n{tb}" if tb else ""))
            chan.send(wire.error(str(e), id=rid, traceback=tb, kind=type(e).__name__))
            continue
        chan.send(reply)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL us when the parent dies (Linux); exit now if it already has. No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before prctl took effect
        log("parent is gone; exiting")
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pie.drivers.dev.server")
    parser.add_argument("--fd", type=int, required=True, help="this end of the socketpair to the parent")
    parser.add_argument("--executor", default=DEFAULT_EXECUTOR, help="module:callable building the executor")
    parser.add_argument("--heartbeat-fd", type=int, help="write end of the parent's liveness pipe")
    parser.add_argument("--heartbeat-s", type=float, default=1.0, help="seconds between heartbeats")
    parser.add_argument("--parent-pid", type=int, help="die with this process (Linux)")
    args = parser.parse_args(argv)
    from pie.cli.logs import configure as configure_logging

    configure_logging()  # the parent's -v level, from $PIE_LOG_LEVEL; records go to our (echoed) stderr
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    if args.heartbeat_fd is not None:
        start_beating(args.heartbeat_fd, args.heartbeat_s)  # from now on, through the model load
    # Ctrl-C reaches the whole process group; the parent owns our lifetime (shutdown message or
    # EOF), so a terminal interrupt must not kill us mid-forward with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        chan = wire.SyncChannel(socket.socket(fileno=args.fd))
    except OSError as e:
        log(f"fd {args.fd} is not a socket from the parent: {e}")
        return 2
    try:
        executor = handshake(chan, args.executor)
        if executor is None:
            return 1
        try:
            return serve(chan, executor)
        finally:
            close = getattr(executor, "close", None)  # tensor parallel: stop the other ranks
            if close is not None:
                close()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log("parent closed the channel; exiting")
        return 0
    except wire.ProtocolError as e:
        log(f"protocol error: {e}")
        return 2
    finally:
        chan.close()


if __name__ == "__main__":
    sys.exit(main())
