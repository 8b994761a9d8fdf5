"""`pie run [-c CONFIG] NAME_OR_PATH [--input JSON] [--model NAME] [-- ARGS]`: run one inferlet.

Starts an engine for the config's models, runs the inferlet once and prints its return value,
alone, on stdout (everything else, including the inferlet's own print()s, goes to stderr).
Trailing ARGS become the input dict: `--max-tokens 64 --prompt "Hi" --ignore-eos` ->
{"max_tokens": 64, "prompt": "Hi", "ignore_eos": true}; values parse as int, float, bool
(true/false), else string; `--key=value` works too. `--input JSON` gives a dict directly
(trailing ARGS override its keys).

The inferlet's session (inferlet.session) is the terminal: session.send() messages stream to stderr as
they come, or to stdout with --stream (before the result); session.receive() reads lines of stdin when
stdin is piped (`echo hi | pie run agent.py`); a file sent is written to a temporary folder
whose path is printed on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import traceback
from pathlib import Path

from pie.errors import PieError

_INT = re.compile(r"[+-]?\d+")


class UsageError(PieError):
    exit_code = 2


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "run",
        parents=[common],
        help="run one inferlet and print its result",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  pie run text-completion -- --prompt 'Why is the sky blue?' --max-tokens 64\n"
        "  pie run ./my_inferlet.py --input '{\"n\": 3}'",
    )
    p.add_argument("--input", metavar="JSON", help="the inferlet's input dict as a JSON object")
    p.add_argument(
        "--model", metavar="NAME", help="the model Model.load() returns (default: the config's first)"
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="write the inferlet's session.send() messages to stdout as they come (default: stderr)",
    )
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # tests: no subprocess driver
    p.add_argument("inferlet", metavar="NAME_OR_PATH", help="text-completion, raw-completion, or a .py file")
    # REMAINDER: everything after NAME_OR_PATH, so the inferlet's --flags never reach argparse
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="-- ARGS", help="the inferlet's arguments")
    p.set_defaults(func=run)


def parse_value(raw: str):
    """int, float, bool (true/false, any case), else the string itself."""
    if _INT.fullmatch(raw):
        return int(raw)
    try:
        return float(raw)
    except ValueError:
        pass
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    return raw


def parse_inferlet_args(tokens: list[str]) -> dict:
    """`--key value`, `--key=value` and bare `--flag` (true) pairs; '-' in keys becomes '_'."""
    out: dict = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise UsageError(
                f"unexpected inferlet argument {tok!r}: inferlet arguments are --key value pairs"
            )
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            out[key] = parse_value(value)
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            i += 1
            out[key] = parse_value(tokens[i])
        else:
            out[key] = True
        i += 1
    return out


def split_rest(args: argparse.Namespace) -> list[str]:
    """Take run's own options given after NAME_OR_PATH (before `--`) off the trailing arguments."""
    rest = list(args.rest)
    while rest and rest[0] != "--":
        opt, eq, value = rest[0].partition("=")
        if opt not in ("--input", "--model", "--in-process", "--stream"):
            break
        if opt in ("--in-process", "--stream"):
            setattr(args, opt[2:].replace("-", "_"), True)
            rest = rest[1:]
            continue
        if not eq:
            if len(rest) < 2:
                raise UsageError(f"{opt} needs a value")
            value, rest = rest[1], rest[1:]
        setattr(args, opt[2:], value)
        rest = rest[1:]
    return rest[1:] if rest[:1] == ["--"] else rest


def check_text(value, where: str) -> None:
    """Rejects strings that are not valid Unicode anywhere in the input (they cannot be tokenized)."""
    from pie.models.text import unicode_problem

    if isinstance(value, str):
        if (problem := unicode_problem(value)) is not None:
            raise UsageError(f"{where} is not valid text: {problem}; pass UTF-8 text")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, f"{where} key")
            check_text(v, f"{where}[{k!r}]" if where == "--input" else f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_text(v, f"{where}[{i}]")


def build_input(args: argparse.Namespace) -> dict:
    trailing = parse_inferlet_args(split_rest(args))
    for key, value in trailing.items():
        check_text(value, f"argument --{key.replace('_', '-')}")
    base: dict = {}
    if args.input is not None:
        try:
            base = json.loads(args.input)
        except json.JSONDecodeError as e:
            raise UsageError(f"--input is not valid JSON: {e}") from None
        if not isinstance(base, dict):
            raise UsageError(f"--input must be a JSON object, got {type(base).__name__}")
        check_text(base, "--input")
    return {**base, **trailing}


def run(args: argparse.Namespace) -> int:
    from pie.config import load_or_default
    from pie.inferlets.loader import load_inferlet
    from pie.paths import default_config_path

    input = build_input(args)
    main = load_inferlet(args.inferlet)  # fail on a bad name before loading any model
    config, found = load_or_default(args.config)
    if not found:
        print(
            f"pie: no config file at {default_config_path()}; using the default config "
            "(`pie config init` writes one)",
            file=sys.stderr,
        )
    config.model(args.model)  # an unknown --model fails now, listing the configured names
    from pie.runtime.session import StdioSession

    stdout = sys.stdout
    session = StdioSession(stdout if getattr(args, "stream", False) else sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # only the result (and --stream messages) go to stdout
        result = asyncio.run(
            _run(config, main, input, args.model, args.in_process, bool(getattr(args, "verbose", 0)), session)
        )
    if result is None:
        return 1
    if session.out is stdout and not session.at_line_start:
        print(file=stdout)  # the result goes on a line of its own after streamed messages
    print(result, file=stdout, flush=True)
    return 0


async def _run(
    config, main, input: dict, model: str | None, in_process: bool, verbose: bool = False, session=None
) -> str | None:
    from pie.runtime.engine import Engine

    engine = Engine(config, in_process=in_process)
    try:
        await engine.start()
        try:
            result = await engine.run_inferlet(main, input, model=model, session=session)
            if verbose:
                for name, rt in engine.models.items():
                    st = " ".join(f"{k}={v}" for k, v in rt.stats().items())
                    print(f"pie: stats of model {name!r}: {st}", file=sys.stderr)
            return result
        except PieError:
            raise
        except asyncio.CancelledError:  # the first Ctrl-C: asyncio.run cancels us
            print(
                "pie: interrupted; stopping the engine (a batch in flight finishes first; "
                "Ctrl-C again quits now, the driver process dies with pie)",
                file=sys.stderr,
            )
            raise
        except Exception as e:  # the inferlet's own bug: its message and where, not our internals
            print(f"error: inferlet failed: {type(e).__name__}: {e}", file=sys.stderr)
            print(_where(e), file=sys.stderr)
            return None
    finally:
        await engine.shutdown()


def _where(e: BaseException) -> str:
    """The innermost traceback frame outside pie's own package (or the full trace with PIE_DEBUG=1)."""
    if os.environ.get("PIE_DEBUG"):
        return "".join(traceback.format_exception(e))
    pie_dir = str(Path(__file__).resolve().parents[1])
    frames = traceback.extract_tb(e.__traceback__)
    theirs = [f for f in frames if not f.filename.startswith(pie_dir)] or frames[-1:]
    f = theirs[-1]
    return f"  at {f.filename}:{f.lineno} in {f.name} (PIE_DEBUG=1 shows the full traceback)"
