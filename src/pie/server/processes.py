"""Running inferlets ("processes" in Pie's protocol): launch, events, signals, files, termination.

A process is one Engine.run_inferlet task. What it produces reaches the client as process_event
messages: stdout / stderr (its print()s), message (session.send), file (session.send_file), and
finally return (its result) or error. Events go to the attached connection's listener; while none is
attached (a detached process, or between a disconnect and an attach) they wait in a bounded backlog
that attach replays. A process whose client disconnects is cancelled unless it was launched detached
(capture_outputs = false); cancelling one frees its contexts' pages (the scope closes them).
"""

from __future__ import annotations

import asyncio
import collections
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from pie.errors import PieError
from pie.server.capture import current_sink

Listener = Callable[[dict], None]  # takes a server frame (dict) to send; never blocks
MAX_BACKLOG = 10_000  # events kept for a process nobody is attached to
KEEP_FINISHED_S = 600.0  # a finished, undelivered process stays attachable this long


class Busy(PieError):
    """The server is at its process limit: try later (HTTP 429, a launch error over the WS)."""


class Channel:
    """The session channel of one process (pie.runtime.session.SessionChannel)."""

    def __init__(self, proc: Process, max_queue: int) -> None:
        self.proc = proc
        self.messages: asyncio.Queue[str] = asyncio.Queue(max_queue)
        self.files: asyncio.Queue[bytes] = asyncio.Queue(max_queue)

    def send(self, message: str) -> None:
        self.proc.emit("message", message)

    def send_file(self, data: bytes, name: str | None = None) -> None:
        self.proc.emit_file(data, name)

    async def receive(self) -> str:
        return await self.messages.get()

    async def receive_file(self) -> bytes:
        return await self.files.get()


@dataclass(eq=False)
class Process:
    id: str
    owner: str
    program: str
    input: dict
    detached: bool
    started: float = field(default_factory=time.time)
    task: asyncio.Task | None = None
    listener: Listener | None = None
    backlog: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_BACKLOG))
    finished_at: float | None = None
    channel: Channel | None = None
    partial: dict = field(default_factory=dict)  # stream -> text written since its last newline

    def write(self, stream: str, text: str) -> None:
        """print() output: one stdout/stderr event per line (the rest waits for its newline or the end)."""
        buf = self.partial.get(stream, "") + text
        head, nl, tail = buf.rpartition("\n")
        if nl:
            self.emit(stream, head + nl)
        self.partial[stream] = tail

    def flush_output(self) -> None:
        for stream, text in self.partial.items():
            if text:
                self.emit(stream, text)
        self.partial.clear()

    def _frame(self, frame: dict) -> None:
        if self.listener is not None:
            self.listener(frame)
        else:
            self.backlog.append(frame)

    def emit(self, event: str, value: str) -> None:
        self._frame({"type": "process_event", "process_id": self.id, "event": event, "value": value})

    def emit_file(self, data: bytes, name: str | None) -> None:
        from pie.server.frames import file_frames

        for frame in file_frames(self.id, data, name):
            self._frame(frame)

    def attach(self, listener: Listener) -> None:
        self.listener = listener
        while self.backlog:
            listener(self.backlog.popleft())

    def stats(self) -> dict:
        return {
            "id": self.id,
            "username": self.owner,
            "program": self.program,
            "arguments": [f"{k}={v}" for k, v in self.input.items()],
            "elapsed_secs": round(time.time() - self.started, 3),
            "detached": self.detached,
            "running": self.finished_at is None,
        }


class ProcessTable:
    """Every process of the server, with the limits that keep it from taking more than it can run."""

    def __init__(self, engine, max_processes: int, max_per_user: int, max_inbox: int = 256) -> None:
        self.engine = engine
        self.max_processes, self.max_per_user, self.max_inbox = max_processes, max_per_user, max_inbox
        self.procs: dict[str, Process] = {}
        self.accepting = True

    def running(self, owner: str | None = None) -> list[Process]:
        return [
            p for p in self.procs.values() if p.finished_at is None and (owner is None or p.owner == owner)
        ]

    def launch(
        self, owner: str, program: str, main, input: dict, listener: Listener | None, model=None
    ) -> Process:
        self._forget_old()
        if not self.accepting:
            raise Busy("the server is shutting down and accepts no new processes")
        if len(self.running()) >= self.max_processes:
            raise Busy(f"the server runs its limit of {self.max_processes} processes; try again later")
        if len(self.running(owner)) >= self.max_per_user:
            raise Busy(f"user {owner!r} runs their limit of {self.max_per_user} processes; try again later")
        proc = Process(str(uuid.uuid4()), owner, program, input, detached=listener is None, listener=listener)
        proc.channel = Channel(proc, self.max_inbox)
        self.procs[proc.id] = proc
        proc.task = asyncio.get_running_loop().create_task(self._run(proc, main, model))
        return proc

    async def _run(self, proc: Process, main, model) -> None:
        current_sink.set(proc.write)  # this task's context: print() inside the inferlet -> events
        try:
            result = await self.engine.run_inferlet(main, proc.input, model=model, session=proc.channel)
            proc.flush_output()
            proc.emit("return", result)
        except asyncio.CancelledError:
            proc.flush_output()
            proc.emit("error", "process terminated")
        except PieError as e:
            proc.flush_output()
            proc.emit("error", str(e))
        except Exception as e:
            proc.flush_output()  # the program's own failure: its message and where, as `pie run` says it
            proc.emit("error", f"{type(e).__name__}: {e}\n{_where(e)}")
        finally:
            proc.finished_at = time.time()
            if proc.listener is not None:  # delivered: nothing left to attach to
                self.procs.pop(proc.id, None)

    def get(self, pid: str, owner: str) -> Process:
        proc = self.procs.get(pid) if isinstance(pid, str) else None
        if proc is None or proc.owner != owner:  # another user's process does not exist for this one
            raise PieError(f"no process {pid!r} of user {owner!r}")
        return proc

    def terminate(self, proc: Process) -> None:
        if proc.task is not None and not proc.task.done():
            proc.task.cancel()

    def detach_listener(self, listener: Listener) -> None:
        """A connection went away: its processes are cancelled unless launched detached."""
        for proc in list(self.procs.values()):
            if proc.listener == listener:  # bound methods: equal, never identical
                if proc.finished_at is not None:
                    self.procs.pop(proc.id, None)
                elif proc.detached:
                    proc.listener = None  # an attached detached process: back to the backlog
                else:
                    proc.listener = _discard  # nobody will read its events; it is removed when it ends
                    self.terminate(proc)

    def _forget_old(self) -> None:
        now = time.time()
        for pid, p in list(self.procs.items()):
            if p.finished_at is not None and now - p.finished_at > KEEP_FINISHED_S:
                del self.procs[pid]

    async def drain(self, timeout: float) -> int:
        """Stop accepting, let running processes finish for `timeout` s, then cancel the rest."""
        self.accepting = False
        tasks = [p.task for p in self.running() if p.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
            return len(pending)
        return 0


def _discard(_frame: dict) -> None:
    pass


def _where(e: BaseException) -> str:
    """The innermost frame of the program's own source (not pie's)."""
    frames = [
        f for f in traceback.extract_tb(e.__traceback__) if "/pie/" not in f.filename.replace("\\", "/")
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f"  at {f.filename}:{f.lineno} in {f.name}"
