"""Accuracy of each quantized format against the unquantized model on a fixed text.

One prefill of FIXED_TEXT (teacher forcing: every position's next-token distribution) per configuration,
on the same pages; per position the KL divergence KL(reference || quantized) of the softmax distributions
and whether the argmax agrees. The reference is the same model with weight_dtype "auto" and the
activation-dtype KV cache (fp32 on CPU, bf16 on CUDA by default). The prefill reads every K/V back from the
paged cache, so an FP8 KV cache is measured as well.

Used by scripts/quant_accuracy.py (prints the table) and tests/test_quant_accuracy.py (asserts bounds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pie.drivers.executor import ModelExecutor
from pie.drivers.protocol import make_batch
from pie.drivers.spec import ExecutorSpec

# A fixed text in the embedded model's register (Python-documentation English), ~300 tokens.
FIXED_TEXT = (
    "The json module provides functions to encode Python objects as JSON strings and to decode JSON "
    "strings back into Python objects. The dumps function returns a string, while dump writes to a file "
    "object opened for writing. When a dictionary has keys that are not strings, a TypeError is raised "
    "unless skipkeys is true. To read a configuration file, open it with a context manager so that the "
    "file is closed even when an exception occurs, then pass the file object to load. The returned value "
    "is a dictionary whose keys are the names of the settings. A list is an ordered collection of items; "
    "you can append an item, insert it at a given position, or remove the first item equal to a value. "
    "Sorting a list in place uses the sort method, and the sorted function returns a new list instead. "
    "Both accept a key function that is called once for each element, and a reverse flag. Iterating over "
    "a dictionary yields its keys in insertion order; use the items method to get key and value pairs. "
    "A generator function uses yield to produce a sequence of values lazily, one at a time, which saves "
    "memory when the sequence is long. Exceptions are handled with try and except; a finally clause runs "
    "whether or not an exception was raised, and is the place to release resources."
)

# (label, weight_dtype, kv_cache_dtype): the formats the table reports, the reference first
CONFIGS = (
    ("reference", "auto", "auto"),
    ("int8", "int8", "auto"),
    ("int4", "int4", "auto"),
    ("float8", "float8", "auto"),
    ("fp8 KV", "auto", "fp8_e4m3"),
    ("float8 + fp8 KV", "float8", "fp8_e4m3"),
)


@dataclass
class FormatResult:
    label: str
    weight_dtype: str
    kv_cache_dtype: str
    mean_kl: float  # nats per position
    max_kl: float
    top1: float  # fraction of positions whose argmax equals the reference's
    weights_bytes: int
    kv_page_bytes: int  # one page, all layers
    kernels: dict[str, int]  # quantized layers per kernel ("dequant" = no kernel on this device)
    decode_ms: float | None = None  # mean decode step, when measured


def _executor(model_dir: str, device: str, act: str, weight_dtype: str, kv: str, page_size: int, pages: int):
    spec = ExecutorSpec(
        model_path=model_dir,
        device=device,
        activation_dtype=act,
        weight_dtype=weight_dtype,
        kv_cache_dtype=kv,
        page_size=page_size,
        num_pages=pages,
        max_batch_tokens=4096,
    )
    return ModelExecutor(spec)


def prefill_logits(ex: ModelExecutor, ids: list[int]) -> np.ndarray:
    """fp32 logits [len(ids), V] of one teacher-forced prefill on pages 0..n-1."""
    ps = ex.spec.page_size
    n_pages = -(-len(ids) // ps)
    req = dict(
        token_ids=ids,
        positions=list(range(len(ids))),
        pages=list(range(n_pages)),
        last_page_len=len(ids) - (n_pages - 1) * ps,
        outputs=list(range(len(ids))),
        return_logits=True,
    )
    return ex.execute(make_batch([req], ps)).logits


def decode_ms(ex: ModelExecutor, batch_size: int, context: int, steps: int) -> float:
    """Mean wall time of one decode step of `batch_size` sequences at `context` tokens (prefilled first)."""
    ps = ex.spec.page_size
    per_seq = -(-(context + steps) // ps)
    if per_seq * batch_size > ex.num_pages:
        raise ValueError(f"{batch_size} x {context + steps} tokens need {per_seq * batch_size} pages")
    pages = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch_size)]

    def req(i: int, start: int, n: int) -> dict:
        used = -(-(start + n) // ps)
        return dict(
            token_ids=[(7 * i + start + j) % 1000 + 3 for j in range(n)],
            positions=list(range(start, start + n)),
            pages=pages[i][:used],
            last_page_len=start + n - (used - 1) * ps,
            outputs=[n - 1],
        )

    ex.execute(make_batch([req(i, 0, context) for i in range(batch_size)], ps))
    sync = torch.cuda.synchronize if ex.device.type == "cuda" else (lambda: None)
    ex.execute(make_batch([req(i, context, 1) for i in range(batch_size)], ps))  # warm-up
    sync()
    t0 = time.perf_counter()
    for s in range(1, steps):
        ex.execute(make_batch([req(i, context + s, 1) for i in range(batch_size)], ps))
    sync()
    return (time.perf_counter() - t0) * 1e3 / max(steps - 1, 1)


def measure(
    model_dir: str,
    ids: list[int],
    device: str = "cpu",
    activation_dtype: str = "float32",
    configs=CONFIGS,
    page_size: int = 16,
    speed: tuple[int, int, int] | None = None,
) -> list[FormatResult]:
    """One FormatResult per config (the first is the reference). speed = (batch, context, steps) also times
    decode steps (meaningful on a GPU)."""
    pages = max(
        -(-len(ids) // page_size), (speed[0] * -(-(speed[1] + speed[2]) // page_size)) if speed else 0
    )
    out: list[FormatResult] = []
    ref_logp: torch.Tensor | None = None
    for label, wd, kv in configs:
        ex = _executor(model_dir, device, activation_dtype, wd, kv, page_size, pages)
        logp = torch.log_softmax(torch.from_numpy(prefill_logits(ex, ids)).double(), dim=-1)
        if ref_logp is None:
            ref_logp = logp
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [n] KL(ref || this)
        top1 = (ref_logp.argmax(-1) == logp.argmax(-1)).double().mean()
        caps = ex.capabilities
        out.append(
            FormatResult(
                label=label,
                weight_dtype=wd,
                kv_cache_dtype=kv,
                mean_kl=float(kl.mean()),
                max_kl=float(kl.max()),
                top1=float(top1),
                weights_bytes=ex.weights_bytes,
                kv_page_bytes=caps.page_nbytes,
                kernels=dict(ex.weight_kernels),
                decode_ms=decode_ms(ex, *speed) if speed else None,
            )
        )
        del ex
    return out


def format_table(rows: list[FormatResult], note: str = "") -> str:
    """A markdown table of the results, sizes relative to the reference."""
    ref = rows[0]
    head = "| format | weight_dtype | kv_cache_dtype | mean KL (nats) | max KL | top-1 agree | weights | KV page | kernels |"
    lines = [head, "|" + "---|" * 9]
    speed = any(r.decode_ms is not None for r in rows)
    if speed:
        lines[0] += " decode step |"
        lines[1] += "---|"
    for r in rows:
        kern = ", ".join(f"{k} {n}" for k, n in sorted(r.kernels.items())) or "-"
        line = (
            f"| {r.label} | {r.weight_dtype} | {r.kv_cache_dtype} | {r.mean_kl:.2e} | {r.max_kl:.2e} | "
            f"{r.top1:.1%} | {r.weights_bytes / 2**20:.2f} MiB ({r.weights_bytes / ref.weights_bytes:.2f}x) | "
            f"{r.kv_page_bytes} B ({r.kv_page_bytes / ref.kv_page_bytes:.2f}x) | {kern} |"
        )
        if speed:
            line += f" {r.decode_ms:.2f} ms |" if r.decode_ms is not None else " - |"
        lines.append(line)
    return "\n".join(lines) + (f"\n\n{note}" if note else "")
