"""`pie model list|download|remove`: the models pie can serve and the HF cache that holds them."""

from __future__ import annotations

import argparse
import json
import sys

from pie.errors import PieError


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "model",
        parents=[common],
        help="list, download and remove models",
        description="Models pie can serve: the small embedded model, repos in the Hugging Face cache "
        "(HF_HUB_CACHE / HF_HOME), and local directories named in the config.",
    )
    sub = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    ls = sub.add_parser(
        "list",
        parents=[common],
        help="list models and whether pie can run them",
        description="List the embedded model, HF cache repos with a config.json, and the config's "
        "models. ✓ supported (with the drivers that run it), ○ not supported (with why), ? unknown.",
    )
    ls.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    ls.set_defaults(func=_list)
    dl = sub.add_parser(
        "download",
        parents=[common],
        help="download a model into the HF cache",
        description="Download a Hugging Face repo's config, safetensors weights and tokenizer files "
        "into the HF cache (progress on stderr); prints the snapshot directory.",
    )
    dl.add_argument("repo", metavar="REPO", help="repo id, e.g. Qwen/Qwen3-0.6B")
    dl.set_defaults(func=_download)
    rm = sub.add_parser(
        "remove",
        parents=[common],
        help="delete a model from the HF cache",
        description="Delete a repo (all its revisions and files) from the HF cache.",
    )
    rm.add_argument("repo", metavar="REPO", help="repo id, e.g. Qwen/Qwen3-0.6B")
    rm.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    rm.set_defaults(func=_remove)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _list(args: argparse.Namespace) -> int:
    from pie.config import load_or_default
    from pie.models.hub import hf_cache_dir, list_models

    cfg, _ = load_or_default(args.config)
    infos = list_models(cfg)
    if args.json:
        print(json.dumps([m.to_dict() for m in infos], indent=2))
        return 0
    rows = []
    for m in infos:
        mark = "✓" if m.supported else "?" if m.supported is None else "○"
        status = ", ".join(m.drivers) if m.supported else "; ".join(m.reasons)
        used = f"  [config: {', '.join(m.config_names)}]" if m.config_names else ""
        rows.append((mark, m.id, m.model_type or "-", _size(m.size_bytes), status + used))
    w_id = max(len("MODEL"), *(len(r[1]) for r in rows))
    w_type = max(len("TYPE"), *(len(r[2]) for r in rows))
    print(f"  {'MODEL':<{w_id}}  {'TYPE':<{w_type}}  {'SIZE':>8}  DRIVERS / WHY NOT")
    for mark, mid, mtype, size, status in rows:
        print(f"{mark} {mid:<{w_id}}  {mtype:<{w_type}}  {size:>8}  {status}")
    # A blank line apart from the table (stderr: the table alone stays machine-readable on stdout),
    # after the table has left stdout's buffer so a shared terminal or 2>&1 keeps the order.
    sys.stdout.flush()
    print(f"\nHF cache: {hf_cache_dir()}", file=sys.stderr)
    return 0


def _download(args: argparse.Namespace) -> int:
    from pie.models.hub import download, inspect_dir

    print(f"downloading {args.repo} (config, safetensors, tokenizer)...", file=sys.stderr)
    path = download(args.repo)
    info = inspect_dir(args.repo, "hf-cache", path)
    if info.supported:
        print(
            f"✓ {args.repo} runs on {', '.join(info.drivers)}; use it with "
            f"`pie config set model.hf_repo {args.repo}`",
            file=sys.stderr,
        )
    else:
        print(
            f"{'?' if info.supported is None else '○'} {args.repo}: {'; '.join(info.reasons)}",
            file=sys.stderr,
        )
    print(path)
    return 0


def _remove(args: argparse.Namespace) -> int:
    from pie.models.hub import cache_entry, remove

    entry = cache_entry(args.repo)
    if entry is not None and not args.yes:
        folder, size = entry
        if not sys.stdin.isatty():
            raise PieError(f"not removing {args.repo} without confirmation; pass -y to remove it")
        print(f"remove {args.repo} ({_size(size)}) at {folder}? [y/N] ", end="", file=sys.stderr, flush=True)
        try:
            answer = input()
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not removed", file=sys.stderr)
            return 1
    freed = remove(args.repo)  # also raises the "not in the HF cache" error when entry is None
    print(f"removed {args.repo} (freed {_size(freed)})", file=sys.stderr)
    return 0
