"""The client session of an inferlet: what Pie's `inferlet.session` talks to.

Contract (what a front end plugs in; `Engine.run_inferlet(..., session=...)` hands it to the inferlet's scope):

    send(message: str)            a text message to the client, in order; must not block (queue it)
    send_file(data: bytes)        a file to the client, in order with the messages
    await receive() -> str        the client's next text message; waits for one; raises PieError when the
                                  client can send no more (closed, or none attached)
    await receive_file() -> bytes the client's next file, likewise

Calls come from the inferlet's task on the engine's event loop. `pie run` plugs in StdioSession (below); a
server plugs in one per connection, e.g. a CallbackSession whose callbacks write to the client's socket and
whose deliver()/deliver_file() it calls with what the client sends. Inferlets launched by other inferlets
have no client: their session is NoSession, whose calls say so.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Protocol

from pie.errors import PieError


class SessionError(PieError):
    """The session cannot do what the inferlet asked (no client, the client closed its input...)."""


class Session(Protocol):
    def send(self, message: str) -> None: ...

    def send_file(self, data: bytes) -> None: ...

    async def receive(self) -> str: ...

    async def receive_file(self) -> bytes: ...


class NoSession:
    """No client attached (a launched child inferlet, or Engine.run_inferlet without session=)."""

    def __init__(self, why: str = "this inferlet has no client session") -> None:
        self.why = why

    def _fail(self, what: str):
        raise SessionError(f"session.{what}: {self.why}")

    def send(self, message: str) -> None:
        self._fail("send")

    def send_file(self, data: bytes) -> None:
        self._fail("send_file")

    async def receive(self) -> str:
        self._fail("receive")

    async def receive_file(self) -> bytes:
        self._fail("receive_file")


class CallbackSession:
    """A session for front ends: sends go to callbacks; the client's messages and files are handed in with
    deliver() / deliver_file() and wait in order until the inferlet receives them; close() makes waiting
    and later receives raise SessionError (the client went away)."""

    def __init__(self, on_message, on_file=None) -> None:
        self.on_message = on_message  # (str) -> None, called in order, must not block
        self.on_file = on_file  # (bytes) -> None; None: sending files is an error
        self._messages: asyncio.Queue = asyncio.Queue()
        self._files: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def send(self, message: str) -> None:
        self.on_message(message)

    def send_file(self, data: bytes) -> None:
        if self.on_file is None:
            raise SessionError("session.send_file: this client does not take files")
        self.on_file(data)

    def deliver(self, message: str) -> None:
        self._messages.put_nowait(message)

    def deliver_file(self, data: bytes) -> None:
        self._files.put_nowait(bytes(data))

    def close(self) -> None:
        self.closed = True
        for q in (self._messages, self._files):
            q.put_nowait(None)  # wakes a waiting receive

    async def receive(self) -> str:
        return await self._get(self._messages, "receive")

    async def receive_file(self) -> bytes:
        return await self._get(self._files, "receive_file")

    async def _get(self, q: asyncio.Queue, what: str):
        if self.closed and q.empty():
            raise SessionError(f"session.{what}: the client has closed the session")
        item = await q.get()
        if item is None:
            q.put_nowait(None)  # keep later receives failing too
            raise SessionError(f"session.{what}: the client has closed the session")
        return item


class StdioSession:
    """`pie run`'s session: sends are written verbatim (no newline added) to `out` (stderr, or stdout with
    `pie run --stream`) and flushed, so token deltas stream; files sent are written to a temporary folder
    and their path is announced on stderr. receive() reads one line of stdin (without its newline) when
    stdin is not a terminal (`echo hi | pie run agent.py`); receive_file() reads one line naming a file and
    returns its bytes."""

    def __init__(self, out: IO[str], inp: IO[str] | None = None, err: IO[str] | None = None) -> None:
        self.out = out
        self.inp = inp if inp is not None else sys.stdin
        self.err = err if err is not None else sys.stderr
        self._files_dir: Path | None = None
        self._num_files = 0
        self._lock = asyncio.Lock()  # one reader of stdin at a time, so lines arrive in order
        self.at_line_start = True  # the last message sent ended a line (pie run puts the result on its own)

    def send(self, message: str) -> None:
        self.out.write(message)
        self.out.flush()
        if message:
            self.at_line_start = message.endswith("\n")

    def send_file(self, data: bytes) -> None:
        if self._files_dir is None:
            self._files_dir = Path(tempfile.mkdtemp(prefix="pie-run-files-"))
        self._num_files += 1
        path = self._files_dir / f"file-{self._num_files}.bin"
        path.write_bytes(bytes(data))
        print(f"pie: the inferlet sent a file ({len(data)} bytes): {path}", file=self.err, flush=True)

    async def receive(self) -> str:
        if self.inp is None or self.inp.closed:
            raise SessionError("session.receive: stdin is closed; pipe the client's messages into `pie run`")
        if _isatty(self.inp):
            raise SessionError(
                "session.receive reads the client's messages as lines of stdin, and stdin is a terminal; "
                "pipe them in, e.g. `printf 'hello\\n' | pie run my_inferlet.py`"
            )
        async with self._lock:
            line = await asyncio.to_thread(self.inp.readline)
        if not line:
            raise SessionError("session.receive: stdin ended (the client sent no more lines)")
        return line[:-1] if line.endswith("\n") else line

    async def receive_file(self) -> bytes:
        name = (await self.receive()).strip()
        path = Path(name).expanduser()
        if not path.is_file():
            raise SessionError(
                f"session.receive_file: under `pie run` the client sends a file as a line of stdin naming "
                f"it, and {name!r} is not a file"
            )
        return await asyncio.to_thread(path.read_bytes)


def _isatty(stream: IO[str]) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):  # a StringIO or a closed pipe: not a terminal
        return False
