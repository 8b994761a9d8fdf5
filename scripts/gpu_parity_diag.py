"""Where does a family's bf16 GPU parity go wrong? One table per family, each row one configuration against
transformers fp32 on CUDA, on one sequence (33-token prefill, then 7 single-token decode steps, every row's
logits):

    hf-bf16          transformers itself in bf16: how sensitive the tiny random model is to bf16 at all
    pie-fp32-torch   pie in fp32 with its torch attention backend, Triton kernels on (GPU code paths, no bf16)
    pie-fp32-notri   the same with the Triton kernels off (isolates pie.kernels)
    pie-bf16-torch   bf16, torch attention backend (isolates FlashInfer)
    pie-bf16-fi      bf16, FlashInfer (what the family tests run)

Usage (repository root, GPU machine): PYTHONPATH=src:tests python scripts/gpu_parity_diag.py [ARCH ...]
Prints a TSV: arch, config, min cosine, mean cosine, top-1 agreement, max |diff|.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

import pie.kernels
from pie.drivers.executor import ModelExecutor
from pie.drivers.protocol import make_batch
from pie.drivers.spec import ExecutorSpec

DEV = os.environ.get("PIE_DIAG_DEVICE", "cuda:0")
PREFILL, DECODE = 33, 7


def checkpoints(root: str) -> dict[str, str]:
    from gemma4_tiny import make_gemma4_checkpoint
    from test_gpu import TINY
    from test_moe_gpu import FAMILIES
    from tiny_models import FAMILY_ARCHS, make_tiny_checkpoint

    cases = {"llama": ("llama", {})} | {a: (a, {}) for a in FAMILY_ARCHS} | FAMILIES
    want = sys.argv[1:] or [*cases, "gemma4_text"]
    out = {}
    for name in want:
        if name == "gemma4_text":
            out[name] = make_gemma4_checkpoint(
                f"{root}/{name}",
                name,
                hidden_size=256,
                head_dim=64,
                global_head_dim=128,
                initializer_range=0.075,
            )
        else:
            arch, over = cases[name]
            out[name] = make_tiny_checkpoint(f"{root}/{name}", arch, **{**TINY, **over})
    return out


def hf_logits(path: str, ids: list[int], dtype: torch.dtype) -> np.ndarray:
    import transformers
    from tiny_models import hf_model_class

    cls = hf_model_class(transformers.AutoConfig.from_pretrained(path))
    model = (
        cls.from_pretrained(path, dtype=dtype, attn_implementation="eager", experts_implementation="eager")
        .to(DEV)
        .eval()
    )
    with torch.no_grad():
        out = model(torch.tensor([ids], device=DEV)).logits[0].float().cpu().numpy()
    del model
    return out


def pie_logits(path: str, ids: list[int], dtype: str, backend: str, page_size: int = 16) -> np.ndarray:
    spec = ExecutorSpec(model_path=path, device=DEV, activation_dtype=dtype, page_size=page_size, num_pages=64,
                        attention_backend=backend)  # fmt: skip
    ex = ModelExecutor(spec)
    pages = list(range(3, 3 + -(-len(ids) // page_size)))

    def req(lo: int, hi: int) -> dict:
        used = -(-hi // page_size)
        return dict(token_ids=ids[lo:hi], positions=list(range(lo, hi)), pages=pages[:used],
                    last_page_len=hi - (used - 1) * page_size, outputs=list(range(hi - lo)), return_logits=True)  # fmt: skip

    rows = [ex.execute(make_batch([req(0, PREFILL)], page_size)).logits]
    for n in range(PREFILL, len(ids)):
        rows.append(ex.execute(make_batch([req(n, n + 1)], page_size)).logits)
    del ex
    torch.cuda.empty_cache()
    return np.concatenate(rows).astype(np.float32)


def compare(got: np.ndarray, ref: np.ndarray) -> str:
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    top1 = (got.argmax(-1) == ref.argmax(-1)).mean()
    worst = int(cos.argmin())
    return f"{cos.min():.6f}\t{cos.mean():.6f}\t{top1:.3f}\t{np.abs(got - ref).max():.4f}\tworst_row={worst}"


def main() -> None:
    root = tempfile.mkdtemp()
    print("arch\tconfig\tmin_cos\tmean_cos\ttop1\tmax_diff\tworst", flush=True)
    for name, path in checkpoints(root).items():
        diagnose(name, str(path))


def diagnose(name: str, path: str) -> None:
    import json

    vocab = json.load(open(f"{path}/config.json")).get("vocab_size") or 256
    ids = np.random.default_rng(7).integers(0, min(vocab, 200), PREFILL + DECODE).tolist()
    ref = hf_logits(path, ids, torch.float32)
    rows = {"hf-bf16": lambda: hf_logits(path, ids, torch.bfloat16)}
    for dtype, backend, tri in [("float32", "torch", True), ("float32", "torch", False),
                                ("bfloat16", "torch", True), ("bfloat16", "flashinfer", True)]:  # fmt: skip
        label = (
            f"pie-{'fp32' if dtype == 'float32' else 'bf16'}-{'fi' if backend == 'flashinfer' else 'torch'}"
        )
        label = label.replace("torch", "notri") if not tri else label

        def run(dtype=dtype, backend=backend, tri=tri):
            pie.kernels.TRITON_ENABLED = tri
            try:
                return pie_logits(path, ids, dtype, backend)
            finally:
                pie.kernels.TRITON_ENABLED = True

        rows[label] = run
    for label, fn in rows.items():
        try:
            print(f"{name}\t{label}\t{compare(fn(), ref)}", flush=True)
        except Exception as e:  # one configuration failing must not hide the others
            print(f"{name}\t{label}\tERROR {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
