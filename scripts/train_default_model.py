#!/usr/bin/env python3
"""Train pie's embedded default model: a small Qwen3 causal LM on the CPython documentation corpus.

Inputs are local files only (the GPU machine has no network): ``--corpus`` (corpus.txt and
chat.jsonl from scripts/build_corpus.py) and ``--tokenizer`` (from scripts/train_tokenizer.py).
Plain documents and chat examples (rendered through the chat template, so every turn ends in
``<|im_end|>``) each end in ``<|endoftext|>``; each epoch shuffles the documents and packs them into
fixed-length rows.  About 3% of the documents are held out for the evaluation loss, and the
weights with the best held-out loss are the ones saved.

Output (``--out``): a standard HF Qwen3 checkpoint in bfloat16 (model.safetensors, config.json with
model_type qwen3, tied embeddings, eos = ``<|im_end|>``, generation_config.json) plus the tokenizer
files when ``--out`` is not the tokenizer folder.  The script fails if the folder exceeds 30 MB.

GPU:   python scripts/train_default_model.py            (defaults: cuda, --minutes 4, --epochs 16)
Test:  python scripts/train_default_model.py --device cpu --tiny --steps 3 --out /tmp/m
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

EOT, IM_END = "<|endoftext|>", "<|im_end|>"
MAX_FOLDER_BYTES = 30 * 1024 * 1024
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
# ~12.5M parameters (3.1M of them the tied 8192x384 embedding): ~25 MB in bfloat16.
FULL_SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                  head_dim=64, intermediate_size=1024)  # fmt: skip
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=32, intermediate_size=128)  # fmt: skip
PLAIN_PROMPTS = ["The for statement", "Return a new list", "This module provides", "The Zen of Python"]
CHAT_PROMPTS = [
    "What does str.split do?",
    "Explain the json module.",
    "What is the `while` statement in Python?",
]


def load_documents(corpus: Path, tok) -> list[str]:
    """Plain documents and rendered chat examples, each ending in <|endoftext|>."""
    plain, chat = corpus / "corpus.txt", corpus / "chat.jsonl"
    if not plain.is_file():
        raise SystemExit(f"error: {plain} not found; run scripts/build_corpus.py (or pass --corpus DIR)")
    docs = [d.strip() + EOT for d in plain.read_text(encoding="utf-8").split(EOT) if d.strip()]
    if chat.is_file():
        with open(chat, encoding="utf-8") as f:
            convs = [json.loads(line)["messages"] for line in f if line.strip()]
        docs += [tok.apply_chat_template(m, tokenize=False) + EOT for m in convs]
    return docs


class Packer:
    """Documents as one flat token array; each epoch packs a fresh permutation into (rows, seq_len)."""

    def __init__(self, token_lists: list[list[int]], seq_len: int, seed: int):
        self.lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in token_lists])
        self.seq_len, self.rng = seq_len, np.random.default_rng(seed)

    def rows(self, shuffle: bool = True) -> torch.Tensor:
        """(n_rows, seq_len) int64; the tail that does not fill a row is dropped."""
        order = self.rng.permutation(len(self.lengths)) if shuffle else np.arange(len(self.lengths))
        lens = self.lengths[order]
        # Gather index of the concatenation: position i of document k reads flat[starts[k] + offset].
        out_starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        idx = np.repeat(self.starts[order] - out_starts, lens) + np.arange(lens.sum())
        n = len(idx) // self.seq_len
        return torch.from_numpy(self.flat[idx[: n * self.seq_len]].reshape(n, self.seq_len))


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup then cosine to floor*peak.  Written out (not a torch scheduler) because
    `total` can shrink after the first steps are timed against --minutes."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def autocast(device: str):
    """bf16 autocast on CUDA; plain fp32 on CPU, where bf16 matmuls are slow without AMX."""
    if device.startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def eval_loss(model, rows: torch.Tensor, batch: int, device: str) -> float:
    model.eval()
    losses = []
    for i in range(0, len(rows), batch):
        x = rows[i : i + batch].to(device)
        with autocast(device):
            losses.append(model(input_ids=x, labels=x).loss.float().item() * len(x))
    model.train()
    return sum(losses) / max(1, len(rows))


def build_model(vocab: int, tok, tiny: bool, attn_dropout: float) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=vocab, max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, rms_norm_eps=1e-6, bos_token_id=None, attention_dropout=attn_dropout,
        eos_token_id=tok.convert_tokens_to_ids(IM_END), pad_token_id=tok.convert_tokens_to_ids(EOT),
        **(TINY_SHAPE if tiny else FULL_SHAPE),
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def save(model, tok_dir: Path, out: Path, tok) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.attention_dropout = 0.0  # training-only regularizer; inference never drops
    model.to(torch.bfloat16).save_pretrained(out)
    # transformers 5 writes "dtype" and rope_parameters; older readers look for these two keys.
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(torch_dtype="bfloat16", rope_theta=cfg["rope_parameters"]["rope_theta"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    GenerationConfig(
        bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids(IM_END), pad_token_id=tok.convert_tokens_to_ids(EOT),
        do_sample=True, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1,
    ).save_pretrained(out)  # fmt: skip
    if tok_dir.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, out / name)
    (out / "model.safetensors").chmod(0o644)  # save_pretrained leaves it owner-only
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    if size > MAX_FOLDER_BYTES:
        raise SystemExit(
            f"error: {out} is {size / 2**20:.1f} MiB, over the 30 MiB budget; shrink the model shape"
        )


def show_samples(out: Path, device: str, max_new: int) -> None:
    """Reload the saved checkpoint (proves it loads) and print greedy and sampled completions."""
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    # Drop the saved sampling defaults, else generate() merges them into the greedy config and warns.
    model.generation_config = GenerationConfig(eos_token_id=model.config.eos_token_id)
    greedy = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=model.config.eos_token_id,
                              pad_token_id=model.config.pad_token_id)  # fmt: skip
    sampled = GenerationConfig(**{**greedy.to_dict(), "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                  "top_k": 40, "repetition_penalty": 1.1})  # fmt: skip
    prompts = [(p, p) for p in PLAIN_PROMPTS] + [
        (
            q,
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
        )
        for q in CHAT_PROMPTS
    ]
    torch.manual_seed(0)
    for label, text in prompts:
        ids = torch.tensor([tok.encode(text)], device=device)
        for name, gen in (("greedy", greedy), ("sampled", sampled)):
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)[
                0, ids.shape[1] :
            ]
            print(f"--- [{name}] {label!r}\n{tok.decode(new, skip_special_tokens=True)}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train pie's embedded default model (small Qwen3).")
    p.add_argument("--corpus", type=Path, default=Path(".data/corpus"))
    p.add_argument("--tokenizer", type=Path, default=Path("src/pie/assets/default-model"))
    p.add_argument("--out", type=Path, default=Path("src/pie/assets/default-model"))
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--minutes", type=float, default=4.0, help="training time budget (the loop stops within it)"
    )
    p.add_argument("--epochs", type=float, default=16.0, help="passes over the training rows, if time allows")
    p.add_argument(
        "--steps", type=int, default=None, help="exact number of optimizer steps (overrides the two above)"
    )
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument(
        "--eval-every", type=int, default=None, help="steps between held-out evals (default: half an epoch)"
    )
    p.add_argument(
        "--attn-dropout", type=float, default=0.1, help="attention dropout while training (saved as 0)"
    )
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny shape and rows, for tests on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    p.add_argument(
        "--sample-tokens", type=int, default=80, help="new tokens per printed completion (0: none)"
    )
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available; pass --device cpu (with --tiny)")
    if a.tiny:
        a.seq_len, a.batch_size, a.warmup = min(a.seq_len, 64), min(a.batch_size, 4), 2
    torch.manual_seed(a.seed)
    torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    docs = load_documents(a.corpus, tok)
    if len(docs) < 2:
        raise SystemExit(f"error: {a.corpus} holds {len(docs)} document(s); training needs at least 2")
    held = np.random.default_rng(a.seed).random(len(docs)) < 0.03  # document-level held-out split
    if held.all() or not held.any():
        held[:] = False
        held[-1] = True  # a tiny corpus still gets one held-out document
    # The fast backend directly: no per-call length warning for documents longer than 2048 tokens.
    ids = [e.ids for e in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)]
    train = Packer([t for t, h in zip(ids, held, strict=True) if not h], a.seq_len, a.seed)
    val_rows = Packer([t for t, h in zip(ids, held, strict=True) if h], a.seq_len, a.seed).rows(shuffle=False)
    if len(val_rows) == 0:  # held-out text shorter than one row: score it as one short row
        val_rows = torch.tensor([sum((t for t, h in zip(ids, held, strict=True) if h), [])[: a.seq_len]])
    rows = train.rows()
    if len(rows) < a.batch_size:
        raise SystemExit(
            f"error: corpus too small: {len(rows)} rows of {a.seq_len} tokens < batch {a.batch_size}"
        )
    rows = rows.to(a.device)  # ~10 MB of int64 token ids for the full corpus
    per_epoch = len(rows) // a.batch_size
    eval_every = a.eval_every or max(1, per_epoch // 2)
    total = a.steps or max(1, int(a.epochs * per_epoch))
    print(f"{len(docs)} documents ({held.sum()} held out), {int(train.lengths.sum())} train tokens, "
          f"{len(rows)} rows x {a.seq_len}, {per_epoch} steps/epoch, planned {total} steps")  # fmt: skip

    vocab = len(tok)
    model = build_model(vocab, tok, a.tiny, a.attn_dropout).to(a.device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {vocab}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # RMSNorm weights
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), fused=a.device.startswith("cuda"))  # fmt: skip
    fwd = torch.compile(model) if a.compile and a.device.startswith("cuda") else model

    best, best_loss, best_epoch = None, float("inf"), 0.0
    t0, step, cursor = time.monotonic(), 0, 0
    bar = tqdm(total=total, mininterval=5, desc="train", disable=not sys.stdout.isatty())
    while step < total:
        if cursor + a.batch_size > len(rows):
            rows, cursor = train.rows().to(a.device), 0  # next epoch: fresh permutation and packing
        x = rows[cursor : cursor + a.batch_size]  # (batch, seq_len) int64, on the device
        cursor += a.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, a.warmup, a.lr, 0.1)
        with autocast(a.device):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        elapsed = time.monotonic() - t0
        if a.steps is None and step == min(a.warmup, 50):  # re-plan so the run fits in --minutes
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()  # time the queued GPU work too, not just the launches
            elapsed = time.monotonic() - t0
            fit = int(step + (a.minutes * 60 * 0.95 - elapsed) / (elapsed / step))
            if fit < total:
                total = max(step + 1, fit)
                bar.total = total
                tqdm.write(f"time budget: planned steps cut to {total}")
        if step % a.log_every == 0 or step == total:
            rate = step * x.numel() / max(elapsed, 1e-9)
            tqdm.write(f"step {step}/{total} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                       f"{elapsed:.0f}s {rate / 1e3:.0f}k tok/s")  # fmt: skip
        out_of_time = a.steps is None and elapsed > a.minutes * 60
        if step % eval_every == 0 or step == total or out_of_time:
            vl = eval_loss(model, val_rows, a.batch_size, a.device)
            tqdm.write(f"step {step} held-out loss {vl:.4f} (epoch {step / per_epoch:.1f})")
            if vl < best_loss:
                best_loss, best_epoch = vl, step / per_epoch
                best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if out_of_time:
            tqdm.write("time budget reached")
            break
    bar.close()
    if best is not None:
        model.load_state_dict(best)
    # A best epoch well before the last one means the cosine ended too late: rerun with --epochs near it.
    print(f"trained {step} steps ({step / per_epoch:.1f} epochs) in {time.monotonic() - t0:.0f}s; "
          f"best held-out loss {best_loss:.4f} (perplexity {math.exp(min(best_loss, 50)):.1f}) "
          f"at epoch {best_epoch:.1f}")  # fmt: skip
    save(model, a.tokenizer, a.out, tok)
    if a.sample_tokens > 0:
        show_samples(a.out, a.device, a.sample_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
