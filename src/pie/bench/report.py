"""Turn measurements into one machine-readable record and a human table.

Every figure carries its floor and ratio = measured time / floor time (1.0 = at the floor, 2.0 = twice as
slow). For throughput figures the floor is shown as the throughput the floor time would give.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
from typing import IO

import torch

from pie.bench import floors
from pie.bench.runner import BenchOptions, Measurements

RECORD_VERSION = 1
_DTYPE_BYTES = {
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "float32": 4,
    "fp32": 4,
    "float": 4,
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def card_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()})"


def model_shape(cfg: dict, dtype_bytes: int) -> dict:
    pc = floors.param_counts(cfg)
    return {
        "model_type": cfg.get("model_type"),
        "hidden_size": cfg["hidden_size"],
        "num_layers": cfg["num_hidden_layers"],
        "num_heads": cfg["num_attention_heads"],
        "num_kv_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        "intermediate_size": cfg["intermediate_size"],
        "vocab_size": cfg["vocab_size"],
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "params": pc.total,
        # MoE: experts per sparse layer, routed per token, and how many layers are sparse (else absent)
        **(
            {
                "moe": {
                    "num_experts": pc.num_experts,
                    "experts_per_token": pc.experts_per_token,
                    "sparse_layers": pc.num_sparse_layers,
                }
            }  # fmt: skip
            if pc.num_sparse_layers
            else {}
        ),
        "decode_weight_bytes": floors.decode_weight_bytes(cfg, dtype_bytes),
        "kv_bytes_per_token": floors.kv_bytes_per_token(cfg, dtype_bytes),
    }


def build_record(
    meas: Measurements, cfg: dict, model_name: str, opts: BenchOptions, random_weights: bool
) -> dict:
    """The JSON record of one `pie bench` run."""
    nbytes = _DTYPE_BYTES.get(opts.dtype, 2)
    bw, mm = meas.copy_bandwidth_bps, meas.matmul_flops_per_s
    figures = []
    for d in meas.decode:
        floor_s = floors.decode_floor_s(cfg, d.batch, d.mean_kv_len, bw, nbytes)
        common = {
            "batch": d.batch,
            "step_ms": d.step_s * 1e3,
            "floor_step_ms": floor_s * 1e3,
            "ratio": d.step_s / floor_s,
            "mean_kv_len": d.mean_kv_len,
            "bytes_per_step": floors.decode_step_bytes(cfg, d.batch, d.mean_kv_len, nbytes),
            "repeat_step_ms": [t * 1e3 for t in d.step_times],
            "launch_host_ms": d.launch_s * 1e3,
        }
        if d.batch == 1:
            figures.append(
                {
                    "name": "decode_ms_per_token",
                    "label": "decode, batch 1",
                    "unit": "ms/token",
                    "value": d.step_s * 1e3,
                    "floor": floor_s * 1e3,
                    **common,
                }
            )
        else:
            figures.append(
                {
                    "name": f"decode_tokens_per_s_b{d.batch}",
                    "label": f"decode, batch {d.batch}",
                    "unit": "tokens/s",
                    "value": d.batch / d.step_s,
                    "floor": d.batch / floor_s,
                    **common,
                }
            )
    if meas.prefill is not None:
        p = meas.prefill
        qo = [p.tokens_per_request] * p.requests
        floor_s = floors.prefill_floor_s(cfg, qo, qo, p.requests, mm, bw, nbytes)
        tokens = p.requests * p.tokens_per_request
        figures.append(
            {
                "name": "prefill_tokens_per_s",
                "label": f"prefill, {p.requests} x {p.tokens_per_request}",
                "unit": "tokens/s",
                "value": tokens / p.pass_s,
                "floor": tokens / floor_s,
                "ratio": p.pass_s / floor_s,
                "pass_ms": p.pass_s * 1e3,
                "floor_pass_ms": floor_s * 1e3,
                "flops": floors.prefill_flops(cfg, qo, qo, p.requests),
                "repeat_pass_ms": [t * 1e3 for t in p.pass_times],
            }
        )
    executor_step = {d.batch: d.step_s for d in meas.decode}
    for e in meas.e2e:
        floor_s = floors.decode_floor_s(cfg, e.batch, opts.context + e.steps / 2, bw, nbytes)
        ex = executor_step.get(e.batch)
        one = e.batch == 1  # batch 1 in ms/token, as the executor's figure
        figures.append(
            {
                "name": "e2e_decode_ms_per_token" if one else f"e2e_decode_tokens_per_s_b{e.batch}",
                "label": f"e2e (SDK), batch {e.batch}",
                "unit": "ms/token" if one else "tokens/s",
                "value": e.step_s * 1e3 if one else e.tokens_per_s,
                "floor": floor_s * 1e3 if one else e.batch / floor_s,
                "ratio": e.step_s / floor_s,
                "executor_value": None if ex is None else (ex * 1e3 if one else e.batch / ex),
                # throughput of the e2e path as a fraction of the executor-only path (1.0 = no overhead)
                "of_executor": None if ex is None else ex / e.step_s,
                "step_ms": e.step_s * 1e3,
                "batches": e.batches,
                "steps": e.steps,
            }
        )
    caps = meas.capabilities
    return {
        "record_version": RECORD_VERSION,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "card": card_name(opts.device),
        "device": opts.device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "flashinfer": _version("flashinfer-python"),
        "model": {"name": model_name, "random_weights": random_weights, **model_shape(cfg, nbytes)},
        "settings": {
            "dtype": opts.dtype,
            "weight_dtype": opts.weight_dtype,
            "kv_cache_dtype": opts.kv_cache_dtype,
            "page_size": opts.page_size,
            "context": opts.context,
            "attention_backend": caps.get("extra", {}).get("attention_backend"),
            "steps": opts.steps,
            "repeats": opts.repeats,
            "warmup": opts.warmup,
        },
        "ceilings": {"copy_bandwidth_GBps": bw / 1e9, "matmul_tflops": mm / 1e12},
        "figures": figures,
    }


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def print_table(record: dict, file: IO[str]) -> None:
    """A rich table of the record's figures (plain text when `file` is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    m, c = record["model"], record["ceilings"]
    title = (
        f"{m['name']} ({m['model_type']}, {m['params'] / 1e9:.2f} B params"
        f"{', random weights' if m['random_weights'] else ''}) on {record['card']}"
    )
    table = Table(
        title=title,
        caption=(
            f"ceilings measured: copy {c['copy_bandwidth_GBps']:,.0f} GB/s (read + write), bf16 matmul "
            f"{c['matmul_tflops']:,.0f} TFLOP/s; attention {record['settings']['attention_backend']}, "
            f"{record['settings']['dtype']}{_quant_note(record['settings'])}, page {record['settings']['page_size']}, "
            f"context {record['settings']['context']}; "
            "ratio = time / floor time"
        ),
    )
    for col, just in (
        ("figure", "left"),
        ("measured", "right"),
        ("floor", "right"),
        ("unit", "left"),
        ("ratio", "right"),
    ):
        table.add_column(col, justify=just)
    for f in record["figures"]:
        label = f["label"]
        if f.get("of_executor") is not None:
            label += f" ({f['of_executor']:.0%} of executor)"
        table.add_row(label, _fmt(f["value"]), _fmt(f["floor"]), f["unit"], f"{f['ratio']:.2f}")
    Console(file=file, width=120).print(table)
    tp = record.get("tensor_parallel")
    if tp:
        print_tensor_parallel(tp, record, file)


