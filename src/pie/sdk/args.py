"""Reading an inferlet's input dict with clear errors (what `pie run NAME -- --key value` passed)."""

from __future__ import annotations

from pie.errors import PieError

_MISSING = object()


class InputError(PieError):
    """An inferlet argument that is missing, unknown or of the wrong type."""


def check_args(input: dict, allowed: list[str]) -> None:
    """Reject keys the inferlet does not know (a typo should not be silently ignored)."""
    unknown = sorted(set(input) - set(allowed))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        accepted = ", ".join("--" + k.replace("_", "-") for k in allowed)
        raise InputError(f"unknown argument(s) {flags}; this inferlet accepts {accepted}")


def get_arg(input: dict, name: str, kind: type, default=_MISSING):
    """input[name] as `kind` (int accepted where float is asked); `default` when absent."""
    if name not in input or input[name] is None:
        if default is _MISSING:
            raise InputError(f"missing argument --{name.replace('_', '-')} ({kind.__name__})")
        return default
    v = input[name]
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if kind is str and isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)  # `--prompt 42` parses as a number
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
        raise InputError(f"argument --{name.replace('_', '-')} must be {kind.__name__}, got {v!r}")
    return v
