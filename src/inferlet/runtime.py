"""Pie's `inferlet.runtime`: version, instance_id, username, models, and launch (a child inferlet).

    child = runtime.launch("./callee.py", {"n": 3})   # a built-in name, a .py path, or an installed module
    text = await child                                  # its result (ChildError if it failed / was cancelled)
    child.cancel()                                      # ends it; its contexts' pages are freed

A child runs as another inferlet on the same engine, with its own scope (its contexts, subscriptions and
children are its own) and no client session (as in Pie, it is detached from the caller's client). Unlike
Pie, where dropping the handle detaches the child for good, a child still running when its parent ends is
cancelled: nothing an inferlet starts outlives it.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import uuid

import pie
from pie.errors import PieError
from pie.inferlets.loader import BUILTINS, InferletError
from pie.runtime.scope import current_scope
from pie.runtime.session import NoSession
from pie.sdk import runtime as _pie_runtime


def version() -> str:
    """pie's version."""
    return pie.__version__


def instance_id() -> str:
    """An identifier of the running engine (unique among engines alive on this host)."""
    return f"pie-{os.getpid()}-{id(current_scope().engine):x}"


def username() -> str:
    """The user the engine runs as."""
    return getpass.getuser()


def models() -> list[str]:
    """Names of the served models (the first is the default)."""
    return _pie_runtime.models()


class ChildError(PieError):
    """A launched child inferlet failed or was cancelled."""


class Child:
    """Handle to a launched child inferlet: `await child` (or `await child.wait()`) gives its result;
    waiting never cancels it (a timeout around wait() leaves it running), cancel() does."""

    __slots__ = ("_task", "_pid", "_program", "__weakref__")

    def __init__(self, task: asyncio.Task, pid: str, program: str) -> None:
        self._task = task
        self._pid = pid
        self._program = program

    def pid(self) -> str:
        """Process id (a UUID) of the child, for logs."""
        return self._pid

    def done(self) -> bool:
        """The child has finished (returned, failed or been cancelled)."""
        return self._task.done()

    def get(self) -> str | None:
        """The result if the child has finished, else None (ChildError if it failed or was cancelled)."""
        return self._outcome() if self._task.done() else None

    async def wait(self) -> str:
        """Wait for the child's result without consuming the handle (cancel() still works after)."""
        await asyncio.wait([self._task])  # unlike `await task`, being cancelled here leaves the child running
        return self._outcome()

    def __await__(self):
        return self.wait().__await__()

    def cancel(self) -> None:
        """End the child if it still runs (idempotent); its contexts' pages are freed as it unwinds."""
        self._task.cancel()

    close = cancel  # the parent's scope closes running children when the parent ends

    def _outcome(self) -> str:
        if self._task.cancelled():
            raise ChildError(f"child inferlet {self._program!r} ({self._pid}) was cancelled")
        err = self._task.exception()
        if err is not None:
            raise ChildError(f"child inferlet {self._program!r} failed: {type(err).__name__}: {err}") from err
        return self._task.result()

    def __repr__(self) -> str:
        state = "done" if self._task.done() else "running"
        return f"Child({self._program!r}, pid={self._pid}, {state})"


def launch(program: str, input: str | dict | None = None) -> Child:
    """Start `program` as a child inferlet on this engine and return its handle.

    program: a built-in name (text-completion, raw-completion; Pie's `name@version` form works for them),
    the path of a .py file, or an installed Python module with `async def main(input)`. input: the child's
    input dict, or its JSON text (Pie passes a string).
    """
    scope = current_scope()
    args = _input_dict(input)
    target = program
    if isinstance(program, str) and "@" in program and program.split("@", 1)[0] in BUILTINS:
        target = program.split("@", 1)[0]  # Pie names programs name@version; a built-in has one version
    try:
        task = scope.engine.spawn_inferlet(
            target,
            args,
            model=scope.default_model,
            session=NoSession("a launched inferlet is detached from its parent's client session (as in Pie)"),
        )
    except InferletError as e:
        raise InferletError(f"runtime.launch({program!r}): {e}") from None
    child = Child(task, str(uuid.uuid4()), str(program))
    scope.track(child)
    task.add_done_callback(lambda _t, child=child: scope.untrack(child))
    return child


def _input_dict(input: str | dict | None) -> dict:
    if input is None:
        return {}
    if isinstance(input, dict):
        return dict(input)
    if isinstance(input, str):
        if not input.strip():
            return {}
        try:
            value = json.loads(input)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"runtime.launch input is not valid JSON ({e}); pass a dict or a JSON object"
            ) from None
        if isinstance(value, dict):
            return value
    raise TypeError(
        f"runtime.launch input must be a dict or a JSON object's text, got {type(input).__name__}"
    )
