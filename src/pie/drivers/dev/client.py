"""DevDriver: runs the shared ModelExecutor in a child process and talks to it over a socketpair.

Lifecycle: start() spawns `python -m pie.drivers.dev.server --fd N` under the resolved interpreter,
sends hello and waits for ready; forward() and page_ops() pipeline requests on one channel (ids -> futures,
one reader task; the child answers them in order);
shutdown() asks politely, then kills. The child's stdout+stderr go through one pipe into a ring
buffer (for error messages) and on to our stderr, prefixed `[dev-driver] `.

Invariant: once the child is gone (exit, crash, kill, closed channel), every forward in flight
and every later one fails promptly with a DriverError naming the exit status and the output tail.
Two watchers make that hold: the socket reader (EOF) and proc.wait() (exit); whichever fires first.
A child that is alive but wedged (stopped, deadlocked) stops its heartbeat (a thread beside the
model, pie.drivers.dev.heartbeat, so a long batch keeps beating): after heartbeat_timeout_s without
one it is killed, which the two watchers then report. shutdown() asks the child to exit, then
sends SIGTERM after shutdown_timeout_s and SIGKILL after a further grace; the child also dies with
its parent (Linux), so no driver outlives pie.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from pie.drivers.base import Driver
from pie.drivers.dev import wire
from pie.drivers.dev.heartbeat import HeartbeatMonitor, beat_interval
from pie.drivers.dev.interpreter import child_env, choose_another_hint, missing_module, resolve_python
from pie.drivers.dev.server import DEFAULT_EXECUTOR
from pie.drivers.protocol import (
    PROTOCOL_VERSION,
    BatchError,
    Capabilities,
    ForwardBatch,
    ForwardResult,
    PageOps,
    PageOpsResult,
)
from pie.drivers.spec import ExecutorSpec
from pie.errors import DriverError

PREFIX = "[dev-driver] "
TAIL_LINES = 40
# After the child's exit, how long to wait for its last output / last frames to arrive.
DRAIN_S = 1.0


def describe_status(rc: int | None) -> str:
    """'status -9 (killed by SIGKILL)', 'status 3', or 'status unknown'."""
    if rc is None:
        return "status unknown"
    if rc < 0:
        try:
            return f"status {rc} (killed by {signal.Signals(-rc).name})"
        except ValueError:
            return f"status {rc} (killed by signal {-rc})"
    return f"status {rc}"


class OutputTail:
    """Echoes the child's output to our stderr with a line prefix and keeps the last lines.

    Carriage returns (progress bars) are echoed as-is so a terminal redraws in place; the ring
    buffer keeps only each line's final \\r-segment, i.e. what the terminal ends up showing.
    """

    def __init__(self, maxlen: int = TAIL_LINES, echo=None):
        self.lines: collections.deque[str] = collections.deque(maxlen=maxlen)
        self._partial = ""
        self._at_line_start = True
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._echo = echo if echo is not None else sys.stderr

    def feed(self, chunk: bytes) -> None:
        text = self._decoder.decode(chunk).replace("\r\n", "\n")
        out = []
        for part in re.split(r"([\r\n])", text):
            if part in ("\r", "\n"):
                out.append(part)
                self._at_line_start = True
                if part == "\n":
                    self.lines.append(self._partial)
                self._partial = ""
            elif part:
                if self._at_line_start:
                    out.append(PREFIX)
                    self._at_line_start = False
                out.append(part)
                self._partial += part
        if out:
            self._echo.write("".join(out))
            self._echo.flush()

    def close(self) -> None:
        self.feed(self._decoder.decode(b"", final=True).encode())
        if self._partial:
            self.lines.append(self._partial)
            self._partial = ""
        if not self._at_line_start:
            self._echo.write("\n")
            self._at_line_start = True

    def text(self) -> str:
        lines = list(self.lines) + ([self._partial] if self._partial else [])
        if not lines:
            return "(the dev driver printed nothing)"
        return f"last {len(lines)} lines of dev driver output:\n" + "\n".join("  | " + ln for ln in lines)


class DevDriver(Driver):
    """A Driver whose ModelExecutor runs in a subprocess (any venv; CPU or GPU)."""

    def __init__(
        self,
        spec: ExecutorSpec,
        python: str | None = None,
        venv: str | None = None,
        ready_timeout_s: float = 600.0,
        shutdown_timeout_s: float = 5.0,
        executor: str | None = None,
        heartbeat_timeout_s: float | None = 30.0,
    ):
        self.spec = spec
        self.python, self.venv = python, venv
        self.ready_timeout_s, self.shutdown_timeout_s = ready_timeout_s, shutdown_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s  # None: no liveness check
        self._heartbeat: HeartbeatMonitor | None = None
        self._wedged: str | None = None  # why the watchdog killed the child
        self.executor = executor or DEFAULT_EXECUTOR
        self.interpreter: str | None = None  # resolved at start()
        self.interpreter_rule: str | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.tail = OutputTail()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._tasks: dict[str, asyncio.Task] = {}
        self._dead: str | None = None  # why every forward now fails
        self._channel_error: str | None = None  # the reader's reason, when the channel broke
        self._closing = False

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> Capabilities:
        if self.proc is not None:
            raise DriverError("dev driver already started")
        self.interpreter, self.interpreter_rule = resolve_python(self.venv, self.python)
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        cmd = [self.interpreter, "-m", "pie.drivers.dev.server", "--fd", str(fd), "--executor", self.executor]
        cmd += ["--parent-pid", str(os.getpid())]
        pass_fds = [fd]
        beat_r = beat_w = None
        if self.heartbeat_timeout_s is not None:
            beat_r, beat_w = os.pipe()
            pass_fds.append(beat_w)
            cmd += [
                "--heartbeat-fd",
                str(beat_w),
                "--heartbeat-s",
                f"{beat_interval(self.heartbeat_timeout_s):g}",
            ]
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                env=child_env(),
            )
        except OSError as e:
            parent_sock.close()
            if beat_r is not None:
                os.close(beat_r)
            raise DriverError(
                f"cannot run the dev driver interpreter {self.interpreter} (chosen by {self.interpreter_rule}): {e}"
            ) from e
        finally:
            child_sock.close()  # the child holds its own copy; ours would hide its EOF
            if beat_w is not None:
                os.close(beat_w)
        try:
            self._reader, self._writer = await asyncio.open_connection(sock=parent_sock)
            self._tasks["output"] = asyncio.create_task(self._pump_output())
            self._tasks["exit"] = asyncio.create_task(self.proc.wait())
            if beat_r is not None:
                self._heartbeat = HeartbeatMonitor(beat_r)
                self._tasks["heartbeat"] = asyncio.create_task(self._watch_heartbeat())
            caps = await self._handshake()
        except BaseException:
            await self._kill()
            await self._wait_output()
            await self._close_all()
            raise
        self.capabilities = caps
        self._tasks["reader"] = asyncio.create_task(self._read_loop())
        self._tasks["watch"] = asyncio.create_task(self._watch())
        return caps

    async def _handshake(self) -> Capabilities:
        wire.write_frame(self._writer, wire.hello(PROTOCOL_VERSION, self.spec))
        read = asyncio.create_task(wire.read_frame(self._reader))
        exit_task = self._tasks["exit"]
        try:
            await asyncio.wait(
                {read, exit_task}, timeout=self.ready_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if exit_task.done() and not read.done():
                # It exited; a final error frame may still be in the socket buffer.
                await asyncio.wait({read}, timeout=DRAIN_S)
            if self._wedged is not None:  # the heartbeat watchdog killed it
                raise DriverError(await self._failure(self._wedged, status=False))
            if not read.done():
                if exit_task.done():
                    raise DriverError(await self._failure("exited before it was ready"))
                await self._kill()
                what = f"did not become ready within {self.ready_timeout_s:g} s (ready_timeout_s); killed it"
                raise DriverError(await self._failure(what, status=False))
            try:
                msg = read.result()
            except (wire.ProtocolError, ConnectionError) as e:
                raise DriverError(await self._failure(f"broke the protocol during the handshake: {e}")) from e
        finally:
            read.cancel()
        if msg is None:
            await self._wait_exit(DRAIN_S)
            raise DriverError(await self._failure("exited before it was ready"))
        if msg["type"] == "error":
            await self._wait_exit(DRAIN_S)
            raise DriverError(await self._failure(f"failed to start: {msg['message']}"))
        if msg["type"] != "ready":
            raise DriverError(await self._failure(f"answered hello with {msg['type']!r}"))
        if msg.get("version") != PROTOCOL_VERSION:
            raise DriverError(
                f"protocol version mismatch: the dev driver speaks version {msg.get('version')}, "
                f"this pie speaks version {PROTOCOL_VERSION}"
            )
        return Capabilities.from_wire(msg["capabilities"])

    async def shutdown(self) -> None:
        """Ask the child to exit; SIGTERM after shutdown_timeout_s, SIGKILL after DRAIN_S more.

        Idempotent. Forwards still in flight fail with DriverError ("shut down")."""
        if self.proc is None or self._closing:
            return
        self._closing = True
        if self._dead is None and self.proc.returncode is None:
            t0 = asyncio.get_running_loop().time()
            try:
                wire.write_frame(self._writer, wire.shutdown())
                await asyncio.wait_for(self._writer.drain(), self.shutdown_timeout_s)
            except (ConnectionError, TimeoutError):
                pass  # dead or wedged: the wait below decides
            left = max(0.0, self.shutdown_timeout_s - (asyncio.get_running_loop().time() - t0))
            if not await self._wait_exit(left):
                print(
                    f"{PREFIX}did not exit within {self.shutdown_timeout_s:g} s (shutdown_timeout_s); "
                    "terminating it",
                    file=sys.stderr,
                )
                self._signal(signal.SIGTERM)
                await self._wait_exit(DRAIN_S)  # a stopped process keeps SIGTERM pending: SIGKILL below
        await self._kill()
        watch = self._tasks.get("watch")
        if watch is not None:
            await watch  # fails anything still pending ("shut down")
        await self._wait_output()
        await self._close_all()

    async def _close_all(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.close()
        if self._writer is not None:
            self._writer.close()

    # ---- requests -----------------------------------------------------------------------------

    async def forward(self, batch: ForwardBatch) -> ForwardResult:
        msg = await self._request(lambda rid: wire.forward(rid, batch))
        if msg["type"] == "result":
            return ForwardResult.from_wire(msg["result"])
        if msg.get("kind") == "BatchError":
            raise BatchError(msg["message"])
        raise DriverError(f"dev driver: forward failed ({msg.get('kind') or 'error'}): {msg['message']}")

    async def page_ops(self, ops: PageOps) -> PageOpsResult:
        msg = await self._request(lambda rid: wire.page_ops(rid, ops))
        if msg["type"] == "page_result":
            return PageOpsResult.from_wire(msg["result"])
        if msg.get("kind") == "BatchError":
            raise BatchError(msg["message"])
        raise DriverError(f"dev driver: page ops failed ({msg.get('kind') or 'error'}): {msg['message']}")

    async def _request(self, make: Callable[[int], dict]) -> dict:
        """Send make(id) and wait for the child's answer to it (in order with every other request)."""
        if self.capabilities is None or self._writer is None:
            raise DriverError("dev driver is not running: call `await driver.start()` first")
        if self._dead is not None:
            raise DriverError(self._dead)
        if self._closing:
            raise DriverError("dev driver is shutting down")
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            wire.write_frame(self._writer, make(rid))
            await self._writer.drain()
            return await fut
        except ConnectionError:
            # The watcher is about to report the exit; its message says why.
            return await fut
        finally:
            self._pending.pop(rid, None)

    # ---- background tasks --------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Routes results/errors to their futures until EOF. Unknown ids are late answers to cancelled calls."""
        try:
            while (msg := await wire.read_frame(self._reader)) is not None:
                if msg["type"] == "bye":
                    return
                fut = self._pending.get(msg.get("id"))
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                elif msg["type"] == "error" and msg.get("id") is None:
                    print(f"{PREFIX}protocol error from the child: {msg['message']}", file=sys.stderr)
        except ConnectionError:
            pass  # the child died with requests unread (ECONNRESET): same as EOF
        except wire.ProtocolError as e:
            self._channel_error = f"{type(e).__name__}: {e}"

    async def _watch(self) -> None:
        """Waits for the child's exit or the channel's EOF, then fails everything pending."""
        exit_task, reader = self._tasks["exit"], self._tasks["reader"]
        await asyncio.wait({exit_task, reader}, return_when=asyncio.FIRST_COMPLETED)
        if not exit_task.done() and not self._closing:
            # Channel closed or broke but the process lingers: it is of no use any more. After an
            # EOF it is likely exiting (give it a moment, for its real status); after garbage, kill.
            if self._channel_error is not None or not await self._wait_exit(2 * DRAIN_S):
                await self._kill()
        # Results the child sent just before exiting still count.
        await asyncio.wait({reader}, timeout=DRAIN_S)
        reader.cancel()
        await self._wait_exit(None)
        if self._closing:
            self._dead = "dev driver was shut down"
        elif self._wedged is not None:
            self._dead = await self._failure(self._wedged, status=False)
        elif self._channel_error is not None:
            self._dead = await self._failure(f"broke the channel ({self._channel_error}); stopped it")
        else:
            self._dead = await self._failure(f"exited with {describe_status(self.proc.returncode)}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(DriverError(self._dead))

    async def _watch_heartbeat(self) -> None:
        """Kills a child whose heartbeat stopped (SIGSTOP, a deadlock); the exit watchers then fail its work."""
        timeout = self.heartbeat_timeout_s
        while self.proc.returncode is None:
            await asyncio.sleep(min(beat_interval(timeout), 1.0))
            stale = self._heartbeat.stale_for()
            if stale > timeout and self.proc.returncode is None and not self._closing:
                self._wedged = (
                    f"stopped answering: no heartbeat for {stale:.1f} s (heartbeat_timeout_s = {timeout:g}; "
                    f"stopped, or stuck in the interpreter); killed it"
                )
                print(f"{PREFIX}{self._wedged}", file=sys.stderr)
                await self._kill()
                return

    async def _pump_output(self) -> None:
        stream = self.proc.stdout
        while chunk := await stream.read(1 << 16):
            self.tail.feed(chunk)
        self.tail.close()

    # ---- helpers -----------------------------------------------------------------------------

    async def _wait_exit(self, timeout: float | None) -> bool:
        """True if the child has exited (waiting up to timeout seconds; None = forever)."""
        exit_task = self._tasks.get("exit")
        if exit_task is None:
            return True
        await asyncio.wait({exit_task}, timeout=timeout)
        return exit_task.done()

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            # os.kill, not proc.send_signal: Popen.send_signal polls first, and that poll can reap
            # the child under asyncio's watcher (which then reports status 255). A zombie takes
            # signals harmlessly and its pid is not reused before the watcher reaps it.
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    async def _kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self._signal(signal.SIGKILL)
            await self.proc.wait()

    async def _wait_output(self) -> None:
        """Let the output pump catch up with a child that has exited (bounded: a grandchild may hold the pipe)."""
        output = self._tasks.get("output")
        if output is not None:
            await asyncio.wait({output}, timeout=DRAIN_S)

    async def _failure(self, what: str, status: bool = True) -> str:
        """'dev driver (python, rule) <what>' + the output tail, once the output pipe has drained."""
        await self._wait_output()
        suffix = ""
        if status and self.proc is not None and self.proc.returncode is not None and "status" not in what:
            suffix = f" ({describe_status(self.proc.returncode)})"
        hint = ""
        module = missing_module("\n".join(self.tail.lines) + self.tail._partial)
        if module is not None:
            # The usual first-run failure: an interpreter without pie's dependencies.
            hint = (
                f"\n  {self.interpreter} cannot import {module!r}, which pie's dev driver needs: install "
                f"pie's dependencies there (`pie driver dev doctor --python {self.interpreter}` prints the "
                f"command), or {choose_another_hint()}"
            )
        return (
            f"dev driver {what}{suffix}\n"
            f"  interpreter: {self.interpreter} (chosen by {self.interpreter_rule}){hint}\n{self.tail.text()}"
        )