def print_tensor_parallel(tp: dict, record: dict, file: IO[str]) -> None:
    """The ranks' layout and each step's collectives timed alone, beside the measured step (floors in the
    table above are one device's: with N ranks each reads 1/N of the weights)."""
    print(f"tensor parallel: {tp['size']} ranks", file=file)
    for r in tp["layout"]:
        print(
            f"  rank {r['rank']} {r['device']}: weights {r['weights_bytes'] / 2**30:.2f} GiB, "
            f"KV cache {r['kv_cache_bytes'] / 2**30:.2f} GiB",
            file=file,
        )
    steps = {}
    for f in record["figures"]:
        if f["name"].startswith("decode_"):
            steps[f"decode_b{f['batch']}"] = f["step_ms"] / 1e3
        elif f["name"] == "prefill_tokens_per_s":
            steps["prefill"] = f["pass_ms"] / 1e3
    for name, s in tp["collective_s"].items():
        step = steps.get(name)
        share = f" of a {step * 1e3:.3f} ms step ({s / step:.0%})" if step else ""
        print(f"  {name}: collectives {s * 1e3:.3f} ms{share}", file=file)


def _quant_note(settings: dict) -> str:
    """ ", weights int4, KV fp8_e4m3" for quantized runs (records written before these keys had none)."""
    parts = [f"weights {settings['weight_dtype']}"] if settings.get("weight_dtype", "auto") != "auto" else []
    if settings.get("kv_cache_dtype", "auto") != "auto":
        parts.append(f"KV {settings['kv_cache_dtype']}")
    return "".join(f", {p}" for p in parts)
