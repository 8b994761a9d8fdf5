"""Finding an inferlet's `async def main(input: dict) -> str` from a built-in name, a .py path or a module."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType

from pie.errors import PieError

BUILTINS = {
    "text-completion": "pie.inferlets.text_completion",
    "raw-completion": "pie.inferlets.raw_completion",
}

InferletMain = Callable[[dict], Awaitable[object]]
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class InferletError(PieError):
    """An inferlet that cannot be found or loaded, or that has no usable `main`."""


def load_inferlet(what: str | Path | ModuleType | Callable) -> InferletMain:
    """The inferlet's `main` coroutine function.

    `what` is a built-in name (see BUILTINS), a path to a .py file, an installed module's dotted name
    (`mypkg.agent`, whose `main` is the inferlet), an imported module, or the coroutine function itself.
    """
    if inspect.iscoroutinefunction(what):
        return what
    if isinstance(what, ModuleType):
        return _main_of(what, what.__name__)
    if callable(what):
        raise InferletError(f"{what!r} is not an async function: inferlets define `async def main(input)`")
    name = str(what)
    if name in BUILTINS:
        return _main_of(importlib.import_module(BUILTINS[name]), name)
    path = Path(name).expanduser()
    if path.suffix != ".py" and _MODULE.fullmatch(name) and _installed(name):
        return _main_of(importlib.import_module(name), name)
    if path.suffix != ".py" or not path.is_file():
        hint = (
            f"built-in inferlets: {', '.join(BUILTINS)}; or give the path of a .py file or the name of "
            "an installed module that defines main"
        )
        if path.suffix == ".py":
            raise InferletError(f"inferlet file {path} does not exist ({hint})")
        raise InferletError(f"unknown inferlet {name!r} ({hint})")
    return _main_of(_import_file(path), str(path))


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is not installed
        return False


def _import_file(path: Path) -> ModuleType:
    # The file's directory goes on the import path, as `python file.py` does, so the inferlet can
    # import helper modules beside it (`import prompts` for ./prompts.py). It stays there: imports
    # inside main() run later.
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    # a unique module name per file so two inferlets with the same file name do not collide
    mod_name = f"pie_inferlet_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise InferletError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except PieError:
        raise
    except SyntaxError as e:
        raise InferletError(f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:
        raise InferletError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def _main_of(module: ModuleType, label: str) -> InferletMain:
    main = getattr(module, "main", None)
    if main is None:
        raise InferletError(f"inferlet {label} has no `main`: define `async def main(input: dict) -> str`")
    if not inspect.iscoroutinefunction(main):
        raise InferletError(
            f"`main` in inferlet {label} must be a coroutine function: write `async def main(input: dict) -> str`"
        )
    return main
