"""Logging for the `pie` command: module loggers (`logging.getLogger(__name__)`) reach stderr.

stdout is reserved for results (`pie run` prints the inferlet's return value alone there), so every
log record goes to stderr. Verbosity: warnings by default, `-v` info, `-vv` debug. The level travels
to the dev driver's child process in $PIE_LOG_LEVEL, whose output the parent echoes to stderr.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "PIE_LOG_LEVEL"
FORMAT = "pie: %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each record (tests and redirections replace it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def level_for(verbosity: int) -> int:
    return logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG


def configure(verbosity: int | None = None) -> int:
    """Sends pie's log records at the chosen level to stderr; returns the level.

    verbosity None: the level named in $PIE_LOG_LEVEL (a child process), else warnings.
    Only the `pie` logger tree is raised to that level: third-party libraries stay at warning.
    """
    if verbosity is None:
        level = logging.getLevelName(os.environ.get(ENV, "WARNING").upper())
        level = level if isinstance(level, int) else logging.WARNING
    else:
        level = level_for(verbosity)
        os.environ[ENV] = logging.getLevelName(level)  # inherited by driver processes
    logger = logging.getLogger("pie")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    return level
