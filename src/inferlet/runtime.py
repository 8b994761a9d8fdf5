"""Runtime introspection (Pie's `inferlet.runtime`): version, instance_id, username, models."""

from __future__ import annotations

import getpass
import os

import pie
from pie.runtime.scope import current_scope
from pie.sdk import runtime as _pie_runtime

from ._errors import unsupported


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


def launch(program: str, input: str | dict | None = None):
    unsupported("launching child inferlets (runtime.launch)")
