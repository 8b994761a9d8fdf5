"""Print the accuracy table of pie's quantized formats (docs/quantization.md): KL divergence and top-1
agreement against the unquantized model on a fixed text, weights and KV page bytes, the kernel each
quantized layer runs, and (--speed) the decode step time.

    python scripts/quant_accuracy.py                                   # embedded model, CPU, fp32
    python scripts/quant_accuracy.py --device cuda:0 --dtype bfloat16 --speed 64,512,32
    python scripts/quant_accuracy.py --model /path/to/hf/checkpoint --device cuda:0 --dtype bfloat16

Every configuration is a fresh executor on the same pages; the reference is weight_dtype "auto" with the
activation-dtype KV cache.
"""

from __future__ import annotations

import argparse
import sys

from pie.bench.quant_accuracy import FIXED_TEXT, format_table, measure
from pie.models.hub import resolve_model_dir
from pie.models.tokenizer import Tokenizer
from pie.paths import EMBEDDED_MODEL_ID


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default=EMBEDDED_MODEL_ID, help="HF repo id in the cache, local dir, or the embedded model"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--dtype", default=None, help="activation dtype (default: float32 on CPU, bfloat16 on CUDA)"
    )
    ap.add_argument("--speed", default=None, help="BATCH,CONTEXT,STEPS: also time decode steps")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    model_dir = str(resolve_model_dir(args.model))
    ids = Tokenizer.from_dir(model_dir).encode(FIXED_TEXT)
    speed = tuple(int(v) for v in args.speed.split(",")) if args.speed else None
    if speed is not None and len(speed) != 3:
        ap.error("--speed takes BATCH,CONTEXT,STEPS, e.g. 64,512,32")
    rows = measure(model_dir, ids, device=args.device, activation_dtype=dtype, speed=speed)
    print(
        format_table(
            rows, f"{args.model} on {args.device}, {dtype} activations, {len(ids)} tokens of FIXED_TEXT"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
