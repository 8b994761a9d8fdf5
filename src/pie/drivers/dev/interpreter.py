"""Which Python runs the dev driver, and the environment it runs in.

Resolution order (first that applies wins; see `resolve_python`):
  1. the model's own option: `venv` (VENV/bin/python) or `python` (an interpreter path or name)
  2. the `pie driver dev set venv|python` setting, stored in $PIE_HOME/dev-driver.toml
  3. $PIE_PYTHON
  4. the active virtualenv: $VIRTUAL_ENV/bin/python, else the virtualenv pie itself runs in
     (sys.executable when sys.prefix != sys.base_prefix: `venv/bin/pie` run without activating
     the venv, a pipx install)
  5. `python3` on PATH (only when pie runs outside any virtualenv)
The first rule that applies decides; a missing interpreter is an error naming that rule,
never a silent fall-through to the next rule (so a typo does not run the wrong environment).

The child always imports pie from the running process's copy (PYTHONPATH is prepended with
the directory that holds the `pie` package): the interpreter's venv supplies torch and
flashinfer, the model code is shared with the in-process driver.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tomllib
from pathlib import Path

import tomli_w

import pie
from pie.errors import ConfigError, DriverError
from pie.paths import home_write_error, pie_home

SETTINGS_FILE = "dev-driver.toml"
SETTING_KEYS = ("venv", "python")


def settings_path() -> Path:
    return pie_home() / SETTINGS_FILE


def venv_python(venv: str | Path) -> Path:
    """The interpreter inside a virtualenv directory."""
    venv = Path(venv).expanduser()
    if os.name == "nt":  # pragma: no cover - pie targets Linux/macOS, kept for clear errors elsewhere
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def read_settings() -> dict[str, str]:
    """The recorded `pie driver dev set` choice: {} or {"venv": path} or {"python": path}."""
    path = settings_path()
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}; fix it or run `pie driver dev set --clear`") from e
    return {k: str(data[k]) for k in SETTING_KEYS if k in data}


def write_settings(key: str | None, value: str | None) -> Path:
    """Record one choice (replacing any previous one); key None clears the setting."""
    path = settings_path()
    if key is None:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise ConfigError(home_write_error(path, e)) from None
        return path
    if key not in SETTING_KEYS:
        raise ConfigError(f"unknown dev driver setting {key!r}; use one of {', '.join(SETTING_KEYS)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps({key: value}))
    except OSError as e:
        raise ConfigError(home_write_error(path, e)) from None
    return path


def _check(path: Path | str, rule: str, hint: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file() or not os.access(p, os.X_OK):
        what = "is not executable" if p.is_file() else "does not exist"
        raise DriverError(f"dev driver interpreter {p} {what} (chosen by {rule}); {hint}")
    return str(p)


def _interpreter(python: str, rule: str, hint: str) -> str:
    """A path, or a bare name looked up on PATH (e.g. "python3.12")."""
    if os.sep not in python and not python.startswith("~"):
        found = shutil.which(python)
        if found is None:
            raise DriverError(f"dev driver interpreter {python!r} is not on PATH (chosen by {rule}); {hint}")
        return found
    return _check(python, rule, hint)


def resolve_python(
    venv: str | None = None, python: str | None = None, *, source: str = "model option"
) -> tuple[str, str]:
    """(interpreter path, the rule that chose it) for a model whose options give venv / python.

    Reads $PIE_HOME/dev-driver.toml, $PIE_PYTHON, $VIRTUAL_ENV and PATH; touches nothing.
    `source` names where venv/python came from in messages ("model option", or a CLI flag).
    Raises DriverError when the chosen interpreter is missing, ConfigError for a bad setting.
    """
    if venv and python:
        raise ConfigError(f"{source}s give both `venv` and `python`; keep one of them")
    if venv:
        hint = f"create it with `pie driver dev install {venv} --run` or fix the path"
        return _check(venv_python(venv), f"{source} `venv`", hint), f"{source} venv"
    if python:
        return _interpreter(python, f"{source} `python`", "fix the path"), f"{source} python"
    settings = read_settings()
    where = f"`pie driver dev set` ({settings_path()})"
    if "venv" in settings:
        hint = "recreate it (pie driver dev install --run) or run `pie driver dev set --clear`"
        return _check(venv_python(settings["venv"]), where, hint), "setting venv"
    if "python" in settings:
        hint = "fix it with `pie driver dev set python PATH` or `pie driver dev set --clear`"
        return _interpreter(settings["python"], where, hint), "setting python"
    env_python = os.environ.get("PIE_PYTHON")
    if env_python:
        return _interpreter(env_python, "$PIE_PYTHON", "fix or unset PIE_PYTHON"), "PIE_PYTHON"
    active = os.environ.get("VIRTUAL_ENV")
    if active:
        hint = "the active virtualenv looks broken; deactivate it or choose one: pie driver dev set venv PATH"
        return _check(venv_python(active), "$VIRTUAL_ENV (the active virtualenv)", hint), "VIRTUAL_ENV"
    if own_venv() is not None:
        # pie runs from a venv that is not activated (venv/bin/pie, pipx): that venv has pie's
        # dependencies, python3 on PATH most likely does not.
        return sys.executable, "pie's own virtualenv"
    found = shutil.which("python3")
    if found is None:
        raise DriverError(
            "no interpreter for the dev driver: python3 is not on PATH and no venv/python is configured; "
            "run `pie driver dev install --run` or `pie driver dev set python PATH`"
        )
    return found, "python3 on PATH"


def own_venv() -> Path | None:
    """The virtualenv this pie runs in (activated or not), or None outside any virtualenv."""
    return Path(sys.prefix) if sys.prefix != sys.base_prefix else None


def choose_another_hint() -> str:
    """How to make the dev driver run a different interpreter (for error messages)."""
    return (
        "choose another with `pie driver dev set venv PATH` / `pie driver dev set python PATH`, "
        "$PIE_PYTHON, or the model option venv / python; or create one: `pie driver dev install --run`"
    )


def missing_module(output: str) -> str | None:
    """The module name of the last `No module named 'X'` in a child's output, or None."""
    found = re.findall(r"No module named '([^']+)'", output)
    return found[-1] if found else None


def pie_import_root() -> Path:
    """The directory that contains the running `pie` package (src/ in a checkout, site-packages else)."""
    return Path(pie.__file__).resolve().parent.parent


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a dev driver child: PYTHONPATH starts with our pie, output is unbuffered."""
    env = dict(os.environ if base is None else base)
    root = str(pie_import_root())
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root + (os.pathsep + rest if rest else "")
    # Logs reach the parent's ring buffer as they happen, not when a buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    return env
