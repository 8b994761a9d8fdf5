"""`pie config init|show|set`: create, print and edit $PIE_HOME/config.toml."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pie.errors import ConfigError

KEYS_HELP = """\
keys (dotted paths; `model` alone means the first [[model]] block, `model.1` the second):
  model.name, model.hf_repo
  model.driver.type               cuda_native | dev
  model.driver.device             e.g. cuda:0, or cpu (dev only)
  model.driver.activation_dtype   bfloat16 | float16 | float32
  model.driver.options.KEY        driver options; `pie config show` lists them with help
  runtime.snapshot_dir            where named context snapshots persist ("" = in memory only)

VALUE is read as a TOML value when it parses as one (16, 0.9, true, ["cuda:0"]) and as a string
otherwise; "" unsets venv/python. The result is validated before the file is written.
examples:
  pie config set model.driver.options.kv_page_size 16
  pie config set model.0.hf_repo Qwen/Qwen3-0.6B
  pie config set model.driver.type dev"""


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "config",
        parents=[common],
        help="create, show and edit the config file",
        description="Manage pie's config file ($PIE_HOME/config.toml, PIE_HOME defaults to ~/.pie): "
        "which models to serve and which driver runs each.",
    )
    sub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    init = sub.add_parser(
        "init",
        parents=[common],
        help="write a config for this machine",
        description="Write a config for this machine: the cuda_native driver on cuda:0 when CUDA is "
        "available, else the dev driver on cpu; Qwen/Qwen3-0.6B when it is in the HF cache, else the "
        "small model embedded in pie.",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing config file")
    init.set_defaults(func=_init)
    show = sub.add_parser(
        "show",
        parents=[common],
        help="print the effective config (TOML, defaults filled in)",
        description="Print the effective config as TOML to stdout, every default filled in and each "
        "key's meaning as a comment. Without a config file, prints what `pie config init` would write.",
    )
    show.set_defaults(func=_show)
    set_ = sub.add_parser(
        "set",
        parents=[common],
        help="set one value by dotted key",
        description="Set one value of the config file, validate the result, then rewrite the file "
        "(canonical form: defaults filled in, help comments regenerated). An invalid value leaves the "
        "file unchanged.",
        epilog=KEYS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    set_.add_argument("key", metavar="KEY", help="dotted path, e.g. model.driver.options.kv_page_size")
    set_.add_argument("value", metavar="VALUE", help="new value (TOML syntax, or a plain string)")
    set_.set_defaults(func=_set)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def _path(args: argparse.Namespace) -> Path:
    from pie.paths import default_config_path

    return Path(args.config).expanduser() if args.config else default_config_path()


def _init(args: argparse.Namespace) -> int:
    from pie.config import default_config, write_config
    from pie.paths import EMBEDDED_MODEL_ID

    path = _path(args)
    if path.exists() and not args.force:
        raise ConfigError(
            f"{path} already exists; pass --force to overwrite it, or edit it with `pie config set`"
        )
    cfg = default_config()
    write_config(cfg, path)
    m = cfg.default_model
    print(
        f"wrote {path}: model '{m.name}' = {m.hf_repo}, driver {m.driver.type} on {', '.join(m.driver.device)}",
        file=sys.stderr,
    )
    if m.hf_repo == EMBEDDED_MODEL_ID:
        print(
            "to serve a real model: pie model download Qwen/Qwen3-0.6B && "
            "pie config set model.hf_repo Qwen/Qwen3-0.6B",
            file=sys.stderr,
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    from pie.config import load_or_default, to_toml

    cfg, existed = load_or_default(args.config)
    if not existed:
        print(
            f"note: no config file at {_path(args)}; showing the defaults (`pie config init` writes them)",
            file=sys.stderr,
        )
    sys.stdout.write(to_toml(cfg))
    return 0


def _set(args: argparse.Namespace) -> int:
    from pie.config import set_value

    path = _path(args)
    _, notes = set_value(path, args.key, args.value)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"set {args.key} = {args.value} in {path}", file=sys.stderr)
    return 0
