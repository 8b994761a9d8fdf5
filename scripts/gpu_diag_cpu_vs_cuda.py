"""CPU against CUDA, for a family whose fp32 GPU parity fails while its CPU parity passes: is pie's CUDA path
or transformers' CUDA path the odd one out? Every row compares one run with transformers fp32 on CPU (the
reference the CPU parity tests hold pie to), over the same tokens: 3 prompts (5, 17, 30), then 8 decode
steps each (the tiny phi3_longrope crosses its LongRoPE switch at 24 on the 17-token sequence).

Usage (GPU machine): PYTHONPATH=src:tests python scripts/gpu_diag_cpu_vs_cuda.py gpt_oss phi3_longrope
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch
from test_gpu import TINY, cuda_executor, hf_cuda_cached_logits, logit_stats
from test_moe_gpu import FAMILIES
from test_parity_hf import make_executor
from test_parity_moe import hf_cached_logits
from tiny_models import make_tiny_checkpoint

from pie.drivers.protocol import make_batch

PS = 16


def forced(ex, prompts: list[list[int]], steps: list[list[int]]) -> list[np.ndarray]:
    """Prefill `prompts` together, then feed steps[i][j] one token per sequence per step: every row's logits."""
    pages, lens = {}, {}
    free = list(range(1, ex.num_pages))

    def req(i: int, ids: list[int]) -> dict:
        old = lens.get(i, 0)
        new = old + len(ids)
        p = pages.setdefault(i, [])
        while len(p) * PS < new:
            p.append(free.pop())
        lens[i] = new
        return dict(token_ids=ids, positions=list(range(old, new)), pages=list(p),
                    last_page_len=new - (len(p) - 1) * PS, outputs=list(range(len(ids))), return_logits=True)  # fmt: skip

    batch = make_batch([req(i, p) for i, p in enumerate(prompts)], PS)
    res = ex.execute(batch)
    rows = [[r] for r in np.split(res.logits, batch.qo_indptr[1:-1])]
    for j in range(len(steps[0])):
        res = ex.execute(make_batch([req(i, [s[j]]) for i, s in enumerate(steps)], PS))
        for i in range(len(prompts)):
            rows[i].append(res.logits[i : i + 1])
    return [np.concatenate(r).astype(np.float32) for r in rows]


def main() -> None:
    for name in sys.argv[1:]:
        diagnose(name)
        torch.cuda.empty_cache()


def diagnose(name: str) -> None:
    arch, over = FAMILIES[name]
    path = make_tiny_checkpoint(tempfile.mkdtemp(), arch, **{**TINY, **over})
    cpu = make_executor(path, PS)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, cpu.model_config.vocab_size, n).tolist() for n in (5, 17, 30)]
    steps = [rng.integers(0, cpu.model_config.vocab_size, 8).tolist() for _ in prompts]
    ref = [hf_cached_logits(path, p, s) for p, s in zip(prompts, steps, strict=True)]
    runs = {
        "pie-cpu-fp32": lambda: forced(cpu, prompts, steps),
        "pie-cuda-fp32-torch": lambda: forced(
            cuda_executor(path, PS, "torch", dtype="float32"), prompts, steps
        ),
        "pie-cuda-bf16-fi": lambda: forced(cuda_executor(path, PS), prompts, steps),
        "hf-cuda-fp32": lambda: [
            hf_cuda_cached_logits(path, p, s) for p, s in zip(prompts, steps, strict=True)
        ],
    }
    for label, fn in runs.items():
        try:
            got = fn()
            for i in range(len(prompts)):
                mn, mean, top1 = logit_stats(got[i], ref[i])
                cos = (got[i] * ref[i]).sum(-1) / (
                    np.linalg.norm(got[i], axis=-1) * np.linalg.norm(ref[i], axis=-1)
                )
                bad = np.nonzero(cos < 0.9999)[0].tolist()
                print(
                    f"{name}\t{label}\tseq{i}\tmin_cos={mn:.6f}\ttop1={top1:.3f}\tbad_rows={bad}",
                    flush=True,
                )
        except Exception as e:
            print(f"{name}\t{label}\tERROR {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
