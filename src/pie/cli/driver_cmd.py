"""`pie driver dev install|set|show|doctor`: the Python environment the dev driver runs in.

The dev driver runs the model in a subprocess under its own interpreter (see
pie.drivers.dev.interpreter for the resolution order); these commands create that environment,
record which one to use, and check it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from pie.errors import ConfigError, DriverError, PieError

TORCH_INDEX = {
    "cpu": "https://download.pytorch.org/whl/cpu",  # no multi-GB CUDA wheels on a machine without a GPU
    "cu126": "https://download.pytorch.org/whl/cu126",
    "cu128": "https://download.pytorch.org/whl/cu128",
    "metal": None,  # macOS wheels on PyPI carry MPS support
}
FLASHINFER_HINT = "pip install flashinfer-python==0.6.3 (optional on CPU)"


def default_extra() -> str:
    """The install extra for this machine: metal on macOS, cu128 with an NVIDIA driver, else cpu."""
    import os
    import shutil

    if sys.platform == "darwin":
        return "metal"
    if os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi"):
        return "cu128"
    return "cpu"


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "driver",
        parents=[common],
        help="manage drivers (the dev driver's Python environment)",
        description="Manage drivers. `pie driver dev ...` creates, selects and checks the Python "
        "environment the dev driver (a subprocess running the model in readable PyTorch) runs in.",
    )
    drivers = p.add_subparsers(dest="driver_name", metavar="DRIVER")
    p.set_defaults(func=lambda args: _usage(p))
    dev = drivers.add_parser(
        "dev",
        parents=[common],
        help="the dev driver's interpreter: install, set, show, doctor",
        description="The dev driver runs under the first interpreter found in this order: the model's "
        "`venv`/`python` option, the `pie driver dev set` setting ($PIE_HOME/dev-driver.toml), $PIE_PYTHON, "
        "the active virtualenv ($VIRTUAL_ENV, else the one pie runs in), python3 on PATH.",
    )
    dev.set_defaults(func=lambda args: _usage(dev))
    sub = dev.add_subparsers(dest="dev_command", metavar="SUBCOMMAND")

    inst = sub.add_parser(
        "install",
        parents=[common],
        help="print (or --run) the commands creating a venv for the dev driver",
        description="Print the commands that create a virtualenv with torch and pie's driver extras; "
        "with --run, run them (output streams) and record the venv with `pie driver dev set venv`.",
    )
    inst.add_argument(
        "venv", nargs="?", metavar="VENV", help="where to create it (default: $PIE_HOME/venvs/dev)"
    )
    inst.add_argument("--run", action="store_true", help="run the commands instead of printing them")
    inst.add_argument(
        "--extra",
        choices=sorted(TORCH_INDEX),
        default=None,
        help="cpu (CPU-only torch), CUDA 12.6 / 12.8 wheels, or metal (macOS); default: metal on macOS, "
        "cu128 where an NVIDIA driver is installed, else cpu",
    )
    inst.set_defaults(func=_install)

    set_ = sub.add_parser(
        "set",
        parents=[common],
        help="record which venv or python runs the dev driver",
        description="Record the dev driver's interpreter in $PIE_HOME/dev-driver.toml (a model's own "
        "venv/python option still wins). Examples: `pie driver dev set venv ~/.pie/venvs/dev`, "
        "`pie driver dev set python /usr/bin/python3.12`, `pie driver dev set --clear`.",
    )
    set_.add_argument("what", nargs="?", choices=["venv", "python"], help="what PATH is")
    set_.add_argument("path", nargs="?", metavar="PATH", help="a virtualenv directory or an interpreter")
    set_.add_argument("--clear", action="store_true", help="forget the recorded choice")
    set_.set_defaults(func=_set)

    for name, func, text in (
        ("show", _show, "print the interpreter the dev driver would use and which rule chose it"),
        ("doctor", _doctor, "check the dev driver's interpreter: python, pie, torch/CUDA, flashinfer"),
    ):
        q = sub.add_parser(name, parents=[common], help=text, description=text[0].upper() + text[1:] + ".")
        who = q.add_mutually_exclusive_group()
        who.add_argument("--venv", metavar="VENV", help="check this virtualenv instead")
        who.add_argument("--python", metavar="PATH", help="check this interpreter instead")
        who.add_argument("--model", metavar="NAME", help="the interpreter of this configured model (see -c)")
        if name == "doctor":
            q.add_argument(
                "--timeout", type=float, default=120.0, help="seconds the probe may take (default 120)"
            )
        q.set_defaults(func=func)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


# ---- install ---------------------------------------------------------------------------------


def pie_requirement(extra: str) -> str:
    """`pie[extra] @ file:///checkout` when this pie runs from a source checkout, else `pie[extra]`."""
    import pie

    root = Path(pie.__file__).resolve().parents[2]  # src/pie/__init__.py -> the checkout
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        try:
            name = tomllib.loads(pyproject.read_text()).get("project", {}).get("name")
        except (OSError, tomllib.TOMLDecodeError):
            name = None
        if name == "pie":
            return f"pie[{extra}] @ {root.as_uri()}"
    return f"pie[{extra}]"


def install_commands(venv: Path, extra: str) -> list[list[str]]:
    """venv creation, torch from the right wheel index, then pie with the driver extras."""
    # sys.executable, not a bare `python3`: it is known to satisfy pie's requires-python (>= 3.11).
    pip = str(venv / "bin" / "pip")
    torch = [pip, "install", "torch"]
    if TORCH_INDEX[extra]:
        torch += ["--index-url", TORCH_INDEX[extra]]
    return [[sys.executable, "-m", "venv", str(venv)], torch, [pip, "install", pie_requirement(extra)]]


def _install(args) -> int:
    from pie.drivers.dev.interpreter import write_settings
    from pie.paths import pie_home

    venv = Path(args.venv).expanduser().absolute() if args.venv else pie_home() / "venvs" / "dev"
    args.extra = args.extra or default_extra()
    cmds = install_commands(venv, args.extra)
    if not args.run:
        print(f"# create the dev driver's venv ({args.extra}); run these, or add --run:")
        for cmd in cmds:
            print(shlex.join(cmd))
        print(f"pie driver dev set venv {shlex.quote(str(venv))}")
        return 0
    for cmd in cmds:
        print(f"$ {shlex.join(cmd)}", flush=True)
        try:
            rc = subprocess.run(cmd).returncode  # inherits stdout/stderr: pip's output streams
        except OSError as e:
            raise DriverError(f"cannot run {cmd[0]}: {e}") from e
        if rc != 0:
            raise DriverError(f"`{shlex.join(cmd)}` failed with exit status {rc}; see its output above")
    path = write_settings("venv", str(venv))
    print(f"installed; recorded in {path}: the dev driver now runs {venv / 'bin' / 'python'}")
    print("check it with: pie driver dev doctor")
    return 0


# ---- set / show --------------------------------------------------------------------------------


def _set(args) -> int:
    from pie.drivers.dev.interpreter import resolve_python, venv_python, write_settings

    if args.clear:
        if args.what or args.path:
            raise ConfigError("`pie driver dev set --clear` takes no other arguments")
        path = write_settings(None, None)
        print(f"cleared {path}")
    else:
        if not args.what or not args.path:
            raise ConfigError(
                "usage: pie driver dev set venv PATH | pie driver dev set python PATH | --clear"
            )
        target = Path(args.path).expanduser().absolute()
        if args.what == "venv":
            if not venv_python(target).is_file():
                raise ConfigError(
                    f"{target} is not a virtualenv ({venv_python(target)} does not exist); "
                    f"create one with `pie driver dev install {shlex.quote(args.path)} --run`"
                )
            value = str(target)
        else:
            # validates: exists and is executable, or is a name on PATH
            value = resolve_python(python=args.path, source="argument")[0]
        path = write_settings(args.what, value)
        print(f"recorded in {path}: {args.what} = {value}")
    python, rule = resolve_python()
    print(f"dev driver interpreter: {python} (chosen by: {rule})")
    return 0


def _model_options(args) -> dict:
    """resolve_python arguments: --venv/--python, or the dev options of the configured --model."""
    if not args.model:
        return {"venv": args.venv, "python": args.python, "source": "command-line option"}
    from pie.config import load_config

    entry = load_config(args.config).model(args.model)
    if entry.driver.type != "dev":
        raise ConfigError(f"model {args.model!r} uses the {entry.driver.type} driver, not dev")
    opts = entry.driver.options
    return {"venv": opts.venv, "python": opts.python, "source": f"model {args.model!r} option"}


def _show(args) -> int:
    from pie.drivers.dev.interpreter import resolve_python

    python, rule = resolve_python(**_model_options(args))
    print(f"{python}\n  chosen by: {rule}")
    return 0


# ---- doctor ----------------------------------------------------------------------------------

# Runs under the checked interpreter, which may be old or bare: keep it Python-3.6-compatible and
# free of pie imports at top level. Prints one JSON object on its last stdout line.
PROBE = r"""
import json, sys
r = {"version": list(sys.version_info[:3]), "executable": sys.executable}
def attempt(name, fn):
    try:
        r[name] = {"ok": True, "info": fn()}
    except BaseException as e:
        r[name] = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
