"""User-facing errors. The CLI prints their message to stderr (no traceback) and exits non-zero."""


class PieError(Exception):
    """An error whose message tells the user what was wrong and how to fix it."""

    exit_code = 1


class ConfigError(PieError):
    exit_code = 2


class ModelError(PieError):
    """A model that cannot be found, is not supported, or has a broken checkpoint."""


class DriverError(PieError):
    """A driver that failed to start, died, or rejected a forward pass."""
