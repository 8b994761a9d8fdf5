"""`pie` entry point: builds the argument parser from one module per subcommand.

Each subcommand module exposes `register(subparsers, common)` which adds its parser(s)
(with `common` as a parent so every command takes -c/--config) and sets `func(args) -> int`.
Modules import heavy dependencies (torch, transformers) inside their handlers, so
`pie --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pie import __version__
from pie.cli.logs import configure as configure_logging
from pie.errors import PieError

# subcommand modules under pie.cli, in the order `pie --help` lists them
COMMANDS = [
    "run_cmd",
    "serve_cmd",
    "auth_cmd",
    "config_cmd",
    "model_cmd",
    "driver_cmd",
    "doctor_cmd",
    "bench_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (default: $PIE_HOME/config.toml, PIE_HOME defaults to ~/.pie)",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="show info log messages on stderr (-vv: debug); stdout stays for results",
    )
    parser = argparse.ArgumentParser(
        prog="pie",
        parents=[common],
        description="pie: a programmable LLM serving system. Inferlets (Python programs) drive the model "
        "token by token; the engine batches their forward passes.",
        epilog="Run `pie COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"pie {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pie.cli.{name}").register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SUPPRESS above keeps a subparser's default from overwriting `pie -c X cmd`
    args.config = getattr(args, "config", None)
    args.verbose = getattr(args, "verbose", 0)
    configure_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except PieError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file system problem no command anticipated: the file and why, no traceback
        if os.environ.get("PIE_DEBUG"):
            raise
        what = f" {e.filename}" if e.filename else ""
        print(f"error:{what}: {e.strerror or e} (PIE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