def check_torch():
    import torch
    cuda = torch.cuda.is_available()
    return {"version": torch.__version__, "device": torch.cuda.get_device_name(0) if cuda else None}
def check_flashinfer():
    import flashinfer
    return getattr(flashinfer, "__version__", "unknown version")
def check_pie():
    import pie, pie.drivers.dev.server
    try:
        import pie.drivers.executor
    except ModuleNotFoundError as e:
        if e.name != "pie.drivers.executor":
            raise
    return pie.__file__
attempt("torch", check_torch)
attempt("flashinfer", check_flashinfer)
attempt("pie", check_pie)
sys.stdout.write("\n" + json.dumps(r) + "\n")
"""


def run_probe(python: str, timeout: float) -> dict:
    """The probe's JSON; DriverError (with the output tail) when the interpreter cannot run it."""
    from pie.drivers.dev.interpreter import child_env

    try:
        out = subprocess.run(
            [python, "-c", PROBE], env=child_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        raise DriverError(f"the probe did not finish within {timeout:g} s (--timeout)") from e
    except OSError as e:
        raise DriverError(f"cannot run it: {e}") from e
    lines = out.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-5:]) or "(no output)"
        raise DriverError(f"it exited with status {out.returncode}: {tail}") from None


def doctor_lines(python: str, rule: str, probe: dict) -> list[tuple[bool, bool, str]]:
    """(ok, required, text) per check, from a probe result."""
    from pie.drivers.dev.interpreter import pie_import_root

    fix = f"{shlex.quote(python)} -m pip install"
    lines = [(True, True, f"interpreter: {python} (chosen by: {rule}), runs")]
    ver = ".".join(map(str, probe["version"]))
    ok = tuple(probe["version"]) >= (3, 11)
    lines.append(
        (ok, True, f"python {ver}" + ("" if ok else ": pie needs >= 3.11; pie driver dev install --run"))
    )
    p = probe["pie"]
    if p["ok"]:
        lines.append(
            (True, True, f"pie driver package imports ({Path(p['info']).parent}, shared with this pie)")
        )
    else:
        hint = f"install pie's dependencies there: {fix} {shlex.quote(pie_requirement(default_extra()))}"
        lines.append((False, True, f"pie driver package: {p['error']}; {hint} (root {pie_import_root()})"))
    t = probe["torch"]
    if t["ok"]:
        where = f"CUDA: {t['info']['device']}" if t["info"]["device"] else "CPU only"
        lines.append((True, True, f"torch {t['info']['version']} ({where})"))
    else:
        index = TORCH_INDEX[default_extra()]
        lines.append(
            (False, True, f"torch: {t['error']}; {fix} torch" + (f" --index-url {index}" if index else ""))
        )
    f = probe["flashinfer"]
    if f["ok"]:
        lines.append((True, False, f"flashinfer {f['info']}"))
    else:
        lines.append((False, False, f"flashinfer: not installed: {FLASHINFER_HINT} [warning] ({f['error']})"))
    return lines


def _doctor(args) -> int:
    from pie.drivers.dev.interpreter import resolve_python

    try:
        python, rule = resolve_python(**_model_options(args))
    except PieError as e:
        print(f"✗ interpreter: {e}")
        return 1
    try:
        probe = run_probe(python, args.timeout)
    except DriverError as e:
        print(f"✗ interpreter: {python} (chosen by: {rule}) does not run the probe: {e}")
        return 1
    failed = 0
    for ok, required, text in doctor_lines(python, rule, probe):
        print(f"{'✓' if ok else '✗'} {text}")
        failed += required and not ok
    print("dev driver environment OK" if not failed else f"{failed} required check(s) failed")
    return 1 if failed else 0
