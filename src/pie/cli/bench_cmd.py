"""`pie bench`: decode and prefill speed of one model beside the device's floors (see pie.bench)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from pie.errors import ConfigError, DriverError


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "bench",
        parents=[common],
        help="measure decode and prefill speed against the device's floors",
        description="Measure decode time per token at batch 1, decode throughput at larger batches and prefill "
        "throughput, driving the model executor directly; print each figure beside its floor (weights + KV bytes "
        "over the measured copy bandwidth for decode; flops over the measured matmul rate for prefill). "
        "Progress goes to stderr.",
        epilog="examples: pie bench --model-config qwen3-0.6b --random-weights | pie bench -c config.toml --model "
        "default --json > run.json",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="NAME", help="a model of the config file (default: its first model)")
    src.add_argument(
        "--model-config",
        metavar="PATH|NAME",
        help="a model config .json, a checkpoint directory, or a bundled config "
        "(qwen3-0.6b, llama-3.2-1b, llama-3.1-8b, phi-3-mini-4k, mixtral-8x7b, qwen3-30b-a3b, gpt-oss-20b); a bare "
        "config runs with random weights",
    )
    p.add_argument(
        "--random-weights", action="store_true", help="random weights of the real shape (no checkpoint read)"
    )
    p.add_argument(
        "--context", type=int, default=128, help="prompt tokens of each decode sequence (default 128)"
    )
    p.add_argument(
        "--batch-sizes", default="1,64,256", help="decode batch sizes, comma separated (default 1,64,256)"
    )
    p.add_argument(
        "--prefill", default="4x2048", help="prefill requests x tokens, or 'none' (default 4x2048)"
    )
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per repeat (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; figures are their median (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    p.add_argument(
        "--page-size", type=int, default=32, help="KV page size in tokens (default 32, as cuda_native)"
    )
    p.add_argument(
        "--device", default=None, help="device (default: the model's configured device, else cuda:0)"
    )
    p.add_argument(
        "--tensor-parallel-size",
        "--tp",
        type=int,
        default=1,
        help="split the model over this many devices, one process each (default 1); the report adds the "
        "layout and the time the collectives of each step take alone",
    )
    p.add_argument(
        "--devices",
        default=None,
        help="one device per tensor-parallel rank, comma separated (default: --device's index and the next "
        "ones, e.g. cuda:0,cuda:1; cpu repeated on cpu)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float16", "float32"),
        help="activation dtype (default: the model's configured one, else bfloat16)",
    )
    p.add_argument(
        "--attention", default="auto", choices=("auto", "flashinfer", "torch"), help="attention backend"
    )
    p.add_argument(
        "--weight-dtype",
        default="auto",
        choices=("auto", "int8", "int4", "float8"),
        help="quantized projections (docs/quantization.md); floors stay those of the activation dtype",
    )
    p.add_argument(
        "--kv-cache-dtype", default="auto", choices=("auto", "fp8_e4m3"), help="fp8_e4m3: FP8 KV pages"
    )
    p.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="run decode steps eagerly (default: CUDA graphs on CUDA with FlashInfer, as cuda_native does)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the JSON record on stdout (the table goes to stderr)"
    )
    p.add_argument(
        "--profile", metavar="PATH", help="write a torch.profiler table of one decode step at batch 64"
    )
    p.add_argument(
        "--e2e",
        action="store_true",
        help="also generate through the runtime and the SDK (N concurrent inferlets, engine-side generation) at "
        "each batch size, beside the executor-only figure of the same batch",
    )
    p.add_argument(
        "--e2e-steps", type=int, default=64, help="tokens each inferlet generates in the e2e run (default 64)"
    )
    p.add_argument(
        "--noop-driver",
        action="store_true",
        help="measure only the host cost of the runtime and the SDK per sequence per step, against a driver "
        "that returns at once (no model, no GPU)",
    )
    p.set_defaults(func=run)
    # `pie bench serve ...`: load on a running server (pie.cli.bench_serve_cmd)
    from pie.cli import bench_serve_cmd

    bench_serve_cmd.register(p.add_subparsers(dest="bench_kind", metavar="serve"), common)


def _progress():
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[bench {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


def _positive(name: str, v: int, minimum: int = 1) -> int:
    if v < minimum:
        raise ConfigError(f"--{name} must be >= {minimum}, got {v}")
    return v


def parse_options(args: argparse.Namespace, device: str, dtype: str):
    from pie.bench.runner import BenchOptions

    try:
        batches = tuple(int(x) for x in args.batch_sizes.split(",") if x.strip())
    except ValueError:
        raise ConfigError(
            f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}"
        ) from None
    if not batches or min(batches) < 1:
        raise ConfigError(f"--batch-sizes needs positive integers, got {args.batch_sizes!r}")
    if args.prefill.lower() == "none":
        requests, length = 0, 0
    else:
        try:
            requests, length = (int(x) for x in args.prefill.lower().split("x"))
        except ValueError:
            raise ConfigError(
                f"--prefill must look like 4x2048 (requests x tokens) or 'none', got {args.prefill!r}"
            ) from None
        _positive("prefill requests", requests)
        _positive("prefill tokens", length)
    return BenchOptions(
        context=_positive("context", args.context),
        batch_sizes=batches,
        prefill_requests=requests,
        prefill_len=length,
        steps=_positive("steps", args.steps),
        repeats=_positive("repeats", args.repeats),
        warmup=_positive("warmup", args.warmup, 0),
        page_size=_positive("page-size", args.page_size),
        device=device,
        dtype=dtype,
        attention_backend=args.attention,
        profile_path=args.profile,
        profile_batch=64 if 64 in batches else max(batches),
        cuda_graphs=getattr(args, "cuda_graphs", True),
        tensor_parallel_size=_positive("tensor-parallel-size", getattr(args, "tensor_parallel_size", 1)),
        devices=rank_devices(
            device, getattr(args, "tensor_parallel_size", 1), getattr(args, "devices", None)
        ),
        e2e_steps=_positive("e2e-steps", args.e2e_steps) if getattr(args, "e2e", False) else 0,
        weight_dtype=getattr(args, "weight_dtype", "auto"),
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
    )


def rank_devices(device: str, tp: int, given: str | None) -> tuple[str, ...]:
    """The device of each tensor-parallel rank: --devices, else `device` and the following CUDA indices
    (cpu repeated)."""
    if given:
        devices = tuple(d.strip() for d in given.split(",") if d.strip())
        if len(devices) != tp:
            raise ConfigError(
                f"--devices lists {len(devices)} devices for --tensor-parallel-size {tp}; give one per rank"
            )
        return devices
    if device.startswith("cuda"):
        first = int(device.partition(":")[2] or 0)
        return tuple(f"cuda:{first + r}" for r in range(tp))
    return (device,) * tp


def _resolve_model(
    args: argparse.Namespace, tmp: Path
) -> tuple[dict, str, Path, bool, str | None, str | None]:
    """(config dict, name, model dir, random weights, configured device, configured dtype)."""
    from pie.bench import load_model_config

    if args.model_config:
        cfg, name = load_model_config(args.model_config)
        given = Path(args.model_config).expanduser()
        if given.is_dir() and not args.random_weights:
            return cfg, name, given, False, None, None
        # A bare config has no weights: write it alone into a directory the executor can read.
        (tmp / "config.json").write_text(json.dumps(cfg))
        return cfg, name, tmp, True, None, None
    from pie.config import load_or_default
    from pie.models.hub import resolve_model_dir

    config, _ = load_or_default(args.config)
    entry = config.model(args.model)
    model_dir = resolve_model_dir(entry.hf_repo)
    cfg = json.loads((model_dir / "config.json").read_text())
    return (
        cfg,
        entry.name,
        model_dir,
        args.random_weights,
        entry.driver.device[0],
        entry.driver.activation_dtype,
    )


def _check_lengths(cfg: dict, opts) -> None:
    max_pos = int(cfg.get("max_position_embeddings") or 0)
    need = max(opts.context + opts.decode_steps_total, opts.prefill_len)
    if max_pos and need > max_pos:
        raise ConfigError(
            f"the benchmark reaches position {need}, beyond the model's max_position_embeddings {max_pos}; "
            "lower --context, --steps or --prefill"
        )


def run_noop(args: argparse.Namespace) -> int:
    from pie.bench.e2e import noop_host_cost

    batches = tuple(int(x) for x in args.batch_sizes.split(",") if x.strip())
    steps = _positive("steps", args.e2e_steps)
    _progress()(f"runtime host cost against a no-op driver: batches {batches}, {steps} steps each")
    figs = noop_host_cost(batches, steps)
    rows = [
        {"batch": f.batch, "step_us": f.step_s * 1e6, "us_per_seq_step": f.step_s * 1e6 / f.batch,
         "batches": f.batches}
        for f in figs
    ]  # fmt: skip
    if args.json:
        print(json.dumps({"noop_host_cost": rows}, indent=2))
    else:
        print(f"{'batch':>6} {'us/step':>10} {'us/seq/step':>12}")
        for r in rows:
            print(f"{r['batch']:>6} {r['step_us']:>10.1f} {r['us_per_seq_step']:>12.2f}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.noop_driver:
        return run_noop(args)
    import torch

    from pie.bench.report import build_record, print_table
    from pie.bench.runner import run_benchmark

    say = _progress()
    with tempfile.TemporaryDirectory(prefix="pie-bench-") as tmp:
        cfg, name, model_dir, random_weights, dev_cfg, dtype_cfg = _resolve_model(args, Path(tmp))
        device = args.device or dev_cfg or "cuda:0"  # the configured device, "cpu" included
        opts = parse_options(args, device, args.dtype or dtype_cfg or "bfloat16")
        _check_lengths(cfg, opts)
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise DriverError(
                f"pie bench on {device} needs CUDA, but this torch ({torch.__version__}) sees no CUDA device; "
                "run on a GPU machine, or pass --device cpu for a (slow, not meaningful) smoke run"
            )
        say(f"model {name} ({cfg.get('model_type')}), {'random weights' if random_weights else model_dir}")
        meas = run_benchmark(str(model_dir), opts, random_weights, say)
    record = build_record(meas, cfg, name, opts, random_weights)
    # requested (--no-cuda-graphs turns it off), and what the run did: captured buckets, replays, or None
    # when the executor ran without graphs (CPU, torch attention, or turned off)
    record["settings"]["cuda_graphs"] = opts.cuda_graphs
    record["cuda_graphs"] = meas.cuda_graphs
    record["tensor_parallel"] = meas.tensor_parallel
    if args.json:
        print(json.dumps(record, indent=2))
        print_table(record, sys.stderr)
    else:
        print_table(record, sys.stdout)
    return 0
