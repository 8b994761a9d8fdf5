"""The `dev` driver: the shared ModelExecutor in a subprocess, under any Python/venv (CPU or GPU).

    client.py       DevDriver (the Driver the runtime uses; asyncio)
    server.py       the child process (`python -m pie.drivers.dev.server --fd N`)
    wire.py         length-prefixed msgpack frames and the message set
    interpreter.py  which Python runs the child (resolve_python) and its environment

Kept import-light on purpose: the child imports pie.drivers.dev.server, whose venv may have
only torch/numpy/msgpack; DevDriver is loaded on first access.
"""

from __future__ import annotations

__all__ = ["DevDriver"]


def __getattr__(name: str):
    if name == "DevDriver":
        from pie.drivers.dev.client import DevDriver

        return DevDriver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
