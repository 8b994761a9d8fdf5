"""Benchmark the inferlet SDK's constrained and speculative generation at batch 1; prints a table.

    python scripts/bench_sdk.py                                              # embedded model, CPU or GPU
    python scripts/bench_sdk.py --model-config qwen3-0.6b --random-weights --tokenizer /path/to/qwen3-0.6b
    python scripts/bench_sdk.py --model-dir /path/to/Qwen3-0.6B                # real weights

Rows (each the median of --repeats runs of --tokens generated tokens, one inferlet at a time):

  engine                 collect_tokens() as one engine-side generation (no per-step wake-up)
  plain                  `async for step in gen`: one pass per token, the inferlet sees every step
  json / regex           the step loop with a grammar: host-side masks (llguidance, in a worker thread while
                         the pass runs) and host sampling from the masked logits; "overhead" is the extra
                         time per token against the step loop, and "mask" the host time of one mask alone
  oracle k=K             greedy with a speculator that drafts the known greedy continuation (every draft
                         accepted): the best case of a K-token verification pass
  system                 collect_tokens() with pie's default prompt-lookup drafter, on a repetitive prompt
                         (verification steps where it drafts, engine-side chunks elsewhere)
  speedup                plain step-loop time / this row's time (same tokens: greedy outputs are checked);
                         passes: forward passes the scheduler ran for the row

With random weights the constrained rows still measure the real mask cost (give --tokenizer so the token
table is the model's; without it the embedded 8k tokenizer is used and the mask cost is understated),
but the n-gram drafter's acceptance is ~0: the oracle rows measure the verification cost instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "src" / "pie" / "assets" / "default-model"
REPETITIVE = "Repeat this list exactly, twice: " + ", ".join(f"item {i} is {i * 7 % 13}" for i in range(24))
# long-running grammars, so that random weights also generate --tokens tokens
JSON_SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}}},
               "required": ["notes"]}  # fmt: skip
REGEX = r"([a-z]+ )+"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-dir", help="a checkpoint directory (config, safetensors, tokenizer)")
    src.add_argument("--model-config", help="a bundled config name (pie bench's list) or config .json")
    p.add_argument("--random-weights", action="store_true", help="random weights of the real shape")
    p.add_argument("--tokenizer", help="tokenizer directory (for --model-config; default: embedded model's)")
    p.add_argument("--device", default=None, help="cuda:0 when CUDA is there, else cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tokens", type=int, default=128, help="generated tokens per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the rows to this file")
    return p.parse_args()


def build_model_dir(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, bool]:
    """(model dir, tokenizer dir, random weights)."""
    if args.model_config:
        from pie.bench import load_model_config

        cfg, _ = load_model_config(args.model_config)
        (tmp / "config.json").write_text(json.dumps(cfg))
        return tmp, Path(args.tokenizer) if args.tokenizer else DEFAULT_MODEL, True
    model = Path(args.model_dir) if args.model_dir else DEFAULT_MODEL
    return model, Path(args.tokenizer) if args.tokenizer else model, args.random_weights


async def start_engine(model_dir: Path, tok_dir: Path, random_weights: bool, device: str, dtype: str):
    from pie.drivers.inprocess import InProcessDriver
    from pie.drivers.spec import ExecutorSpec
    from pie.models.tokenizer import Tokenizer
    from pie.runtime.engine import Engine

    cuda = device.startswith("cuda")
    spec = ExecutorSpec(
        model_path=str(model_dir), device=device, activation_dtype=dtype, page_size=16, num_pages=4096,
        random_weights=random_weights, cuda_graphs=cuda, kv_policy="cuda_native" if cuda else "dev",
    )  # fmt: skip
    engine = Engine.from_drivers({"bench": (InProcessDriver(spec), Tokenizer.from_dir(tok_dir))})
    await engine.start()
    return engine


class Oracle:
    """Drafts the known continuation: every draft is accepted (Pie's Speculator protocol)."""

    def __init__(self, target: list[int], k: int) -> None:
        self.target, self.k, self.done = target, k, 0

    def draft(self) -> tuple[list[int], list[int]]:
        d = self.target[self.done : self.done + self.k]
        return d, list(range(len(d)))

    def accept(self, tokens: list[int]) -> None:
        self.done += len(tokens)

    def rollback(self, n: int) -> None:
        pass

    def reset(self) -> None:
        self.done = 0


async def one_run(model, prompt: str, n: int, mode: str, target: list[int] | None, sched=None) -> dict:
    """Generate n tokens in `mode`; wall time, tokens, passes, speculation stats."""
    from inferlet import Context, JsonSchema, Regex, Sampler

    ctx = Context(model)
    ctx.user(prompt)
    await ctx.flush()  # prefill outside the timed region
    kw: dict = {"max_tokens": n, "stop": []}  # no stop: every run makes n tokens
    if mode.startswith("oracle"):
        kw["speculator"] = Oracle(target or [], int(mode.split("=")[1]))
    elif mode == "json":
        kw["constrain"] = JsonSchema(json.dumps(JSON_SCHEMA))
    elif mode == "regex":
        kw["constrain"] = Regex(REGEX)
    gen = ctx.generate(Sampler.argmax(), auto_flush=False, **kw)
    if mode != "system" and not mode.startswith("oracle"):
        gen.disable_system_speculation()
    steps0 = sched.num_steps if sched is not None else 0
    t0 = time.perf_counter()
    tokens = []
    if mode in ("engine", "system"):  # what users get from collect_tokens() / collect_text()
        tokens = await gen.collect_tokens()
    else:
        async for step in gen:
            tokens += (await step.execute()).tokens
    dt = time.perf_counter() - t0
    passes = sched.num_steps - steps0 if sched is not None else -1
    ctx.release()
    st = gen.speculation_stats
    return {"s": dt, "tokens": tokens, "passes": passes, "drafted": st.drafted, "accepted": st.accepted}


def mask_cost(model, mode: str, tokens: int) -> float:
    """Host seconds of one mask (Matcher.allowed) along a constrained output, alone."""
    from inferlet import Grammar, Matcher

    g = Grammar.from_json_schema(json.dumps(JSON_SCHEMA)) if mode == "json" else Grammar.from_regex(REGEX)
    m = Matcher(g, model.tokenizer(), model.vocab_size)
    text = '{"notes": ["' + "word " * tokens if mode == "json" else "word " * tokens
    ids = model.tokenizer().encode(text)[:tokens]
    t = 0.0
    for i in ids:
        t0 = time.perf_counter()
        m.allowed()
        t += time.perf_counter() - t0
        m.accept_tokens([i])
    return t / max(1, len(ids))


async def bench(args: argparse.Namespace) -> list[dict]:
    import torch

    from inferlet import Model

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tok_dir, random_w = build_model_dir(args, Path(tmp))
        print(f"model {model_dir} ({'random' if random_w else 'checkpoint'} weights), tokenizer {tok_dir}, "
              f"{device} {dtype}, {args.tokens} tokens x {args.repeats} repeats", file=sys.stderr)  # fmt: skip
        engine = await start_engine(model_dir, tok_dir, random_w, device, dtype)
    rows: list[dict] = []

    async def inferlet(_input: dict) -> None:
        model = Model.load()
        n = args.tokens
        sched = engine.model().scheduler
        await one_run(model, REPETITIVE, 8, "plain", None)  # warm-up (graphs, allocator, token table)
        plain = await one_run(model, REPETITIVE, n, "plain", None)
        target = plain["tokens"]
        modes = ["engine", "plain", "json", "regex", "oracle k=4", "oracle k=8", "system"]
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for m in modes:
                runs[m].append(await one_run(model, REPETITIVE, n, m, target, sched))

        def per_token(rs: list[dict]) -> float:  # a grammar may end before n tokens
            return statistics.median(r["s"] / max(1, len(r["tokens"])) for r in rs)

        base = per_token(runs["plain"])
        for m in modes:
            rs = runs[m]
            per_tok = per_token(rs)
            row = {
                "mode": m, "ms_per_token": per_tok * 1e3, "passes": rs[0]["passes"], "tokens": len(rs[0]["tokens"]),
                "drafted": rs[0]["drafted"], "accepted": rs[0]["accepted"],
                "speedup": base / per_tok, "overhead_ms": (per_tok - base) * 1e3,
                "same_as_plain": m in ("json", "regex") or rs[0]["tokens"] == target,
            }  # fmt: skip
            if m in ("json", "regex"):
                row["mask_ms"] = mask_cost(model, m, n) * 1e3
            rows.append(row)

    try:
        await engine.run_inferlet(inferlet, {})
    finally:
        await engine.shutdown()
    return rows


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'mode':<16}{'tokens':>7}{'ms/token':>10}{'vs step loop':>14}{'speedup':>9}{'passes':>8}{'accept':>12}"
        f"{'mask ms':>9}  greedy=plain"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        acc = f"{r['accepted']}/{r['drafted']}" if r["drafted"] else "-"
        mask = f"{r['mask_ms']:.3f}" if "mask_ms" in r else "-"
        same = "-" if r["mode"] in ("json", "regex") else "yes" if r["same_as_plain"] else "NO"
        print(f"{r['mode']:<16}{r['tokens']:>7}{r['ms_per_token']:>10.3f}{r['overhead_ms']:>+13.3f}ms{r['speedup']:>8.2f}x"
              f"{r['passes']:>8}{acc:>12}{mask:>9}  {same}")  # fmt: skip


def main() -> int:
    args = parse_args()
    if args.random_weights and not (args.model_config or args.model_dir):
        print("--random-weights needs --model-config or --model-dir", file=sys.stderr)
        return 2
    rows = asyncio.run(bench(args))
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
