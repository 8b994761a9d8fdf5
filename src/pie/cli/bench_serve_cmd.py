"""`pie bench serve --base-url URL`: TTFT, TPOT, ITL and throughput of an OpenAI-compatible server."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys

from pie.errors import ConfigError


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "serve",
        parents=[common],
        help="load an OpenAI-compatible server (pie serve, vLLM, ...) and report TTFT/TPOT/ITL and throughput",
        description=(__import__("pie.bench.serve", fromlist=["x"]).__doc__ or "").split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: pie bench serve --base-url http://127.0.0.1:8080/v1 --num-prompts 200 --request-rate 8 --json",
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1", help="the server's /v1 URL")
    p.add_argument("--model", help="model id (default: the server's first)")
    p.add_argument("--api-key", default="none", help="bearer token (pie auth add prints one)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default inf: all at once)"
    )
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    p.add_argument("--input-len", type=int, default=128, help="words per random prompt (default 128)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request (default 128)")
    p.add_argument(
        "--dataset", choices=("random", "fixed"), default="random", help="fixed: one prompt for all"
    )
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument(
        "--no-ignore-eos", dest="ignore_eos", action="store_false", help="let requests stop at eos"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json", action="store_true", help="print the JSON record on stdout (the table goes to stderr)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pie.bench.serve import BenchServeOptions, table, to_json
    from pie.bench.serve import run as bench

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.request_rate <= 0 or (args.max_concurrency is not None and args.max_concurrency < 1):
        raise ConfigError("--request-rate and --max-concurrency must be positive")
    o = BenchServeOptions(
        base_url=args.base_url,
        model=args.model,
        num_prompts=args.num_prompts,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        dataset=args.dataset,
        endpoint=args.endpoint,
        ignore_eos=args.ignore_eos,
        api_key=args.api_key,
        seed=args.seed,
    )
    try:
        rec = asyncio.run(bench(o))
    except OSError as e:
        raise ConfigError(f"cannot reach {args.base_url}: {e}") from None
    print(table(rec), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(to_json(rec))
    return 0 if rec["completed"] else 1
