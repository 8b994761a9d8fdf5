"""Tensor parallelism on CUDA (NCCL, bf16, FlashInfer, CUDA-graph decode): tp 2 (and tp 4 with 4 GPUs)
against tp 1 on tiny checkpoints with FlashInfer-sized heads. Marked gpu: skipped without CUDA and FlashInfer
or with fewer GPUs than ranks.

Per family: prefill 3 sequences (5, 17, 33 tokens), then 8 decode steps (graph replays, whose captured
forward holds the all-reduces and the logits all-gather; gpt_oss decodes eagerly, as its sinks turn graphs
off) fed with tp 1's greedy tokens, so both runs see the same inputs. Bar: cosine >= 0.999 for every logit row against tp 1, and the graphs really replayed.
The tp 1 references are computed before the group forms (a process in a group builds shards).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gpu_marks import needs_flashinfer
from test_parity_hf import PagedSeqs
from tiny_models import make_tiny_checkpoint

from pie.drivers.executor import ModelExecutor
from pie.drivers.protocol import make_batch
from pie.drivers.spec import ExecutorSpec

PAGE, PAGES = 16, 256
# 8 query heads, 2 KV heads: at tp 4 the KV heads are replicated
SHAPE = dict(
    hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=64, initializer_range=0.075
)
ARCHS = ("llama", "qwen3", "mixtral", "gpt_oss")
COSINE = 0.999
EAGER = ("gpt_oss",)  # attention sinks: CUDA graphs are off for them (attention/flashinfer_backend.py)


def _spec(path, tp: int) -> ExecutorSpec:
    return ExecutorSpec(
        model_path=str(path), device="cuda:0", devices=[f"cuda:{r}" for r in range(tp)],
        tensor_parallel_size=tp, activation_dtype="bfloat16", page_size=PAGE, num_pages=PAGES,
        attention_backend="flashinfer", cuda_graphs=True, tp_timeout_s=120,
    )  # fmt: skip


def _run(executor, feed: list[list[int]] | None) -> tuple[list[np.ndarray], list[list[int]]]:
    """Logits per step and the greedy tokens of each decode step; decode inputs from `feed` when given."""
    seqs, rng = PagedSeqs(PAGES, PAGE, seed=3), np.random.default_rng(7)
    prompts = [rng.integers(0, executor.model_config.vocab_size, n).tolist() for n in (5, 17, 33)]
    res = executor.execute(make_batch([seqs.request(i, p) for i, p in enumerate(prompts)], PAGE))
    logits, tokens = [res.logits], []
    ends = np.cumsum([5, 17, 33]) - 1
    last = [int(res.tokens[e]) for e in ends]
    for step in range(8):
        ids = feed[step] if feed is not None else last
        res = executor.execute(make_batch([seqs.request(i, [t]) for i, t in enumerate(ids)], PAGE))
        logits.append(res.logits)
        tokens.append(ids)
        last = [int(t) for t in res.tokens]
    return logits, tokens


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {a: make_tiny_checkpoint(tmp_path_factory.mktemp(a), a, **SHAPE) for a in ARCHS}


@pytest.fixture(scope="module")
def references(checkpoints):
    refs = {}
    for arch, path in checkpoints.items():
        ex = ModelExecutor(_spec(path, 1))
        refs[arch] = _run(ex, None)
        del ex
        torch.cuda.empty_cache()
    return refs


@needs_flashinfer
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_bf16_matches_tp1(tp, checkpoints, references):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs, {torch.cuda.device_count()} visible")
    from pie.drivers.tp import TPGroup

    group = TPGroup([f"cuda:{r}" for r in range(tp)], timeout_s=120)
    try:
        for arch, path in checkpoints.items():
            ref_logits, ref_tokens = references[arch]
            ex = group.build(_spec(path, tp))
            try:
                logits, _ = _run(ex, ref_tokens)
                replays = ex.graphs.stats.replays if ex.graphs is not None else 0
            finally:
                ex.close()
            if arch not in EAGER:
                assert replays >= 8, f"{arch} tp {tp}: decode steps did not replay CUDA graphs ({replays})"
            worst = 1.0
            for step, (a, b) in enumerate(zip(logits, ref_logits, strict=True)):
                cos = float(_cosine_rows(a, b).min())
                worst = min(worst, cos)
                assert cos >= COSINE, f"{arch} tp {tp} step {step}: min cosine {cos:.5f} < {COSINE}"
            print(f"{arch} tp {tp}: min cosine against tp 1 {worst:.5f}")
    finally:
        group.close()
