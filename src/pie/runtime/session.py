"""The channel between a running inferlet and the client that launched it (Pie's `inferlet.session`).

`pie serve` gives each process one (pie.server.processes); `Engine.run_inferlet(..., session=...)`
puts it on the inferlet's scope, and `inferlet.session` reaches it through current_scope().session.
Under `pie run` there is no client and the scope's session is None.
"""

from __future__ import annotations

from typing import Protocol

from pie.errors import PieError


class SessionChannel(Protocol):
    def send(self, message: str) -> None:
        """A `message` event to the client (never blocks; the server buffers it)."""

    def send_file(self, data: bytes, name: str | None = None) -> None:
        """A file to the client (chunked and hashed on the wire)."""

    async def receive(self) -> str:
        """The next message the client signalled to this process (signal_process)."""

    async def receive_file(self) -> bytes:
        """The next file the client transferred to this process (transfer_file)."""


class NoSessionError(PieError):
    """inferlet.session used by an inferlet that no client launched."""


def require_session(session: SessionChannel | None) -> SessionChannel:
    if session is None:
        raise NoSessionError(
            "inferlet.session needs a client: this inferlet was not launched through `pie serve` "
            "(under `pie run` there is nobody to send to or receive from)"
        )
    return session
