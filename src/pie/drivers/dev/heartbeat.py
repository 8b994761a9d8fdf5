"""Liveness of the dev driver's child, out of band of the request channel.

The child's main thread serves one forward at a time, so a ping on the request socket would
queue behind a long (legitimate) batch. Instead a daemon thread in the child writes one byte to
a pipe every `interval` seconds; it keeps beating while the main thread computes (torch releases
the GIL), and stops when the process is stopped (SIGSTOP), deadlocked in the interpreter, or gone.
The parent watches the pipe: no beat for `timeout` seconds after the first one means the child is
wedged (before the first beat the child is starting up, and ready_timeout_s applies).

    child:   python -m pie.drivers.dev.server --fd N --heartbeat-fd M --heartbeat-s S
    parent:  HeartbeatMonitor(read_fd).stale_for() -> seconds since the last beat
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

# Beats per timeout: a few missed beats (a busy machine) never trip it.
BEATS_PER_TIMEOUT = 4


def beat_interval(timeout_s: float) -> float:
    return timeout_s / BEATS_PER_TIMEOUT


def start_beating(fd: int, interval_s: float) -> threading.Thread:
    """Child side: a daemon thread writing b'.' to `fd` every interval_s until the pipe breaks."""

    def run() -> None:
        try:
            while True:
                os.write(fd, b".")
                time.sleep(interval_s)
        except OSError:
            pass  # the parent closed its end: it is gone or shutting us down

    thread = threading.Thread(target=run, name="pie-heartbeat", daemon=True)
    thread.start()
    return thread


class HeartbeatMonitor:
    """Parent side: reads beats from the pipe's read end on the event loop."""

    def __init__(self, read_fd: int):
        self.fd = read_fd
        os.set_blocking(read_fd, False)
        # None until the first beat: before it the child is still starting (interpreter, imports),
        # which ready_timeout_s bounds; watching from spawn would misfire on a slow, loaded machine.
        self.last_beat: float | None = None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(read_fd, self._on_readable)
        self._open = True

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.last_beat = time.monotonic()
        else:  # EOF: the child exited; the exit watcher reports it
            self._loop.remove_reader(self.fd)

    def stale_for(self) -> float:
        """Seconds since the last beat (0 before the first one)."""
        return 0.0 if self.last_beat is None else time.monotonic() - self.last_beat

    def close(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self.fd)
            os.close(self.fd)
