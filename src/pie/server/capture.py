"""print() inside a served inferlet becomes its process's stdout/stderr events.

sys.stdout and sys.stderr are replaced once (while the server runs) by streams that write to the
sink in a contextvar, else to the real stream. A process sets the contextvar in its own task; asyncio
copies it into every task the inferlet creates, so concurrent inferlets never see each other's output.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from contextvars import ContextVar

Sink = Callable[[str, str], None]  # (event "stdout" | "stderr", text)

current_sink: ContextVar[Sink | None] = ContextVar("pie_output_sink", default=None)


class RoutingStream(io.TextIOBase):
    def __init__(self, event: str, real) -> None:
        self.event, self.real = event, real

    def write(self, text: str) -> int:
        sink = current_sink.get()
        if sink is None:
            return self.real.write(text)
        if text:
            sink(self.event, text)
        return len(text)

    def flush(self) -> None:
        if current_sink.get() is None:
            self.real.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return getattr(self.real, "encoding", "utf-8")

    def fileno(self) -> int:
        return self.real.fileno()


def install() -> Callable[[], None]:
    """Route sys.stdout/sys.stderr; returns the function that puts the real streams back."""
    out, err = sys.stdout, sys.stderr
    if isinstance(out, RoutingStream):
        return lambda: None
    sys.stdout, sys.stderr = RoutingStream("stdout", out), RoutingStream("stderr", err)

    def restore() -> None:
        sys.stdout, sys.stderr = out, err

    return restore
